"""Models without a conjugate closed form, against ``pm.find_MAP`` at N = 10^5.

- Gaussian regression mixture (``models/regression_mixture.py``: Normal coefficients,
  HalfNormal scales): Newton on Q written in the E-step's statistics (weighted
  least-squares sums), against the same model on the numeric M-step over the data;
- Poisson and logistic regression mixtures (GLMs: ``mu = exp(a[z] + b[z] x)``,
  ``logit_p = a[z] + b[z] x``): Newton on Q over the data with its exact Hessian (IRLS),
  against the same model with a finite-difference Hessian (``mstep="numeric"``);
- negative-binomial regression mixture (``mu = exp(a[z] + b[z] x)``, Gamma dispersion per
  component): Newton on Q over the data with its exact Hessian in the coefficients and
  log dispersions, against the same EM with a finite-difference Hessian (before);
- stick-breaking weights, K = 20 (PyMC's example: Beta sticks, Normal means,
  HalfNormal scales) at N = 10^4.

For the two slow models (logistic, stick-breaking) a row also times EM stopped at the
first iteration whose objective reaches ``find_MAP``'s: the time to equal accuracy.

EM runs from its default start (k-means++ on standardised features and one exact
M-step) with default settings; ``pm.find_MAP`` runs on the marginalised model (the
label summed out by pymc-extras) from that same start, with its own compilation on a
warm cache. EM times are the median of 3 fits after ``prepare`` (its own row).

Run: ``python -m benchmarks.bench_regression [--quick]`` from the repository root.
"""

from __future__ import annotations

import sys
import warnings
from unittest import mock

import numpy as np
import pymc as pm
import pytensor.tensor as pt

import ppl_em
from benchmarks._common import markdown_table, objective_at, timed, write_report
from models import regression_mixture
from ppl_em.em import default_start
from ppl_em.inference.crosscheck import marginal_model
from ppl_em.steps import mstep as mstep_module


def poisson_regression(n: int) -> pm.Model:
    rng = np.random.default_rng(11)
    x = rng.uniform(-1.0, 1.0, n)
    y = rng.poisson(np.exp(np.where(rng.random(n) < 0.4, 0.5 + x, 2.0 - 0.5 * x)))
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Normal("alpha", 0.0, 5.0, shape=2)
        beta = pm.Normal("beta", 0.0, 5.0, shape=2)
        z = pm.Categorical("z", p=w, shape=n)
        pm.Poisson("y", mu=pt.exp(alpha[z] + beta[z] * x), observed=y)
    return model


def logistic_regression(n: int) -> pm.Model:
    """Opposite slopes, so that P(y = 1 | x) rises and falls and the mixture is identified
    from one 0/1 answer per observation."""
    rng = np.random.default_rng(13)
    x = rng.uniform(-1.5, 1.5, n)
    eta = np.where(rng.random(n) < 0.4, 1.0 + 4.0 * x, 1.0 - 4.0 * x)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(int)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Normal("alpha", 0.0, 5.0, shape=2)
        beta = pm.Normal("beta", 0.0, 5.0, shape=2)
        z = pm.Categorical("z", p=w, shape=n)
        pm.Bernoulli("y", logit_p=alpha[z] + beta[z] * x, observed=y)
    return model


def negative_binomial_regression(n: int) -> pm.Model:
    """Overdispersed counts: a Gamma(2, rate 0.5) dispersion per component, fitted on its
    log with the coefficients."""
    rng = np.random.default_rng(14)
    x = rng.uniform(-1.0, 1.0, n)
    first = rng.random(n) < 0.4
    mu = np.exp(np.where(first, 0.5 + x, 2.0 - 0.5 * x))
    dispersion = np.where(first, 2.0, 8.0)
    y = rng.negative_binomial(dispersion, dispersion / (dispersion + mu))
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Normal("alpha", 0.0, 5.0, shape=2)
        beta = pm.Normal("beta", 0.0, 5.0, shape=2)
        phi = pm.Gamma("phi", 2.0, 0.5, shape=2)
        z = pm.Categorical("z", p=w, shape=n)
        pm.NegativeBinomial("y", mu=pt.exp(alpha[z] + beta[z] * x), alpha=phi[z], observed=y)
    return model


def negative_binomial_rows(n: int) -> list:
    """EM against find_MAP (:func:`rows_for`), and EM as it was before the exact Hessian
    (``known`` patched to None: the same closed-form weights and start, Newton with a
    finite-difference Hessian over the six coefficients and log dispersions)."""
    label = "negative-binomial regression (GLM)"
    model = negative_binomial_regression(n)
    rows = rows_for(label, model, n, numeric=False)
    prepared = ppl_em.prepare(model)
    exact = ppl_em.fit(model, prepared=prepared, progressbar=False)
    with mock.patch.object(mstep_module, "known", lambda specs, mask: None):
        ppl_em.fit(model, prepared=prepared, progressbar=False, max_iter=2)
        t, old = timed(lambda: ppl_em.fit(model, prepared=prepared, progressbar=False), repeat=3)
    em_time, best = rows[0][3], exact.objective - rows[0][5]
    rows.insert(1, [label, n, "EM (finite-difference Hessian: before)", t, t / em_time,
                    old.objective - best, old.n_iter])  # fmt: skip
    return rows


def stick_breaking(n: int, k: int = 20) -> pm.Model:
    rng = np.random.default_rng(12)
    x = rng.normal(np.array([-4.0, 0.0, 3.0, 8.0])[rng.integers(0, 4, n)], 1.0)
    with pm.Model(coords={"component": range(k)}) as model:
        v = pm.Beta("v", 1.0, 2.0, dims="component")
        w = v * pt.concatenate([[1.0], pt.extra_ops.cumprod(1 - v)[:-1]])
        mu = pm.Normal("mu", 0.0, 10.0, dims="component")
        sigma = pm.HalfNormal("sigma", 5.0, dims="component")
        pm.NormalMixture("x", w=w / w.sum(), mu=mu, sigma=sigma, observed=x)
    return model


def rows_for(label: str, model: pm.Model, n: int, numeric: bool, slow: bool = False):
    """EM (and with ``numeric`` the numeric M-step) against find_MAP; a ``slow`` model is
    fitted once (no warm-up, no median), also with EM steps only and with SQUAREM, and
    up to find_MAP's objective."""
    t_prep, prepared = timed(lambda: ppl_em.prepare(model))
    f = prepared.functions
    start = dict(zip(f.layout.rv_names, f.constrain(default_start(f, prepared.config, None)),
                     strict=True))  # fmt: skip
    ppl_em.fit(model, prepared=prepared, progressbar=False, max_iter=2)  # compile first
    out = {}
    t, fit = timed(lambda: ppl_em.fit(model, prepared=prepared, progressbar=False),
                   repeat=1 if slow else 3)  # fmt: skip
    out["EM (default: accelerate='auto')"] = (t, fit.objective, fit.n_iter)
    history = np.asarray(fit.history)
    for accelerate in (None, "squarem") if slow else ():

        def fit_with(a=accelerate):
            return ppl_em.fit(model, prepared=prepared, progressbar=False, accelerate=a)

        t, other = timed(fit_with)
        out[f"EM (accelerate={accelerate!r})"] = (t, other.objective, other.n_iter)
    if numeric:
        generic = ppl_em.prepare(model, mstep="numeric")
        ppl_em.fit(model, prepared=generic, progressbar=False, max_iter=2)
        t, fit = timed(lambda: ppl_em.fit(model, prepared=generic, progressbar=False))
        out["EM (mstep='numeric')"] = (t, fit.objective, fit.n_iter)
    marg = marginal_model(model, fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, point = timed(lambda: pm.find_MAP(start=start, model=marg, progressbar=False))
    out["pm.find_MAP"] = (t, objective_at(prepared, point), "")
    if slow:
        # Equal accuracy: EM stopped at the first iteration that reaches find_MAP's
        # objective (its row shows the objective it stopped at).
        target = out["pm.find_MAP"][1]
        m = int(np.argmax(history >= target))
        if history[m] >= target:

            def upto(m=m):
                return ppl_em.fit(model, prepared=prepared, progressbar=False, max_iter=m)

            t, short = timed(upto)
            out["EM to find_MAP's objective"] = (t, short.objective, short.n_iter)
    best = max(v[1] for v in out.values())
    em_time = out["EM (default: accelerate='auto')"][0]
    rows = [[label, n, name, t, t / em_time, obj - best, steps]
            for name, (t, obj, steps) in out.items()]  # fmt: skip
    rows.append([label, n, "ppl_em.prepare (once)", t_prep, t_prep / em_time, "", ""])
    return rows


def main(quick: bool = False) -> str:
    warnings.filterwarnings("ignore")
    __import__("logging").getLogger("pymc").setLevel("ERROR")
    n = 10**4 if quick else 10**5
    data = regression_mixture.default_data(n=n, seed=7)
    rows = rows_for("Gaussian regression, Normal/HalfNormal priors",
                    regression_mixture.build_model(data), n, numeric=True)  # fmt: skip
    rows += rows_for("Poisson regression (GLM)", poisson_regression(n), n, numeric=True)
    rows += rows_for("logistic regression (GLM)", logistic_regression(n), n, numeric=True,
                     slow=True)  # fmt: skip
    rows += negative_binomial_rows(n)
    rows += rows_for("stick-breaking, K=20", stick_breaking(n // 10), n // 10, numeric=False,
                     slow=True)  # fmt: skip
    head = ["model", "N", "method", "seconds", "x EM time", "objective - best", "iterations"]
    body = markdown_table(head, rows)
    write_report("regression", "Models without a conjugate closed form vs pm.find_MAP", body)
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
