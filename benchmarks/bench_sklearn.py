"""ppl_em against scikit-learn's GaussianMixture: time per EM iteration and to convergence.

Both sides get the same data, the same start and the same stopping rule on the
log-likelihood (scikit-learn stops when the mean log-likelihood per observation changes
by less than ``tol``; ppl_em when the total changes by less than ``tol`` times its
magnitude, so ppl_em gets ``tol / |mean loglik|``). ppl_em fits the marginalised
``pm.NormalMixture`` with flat priors in ``mode="mle"``: closed-form M-step, the same
estimator as scikit-learn with ``reg_covar=0``. Compilation is done before timing.
scikit-learn's times are the faster of its default BLAS threads and one thread. Per
iteration, the two are timed in turn over ``ROUNDS`` rounds and each keeps its best.

Run: ``python -m benchmarks.bench_sklearn [--quick]`` from the repository root.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

import ppl_em
from benchmarks._common import (
    START_1D,
    gaussian_1d,
    markdown_table,
    plot_lines,
    timed,
    write_report,
)
from ppl_em.em import apply_start, em_data, em_init, em_step, run_em
from ppl_em.steps.estep import one_blas_thread

SK_TOL = 1e-8


def flat_mixture_1d(x: np.ndarray, k: int) -> pm.Model:
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Flat("mu", shape=k)
        sigma = pm.HalfFlat("sigma", shape=k)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model


def start_1d(k: int) -> dict:
    if k == 3:
        return START_1D
    return {"w": np.full(k, 1.0 / k), "mu": np.linspace(-4, 4 * k, k), "sigma": np.full(k, 2.0)}


def sklearn_model(start: dict, max_iter: int, tol: float, cov: str = "full") -> GaussianMixture:
    mu = np.asarray(start["mu"], dtype=float)
    mu = mu[:, None] if mu.ndim == 1 else mu
    var = (
        np.asarray(start["cov"])
        if "cov" in start
        else np.asarray(start["sigma"])[:, None, None] ** 2
    )
    return GaussianMixture(
        len(start["w"]),
        covariance_type=cov,
        tol=tol,
        max_iter=max_iter,
        reg_covar=0.0,
        init_params="random_from_data",
        weights_init=np.asarray(start["w"]),
        means_init=mu,
        precisions_init=np.linalg.inv(var),
        random_state=0,
    )


def best_threads(fn):
    """``fn()``'s ``(seconds, value)`` with the process's BLAS threads and with one, the
    faster: ppl_em's E-step limits itself to one BLAS thread, and on this 2-core machine
    scikit-learn too is often faster with one (N=10^5, D=4: 32 against 62 ms per
    iteration), so its default alone would flatter ppl_em."""
    default = fn()
    with threadpool_limits(limits=1, user_api="blas"):
        single = fn()
    return min(default, single, key=lambda r: r[0])


def sklearn_per_iter(X: np.ndarray, start: dict, iters: int) -> float:
    """Slope of fit time in max_iter: fixed costs (checks, final E-step) cancel."""

    def slope():
        t1, _ = timed(lambda: sklearn_model(start, 1, 0.0).fit(X), repeat=2)
        tn, _ = timed(lambda: sklearn_model(start, 1 + iters, 0.0).fit(X), repeat=2)
        return (tn - t1) / iters, None

    return best_threads(slope)[0]


def ppl_per_iter(prepared, u0: np.ndarray, repeat: int, rounds: int = 2) -> float:
    """Seconds per EM iteration: the median of ``repeat`` iterations from ``u0``, the
    better of ``rounds`` rounds (scikit-learn's time is the better of its two thread
    settings, :func:`best_threads`; on this VM one round's median of the same code
    varied 0.93-1.67 ms at D=4, N=10^4). Run as ``run_em`` runs them: statistics
    columns built once, no log-responsibilities kept between closed-form steps, one
    BLAS thread (with OpenBLAS's two, the M-step's small products made a D=4 iteration
    at N=10^4 1.0-1.7 ms against 0.93-0.95, benchmarks/README.md)."""
    f, c = prepared
    data = em_data(f, c)
    best = np.inf
    with one_blas_thread(f.blas):
        for _ in range(rounds):
            state, times = em_init(f, u0, c, data), []
            for _ in range(repeat):
                t, state = timed(lambda s=state: em_step(f, c, s, data, keep_resp=False))
                times.append(t)
            best = min(best, float(np.median(times)))
    return best


# Rounds in which each side is timed in turn, each side's best kept: the D=4 iteration
# at N=10^4 took 1.4 ms in one whole run and 0.88-0.97 ms in nine timings of that row
# alone or after other rows: a slow spell of the VM caught by one side only.
ROUNDS = 3


def alternated(ppl, sklearn) -> tuple[float, float]:
    """``(ppl(), sklearn())`` seconds, each the least over ``ROUNDS`` rounds that time
    the two in turn."""
    pairs = [(ppl(), sklearn()) for _ in range(ROUNDS)]
    return min(p for p, _ in pairs), min(s for _, s in pairs)


def _u0(prepared, start):
    f = prepared.functions
    return apply_start(f, start, np.zeros(f.layout.size))


def per_iteration_rows(ns: list[int], k: int = 3, backend: str = "auto") -> list[list]:
    rows = []
    for n in ns:
        x = gaussian_1d(n, k)
        prepared = ppl_em.prepare(flat_mixture_1d(x, k), mode="mle", backend=backend)
        u0 = _u0(prepared, start_1d(k))
        ppl_per_iter(prepared, u0, 1)  # compile and warm up
        repeat, iters = (3, 2) if n >= 10**7 else (11, 5)
        t_ppl, t_sk = alternated(
            partial(ppl_per_iter, prepared, u0, repeat),
            partial(sklearn_per_iter, x[:, None], start_1d(k), iters),
        )
        rows.append([n, k, 1, backend, t_ppl * 1e3, t_sk * 1e3, t_sk / t_ppl])
    return rows


def converge_rows(ns: list[int]) -> list[list]:
    rows = []
    for n in ns:
        x = gaussian_1d(n)
        X = x[:, None]
        repeat = 3 if n <= 10**5 else 1
        t_sk, gm = best_threads(
            lambda X=X, r=repeat: timed(lambda: sklearn_model(START_1D, 10000, SK_TOL).fit(X), r)
        )
        sk_ll = gm.score(X) * n
        prepared = ppl_em.prepare(flat_mixture_1d(x, 3), mode="mle")
        u0 = _u0(prepared, START_1D)
        em_init(prepared.functions, u0, prepared.config)  # compile
        tol = SK_TOL / abs(sk_ll / n)
        for acc in (None, "squarem"):
            t, run = timed(
                lambda p=prepared, u=u0, tol=tol, acc=acc: run_em(
                    *p, u, max_iter=10000, tol=tol, accelerate=acc
                ),
                5,  # a few tenths of a second each: the median of 5 steadies the ratio
            )
            ll = run.state.loglik
            rows.append([n, acc or "plain", run.n_estep, gm.n_iter_, t, t_sk, t_sk / t, ll - sk_ll])
    return rows


def _mvn_model(x: np.ndarray, k: int) -> pm.Model:
    """Full-covariance K-component MvNormal mixture, Cholesky factors from flat parameters.

    One ``MvNormal.dist`` per component: each then solves with one Cholesky factor for
    all N rows (indexing factors by a label would make N of them).
    """
    d = x.shape[1]
    rows, cols = np.tril_indices(d, -1)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Flat("mu", shape=(k, d))
        sd = pm.HalfFlat("sd", shape=(k, d))
        off = pm.Flat("off", shape=(k, len(rows)))
        chol = pt.zeros((k, d, d))
        chol = pt.set_subtensor(chol[:, np.arange(d), np.arange(d)], sd)
        chol = pt.set_subtensor(chol[:, rows, cols], off)
        comps = [pm.MvNormal.dist(mu=mu[j], chol=chol[j]) for j in range(k)]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def full_cov_rows(ns: list[int], d: int = 4, k: int = 3, backend: str = "auto") -> list[list]:
    rows = []
    for n in ns:
        rng = np.random.default_rng(1)
        centres = rng.normal(scale=4.0, size=(k, d))
        z = rng.integers(0, k, size=n)
        x = centres[z] + rng.normal(size=(n, d))
        start = {
            "w": np.full(k, 1.0 / k),
            "mu": centres + 0.5,
            "sd": np.full((k, d), 1.5),
            "off": np.zeros((k, d * (d - 1) // 2)),
        }
        prepared = ppl_em.prepare(_mvn_model(x, k), mode="mle", backend=backend)
        u0 = _u0(prepared, start)
        ppl_per_iter(prepared, u0, 2)  # compile and warm up
        # Up to 10^5, both over 30 iterations from the start: over 7, the medians of
        # one code varied 1.1-2.1 ms at N=10^4 from run to run (benchmarks/README.md).
        sk_start = {"w": start["w"], "mu": start["mu"], "cov": np.tile(np.eye(d) * 2.25, (k, 1, 1))}
        repeat, iters = (3, 2) if n >= 10**6 else (30, 30)
        t_ppl, t_sk = alternated(partial(ppl_per_iter, prepared, u0, repeat),
                                 partial(sklearn_per_iter, x, sk_start, iters))  # fmt: skip
        rows.append([n, k, d, backend, t_ppl * 1e3, t_sk * 1e3, t_sk / t_ppl])
    return rows


def main(quick: bool = False) -> str:
    warnings.filterwarnings("ignore")
    ns = [10**4, 10**5, 10**6] if quick else [10**4, 10**5, 10**6, 10**7]
    # backend="auto" runs small graphs on NumPy-backed Ops (no C compilation); the "c"
    # rows show what compiling them buys per iteration.
    per_iter = per_iteration_rows(ns) + per_iteration_rows([10**4], backend="c")
    by_k = per_iteration_rows([10**5], k=2) + per_iteration_rows([10**5], k=5)
    by_k += per_iteration_rows([10**5], k=8)
    full = full_cov_rows([10**4, 10**5] if quick else [10**4, 10**5, 10**6])
    full += full_cov_rows([10**4], backend="c")
    full += full_cov_rows([10**5], d=2) + full_cov_rows([10**5], d=8)
    conv = converge_rows([10**4, 10**5] if quick else [10**4, 10**5, 10**6])
    head = ["N", "K", "D", "backend", "ppl_em ms/iter", "sklearn ms/iter", "speed-up"]
    body = "## Time per EM iteration (1-D, K=3)\n\n" + markdown_table(head, per_iter)
    body += "\n\n## Time per iteration against K (1-D, N=10^5)\n\n" + markdown_table(head, by_k)
    body += (
        "\n\n## Full covariance, K=3 (ppl_em: closed-form MvNormal block, mode='mle')\n\n"
        + markdown_table(head, full)
    )
    body += (
        f"\n\n## Time to convergence (1-D, K=3, sklearn tol={SK_TOL} on mean loglik)\n\n"
        + markdown_table(
            ["N", "ppl_em", "E-steps", "sklearn iters", "ppl_em s", "sklearn s", "speed-up",
             "loglik(ppl_em) - loglik(sklearn)"],
            conv,
        )
    )  # fmt: skip
    write_report("sklearn", "ppl_em vs scikit-learn GaussianMixture", body)
    auto = [r for r in per_iter if r[3] == "auto"]
    plot_lines(
        "sklearn_per_iteration",
        [r[0] for r in auto],
        {"ppl_em": [r[4] for r in auto], "sklearn": [r[5] for r in auto]},
        "N (1-D, K=3)",
        "ms per EM iteration",
    )
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
