"""ppl_em's point estimate against PyMC's own tools on the same marginalised model.

Models: 1-D ``pm.NormalMixture``, K=3, Dirichlet(1) weights, and either flat priors on
means and scales (every M-step update closed-form) or Normal(0, 10) means and
HalfNormal(5) scales (no conjugate update, so ppl_em's M-step is closed-form for the
weights and Newton's method on Q written in the E-step's sums for the rest). Compared:

- ``pm.find_MAP`` (L-BFGS-B on the marginal log posterior, the same objective) from the
  same start, default settings;
- NUTS (``pm.sample``, 2 chains x (1000 tune + 1000 draws)), whose cost is what a
  Bayesian would otherwise pay for a point summary.

Accuracy: the objective reached, against the best of all methods. EM times are the
median of 3 runs after ``prepare`` (shown on its own row); ``find_MAP`` and NUTS include
their own compilation with a warm compile cache.

Run: ``python -m benchmarks.bench_pymc [--quick]`` from the repository root.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pymc as pm

import ppl_em
from benchmarks._common import (
    START_1D,
    gaussian_1d,
    markdown_table,
    objective_at,
    timed,
    write_report,
)
from ppl_em.em import apply_start, em_init, run_em


def model_1d(x: np.ndarray) -> pm.Model:
    """Normal(0, 10) means and HalfNormal(5) scales: Newton on Q from the statistics."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Normal("mu", 0.0, 10.0, shape=3)
        sigma = pm.HalfNormal("sigma", 5.0, shape=3)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model


def model_1d_flat(x: np.ndarray) -> pm.Model:
    """Flat means and scales: every update closed-form (the MAP is the MLE)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Flat("mu", shape=3)
        sigma = pm.HalfFlat("sigma", shape=3)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model


def rows_for(n: int, nuts: bool, builder=model_1d) -> list[list]:
    x = gaussian_1d(n, seed=5)
    model = builder(x)
    label = "flat priors, closed form" if builder is model_1d_flat else "Normal/HalfNormal priors"
    t_prep, prepared = timed(lambda: ppl_em.prepare(model))
    f = prepared.functions
    u0 = apply_start(f, START_1D, np.zeros(f.layout.size))
    em_init(f, u0, prepared.config)  # compile before timing the iterations
    out = {}
    for acc in (None, "squarem"):
        t, run = timed(lambda acc=acc: run_em(*prepared, u0, tol=1e-10, accelerate=acc), repeat=3)
        out[f"EM ({acc or 'plain'})"] = (t, run.state.objective, run.n_estep)
    # backend="c" compiles every function to C (slower cold start, faster per call).
    prepared_c = ppl_em.prepare(model, backend="c")
    run_em(*prepared_c, u0, max_iter=2)  # compile before timing
    t, run = timed(lambda: run_em(*prepared_c, u0, tol=1e-10), repeat=3)
    out["EM (plain, backend='c')"] = (t, run.state.objective, run.n_estep)
    with model:
        t, point = timed(lambda: pm.find_MAP(start=START_1D, progressbar=False))
    out["pm.find_MAP"] = (t, objective_at(prepared, point), "")
    if nuts:
        with model:
            t, _ = timed(
                lambda: pm.sample(
                    1000, tune=1000, chains=2, cores=1, initvals=START_1D, random_seed=1,
                    progressbar=False, compute_convergence_checks=False,
                )
            )  # fmt: skip
        out["NUTS 2x2000"] = (t, float("nan"), "")
    best = max(v[1] for v in out.values() if np.isfinite(v[1]))
    em_time = out["EM (plain)"][0]
    rows = [
        [label, n, name, t, t / em_time, obj - best if np.isfinite(obj) else "n/a", steps]
        for name, (t, obj, steps) in out.items()
    ]
    rows.append([label, n, "ppl_em.prepare (once)", t_prep, t_prep / em_time, "", ""])
    return rows


def main(quick: bool = False) -> str:
    warnings.filterwarnings("ignore")
    logger = __import__("logging").getLogger("pymc")
    logger.setLevel("ERROR")
    rows = rows_for(1000, nuts=True, builder=model_1d_flat) + rows_for(1000, nuts=True)
    if not quick:
        rows += rows_for(10**5, nuts=False, builder=model_1d_flat)
        rows += rows_for(10**5, nuts=False)
    head = ["model", "N", "method", "seconds", "x EM time", "objective - best", "E-steps"]
    body = markdown_table(head, rows)
    write_report("pymc", "ppl_em vs pm.find_MAP and NUTS (same model, same start)", body)
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
