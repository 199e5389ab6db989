"""Poisson and logistic regression components: the exact Hessian of Q (IRLS) against
differences of Q's compiled gradient, and fits against SciPy on the marginal log
posterior written by hand."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy.optimize import minimize
from scipy.special import expit, gammaln, log_expit, logsumexp
from scipy.stats import norm

import ppl_em
from ppl_em.em import default_start
from ppl_em.steps.estep import q_and_grad
from ppl_em.steps.glm import glm_hessian
from ppl_em.steps.mstep import expectations_from_resp

PRIOR_SD = 5.0


def _data(family: str, n: int = 600, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, n)
    first = rng.random(n) < 0.4
    eta = np.where(first, 0.5 + 1.2 * x, 1.5 - 0.8 * x)
    if family == "poisson":
        return x, rng.poisson(np.exp(eta))
    # opposite slopes make P(y = 1 | x) rise then fall, which no single logistic
    # regression fits: one 0/1 answer per observation then identifies the mixture
    return x, (rng.random(n) < expit(np.where(first, 1.0 + 4.0 * x, 1.0 - 4.0 * x))).astype(int)


def _model(family: str, x, y, prior=pm.Normal) -> pm.Model:
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = prior("b", 0.0, PRIOR_SD, shape=2) if prior is pm.Normal else prior("b", shape=2)
        z = pm.Categorical("z", p=w, shape=x.size)
        eta = a[z] + b[z] * x
        if family == "poisson":
            pm.Poisson("y", mu=pt.exp(eta), observed=y)
        else:
            pm.Bernoulli("y", logit_p=eta, observed=y)
    return model


def _rows(family: str, x, y, a, b):
    eta = a[None, :] + b[None, :] * x[:, None]
    if family == "poisson":
        return y[:, None] * eta - np.exp(eta) - gammaln(y + 1.0)[:, None]
    return np.where(y[:, None] == 1, log_expit(eta), log_expit(-eta))


def _scipy_map(family: str, x, y, start: np.ndarray):
    """The marginal log posterior (Normal(0, 5) coefficients, Dirichlet(1, 1) weights,
    whose density is 1; no Jacobian: find_MAP's objective) maximised by BFGS."""

    def negative(theta):
        a, b, t = theta[:2], theta[2:4], theta[4]
        logw = np.array([log_expit(-t), log_expit(t)])
        ll = logsumexp(logw[None, :] + _rows(family, x, y, a, b), axis=1).sum()
        return -(ll + norm.logpdf(theta[:4], 0.0, PRIOR_SD).sum())

    found = minimize(negative, start, method="BFGS", options={"gtol": 1e-9})
    return found.x, -found.fun


@pytest.mark.parametrize("family", ["poisson", "bernoulli"])
def test_exact_hessian_equals_differences_of_the_compiled_gradient(family):
    x, y = _data(family)
    functions, config = ppl_em.prepare(_model(family, x, y))
    assert [b.family for b in config.plan.glm] == [f"{family}_glm"]
    mask = config.numeric_mask
    gamma = np.random.default_rng(1).dirichlet(np.ones(2), size=x.size)
    batches = expectations_from_resp(functions, config, gamma).batches
    u = default_start(functions, config, None) + np.random.default_rng(2).normal(0, 0.1, mask.size)

    def evaluate(sub):
        full = u.copy()
        full[mask] = sub
        q, grad = q_and_grad(functions, full, batches())
        return q, grad[mask]

    # central differences of the compiled gradient: error O(h^2), about 1e-8 here
    h, sub = 1e-4, u[mask]
    columns = [(evaluate(sub + h * e)[1] - evaluate(sub - h * e)[1]) / (2 * h)
               for e in np.eye(sub.size)]  # fmt: skip
    reference = np.stack(columns, axis=1)
    np.testing.assert_allclose(glm_hessian(config.glm, u, mask, batches), reference,
                               rtol=1e-6, atol=1e-7 * np.abs(reference).max())  # fmt: skip


@pytest.mark.parametrize(
    "family, accelerate", [("poisson", "auto"), ("bernoulli", "auto"), ("bernoulli", "squarem")]
)
def test_regression_mixture_fit_matches_scipy_on_the_marginal_posterior(family, accelerate):
    x, y = _data(family, n=1500)
    fit = ppl_em.fit(_model(family, x, y), progressbar=False, tol=1e-10, accelerate=accelerate)
    assert fit.converged
    if family == "bernoulli" and accelerate == "auto":
        # The logistic mixture's posterior is flat along the slopes (posterior sd about
        # 0.5), where EM alone (accelerate=None) took 1109 iterations and SQUAREM 230:
        # L-BFGS on the marginal posterior takes over once EM crawls.
        assert fit.n_iter < 100
    # SciPy starts at EM's estimate with component 1 first, w as its log-odds
    start = np.r_[fit.params["a"], fit.params["b"], np.log(fit.params["w"][1] / fit.params["w"][0])]
    theta, best = _scipy_map(family, x, y, start)
    assert fit.log_posterior == pytest.approx(best, abs=1e-6)
    # within 1e-3: a few thousandths of a posterior sd on the slopes
    np.testing.assert_allclose(np.r_[fit.params["a"], fit.params["b"]], theta[:4], atol=1e-3)


def test_irls_and_finite_difference_newton_reach_the_same_optimum():
    x, y = _data("poisson")
    model = _model("poisson", x, y)
    irls = ppl_em.fit(model, progressbar=False, tol=1e-10)
    numeric = ppl_em.fit(model, progressbar=False, tol=1e-10, mstep="numeric")
    assert irls.log_posterior == pytest.approx(numeric.log_posterior, abs=1e-7)
    for name in ("a", "b", "w"):
        np.testing.assert_allclose(irls.params[name], numeric.params[name], atol=1e-5)


def test_transformed_coefficients_keep_finite_differences():
    """A coefficient with a positive prior is fitted on its log: not linear in eta."""
    x, y = _data("poisson")
    _, config = ppl_em.prepare(_model("poisson", x, y, prior=pm.HalfFlat))
    assert config.plan.glm == () and config.glm == ()
    assert "inverse link of a linear predictor" in config.plan.reasons["a"]


def test_a_run_cut_short_at_any_iteration_ends_unconverged_with_a_warning():
    """``max_iter`` can end a run right after a marginal ascent, when EM has not yet
    measured a step since: the run ends unconverged, with the warning, below the full
    run's optimum (it once raised an IndexError reading two objectives after the
    ascent)."""
    x, y = _data("bernoulli", n=1500)
    model = _model("bernoulli", x, y)
    prepared = ppl_em.prepare(model)
    full = ppl_em.fit(model, prepared=prepared, progressbar=False, tol=1e-10)
    assert full.converged
    for max_iter in range(1, full.n_iter - 1):
        with pytest.warns(ppl_em.ConvergenceWarning, match=f"max_iter={max_iter} "):
            short = ppl_em.fit(model, prepared=prepared, progressbar=False, tol=1e-10,
                               max_iter=max_iter)  # fmt: skip
        assert not short.converged
        assert short.log_posterior <= full.log_posterior + 1e-9
