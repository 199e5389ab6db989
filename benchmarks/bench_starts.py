"""How good is the default start? The gap to the best of 20 starts, and to scikit-learn.

For each problem: the log-likelihood of ``ppl_em.fit`` with the default start
(``n_init=1``: k-means++ and Lloyd on standardised features, then one exact M-step), the
best over 20 starts (``n_init=20``), and, for Gaussian problems, scikit-learn's
``GaussianMixture`` with its default k-means initialisation, all to the same tolerance.
The gaps are in nats of log-likelihood (0 means the default start found the best
optimum seen).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pymc as pm
from sklearn.mixture import GaussianMixture

import ppl_em
from benchmarks._common import markdown_table, write_report

TOL = {"mode": "mle", "tol": 1e-12, "progressbar": False}


def k10_1d(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 10, n)
    return rng.normal(6.0 * z, 1.0 + 0.1 * z)[:, None]


def faithful_like(n=272, seed=1):
    """Two clusters whose features differ in scale by about 20x (eruption minutes,
    waiting minutes), as in the Old Faithful data."""
    rng = np.random.default_rng(seed)
    z = rng.random(n) < 0.35
    dur = np.where(z, rng.normal(2.0, 0.25, n), rng.normal(4.3, 0.4, n))
    wait = np.where(z, rng.normal(54.5, 6.0, n), rng.normal(80.0, 6.0, n)) + 5.0 * (dur - 3)
    return np.column_stack([dur, wait])


def contaminated(n=1000, seed=2):
    rng = np.random.default_rng(seed)
    wide = rng.random(n) < 0.1
    return np.where(wide, rng.standard_t(2, n) * 5.0, rng.normal(0.0, 1.0, n))


def gaussian_model(x, k):
    d = x.shape[1]
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        if d == 1:
            mu = pm.Flat("mu", shape=k)
            sigma = pm.HalfFlat("sigma", shape=k)
            pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x[:, 0])
            return model
        mu = pm.Flat("mu", shape=(k, d))
        chols = [pm.LKJCholeskyCov(f"c{j}", n=d, eta=1.0, sd_dist=pm.HalfFlat.dist(),
                                   compute_corr=False) for j in range(k)]  # fmt: skip
        comps = [pm.MvNormal.dist(mu=mu[j], chol=pm.expand_packed_triangular(d, chols[j]))
                 for j in range(k)]  # fmt: skip
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def normal_t_model(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 100, shape=2)
        sigma = pm.HalfNormal("sigma", 100, shape=2)
        comps = [pm.Normal.dist(mu[0], sigma[0]), pm.StudentT.dist(nu=2, mu=mu[1], sigma=sigma[1])]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def _fit(model, n_init):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = ppl_em.fit(model, n_init=n_init, random_seed=0, **TOL)
    return res.loglik, time.perf_counter() - t0


def _sklearn(x, k):
    gm = GaussianMixture(k, tol=1e-10, max_iter=5000, reg_covar=0.0, random_state=0).fit(x)
    return gm.score(x) * x.shape[0]


def rows() -> list[list]:
    problems = [
        ("1-D, K=10, N=5000", lambda: gaussian_model(k10_1d(), 10), k10_1d(), 10),
        ("2-D, K=2, scales 1:20 (Faithful-like)", lambda: gaussian_model(faithful_like(), 2),
         faithful_like(), 2),
        ("Normal + Student-t(2) contamination", lambda: normal_t_model(contaminated()),
         None, 2),
    ]  # fmt: skip
    out = []
    for name, build, x, k in problems:
        default, t1 = _fit(build(), 1)
        best, t20 = _fit(build(), 20)
        sk = _sklearn(x, k) if x is not None else float("nan")
        out.append([name, default, best, best - default, sk, sk - default, t1, t20])
    return out


def main(quick: bool = False) -> str:
    table = rows()
    head = ["problem", "default loglik", "best of 20", "gap (nats)", "sklearn k-means",
            "sklearn - default", "s (default)", "s (20 starts)"]  # fmt: skip
    body = markdown_table(head, table)
    write_report("starts", "Default start against the best of 20 starts", body)
    return body


if __name__ == "__main__":
    print(main())
