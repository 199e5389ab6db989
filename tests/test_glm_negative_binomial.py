"""Negative-binomial regression components (``mu = exp(a[z] + b[z] x)``, the dispersion
free per component or shared, fitted on its log, or known): the exact Hessian of Q in
the coefficients and log dispersions against differences of Q's compiled gradient,
Newton against the numeric M-step, the start's Newton, and fits against SciPy on the
marginal log posterior written by hand."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy.optimize import minimize
from scipy.special import digamma, log_expit, logsumexp, polygamma
from scipy.stats import gamma as gamma_dist
from scipy.stats import nbinom, norm

import ppl_em
from ppl_em.em import default_start
from ppl_em.steps import newton as newton_module
from ppl_em.steps.estep import q_and_grad, whole_data
from ppl_em.steps.glm import glm_hessian, known, polygamma_differences
from ppl_em.steps.mstep import expectations_from_resp, m_step_from_resp, make_mstep_config
from tests.conftest import assert_same_params
from tests.test_glm import PRIOR_SD, _mixture_of

DISPERSIONS = {
    "gamma": lambda: pm.Gamma("alpha", 2.0, 0.5, shape=2),
    "halfnormal_shared": lambda: pm.HalfNormal("alpha", 10.0),
    "lognormal": lambda: pm.LogNormal("alpha", 1.0, 1.0, shape=2),
    "halfcauchy_shared": lambda: pm.HalfCauchy("alpha", 5.0),
    "halfflat": lambda: pm.HalfFlat("alpha", shape=2),
    "known": lambda: pt.as_tensor(np.array([2.0, 5.0])),
    "known_scalar": lambda: 3.0,  # PyMC makes a constant of it at each use
}


def _nb_data(n: int = 600, seed: int = 5):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, n)
    first = rng.random(n) < 0.4
    mu = np.exp(np.where(first, 0.5 + 1.2 * x, 1.5 - 0.8 * x))
    alpha = np.where(first, 2.0, 5.0)
    return x, rng.negative_binomial(alpha, alpha / (alpha + mu))


def _nb_model(x, y, dispersion: str = "gamma", form: str = "label") -> pm.Model:
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = pm.Normal("b", 0.0, PRIOR_SD, shape=2)
        alpha = DISPERSIONS[dispersion]()

        def component(eta, k):
            each = np.ndim(alpha) == 1 and k is not None
            return pm.NegativeBinomial, {"mu": pt.exp(eta), "alpha": alpha[k] if each else alpha}

        _mixture_of(form, w, x, a, b, component, y)
    return model


@pytest.fixture(scope="module")
def nb_prepared():
    """``prepare`` of :func:`_nb_model` on :func:`_nb_data` by dispersion and mode, once
    per module: the Hessian, Newton, start and optimum tests share the compiled model. Their Q
    is called at most 327 times in all, under ``SWITCH_CALLS``: none switches to C, so
    the tests' order does not change their arithmetic."""
    cache = {}

    def get(dispersion: str, mode: str):
        if (dispersion, mode) not in cache:
            x, y = _nb_data()
            cache[dispersion, mode] = ppl_em.prepare(_nb_model(x, y, dispersion), mode=mode)
        return cache[dispersion, mode]

    return get


def _compiled_hessian(functions, u, mask, batches):
    """Central differences of Q's compiled gradient over ``u[mask]``: error O(h^2)."""

    def gradient(sub):
        full = u.copy()
        full[mask] = sub
        return q_and_grad(functions, full, batches())[1][mask]

    h, sub = 1e-4, u[mask]
    columns = [(gradient(sub + h * e) - gradient(sub - h * e)) / (2 * h)
               for e in np.eye(sub.size)]  # fmt: skip
    return np.stack(columns, axis=1)


@pytest.mark.parametrize(
    "dispersion, mode",
    [("gamma", "map"), ("gamma", "mle"), ("halfnormal_shared", "map"), ("lognormal", "map"),
     ("halfcauchy_shared", "map"), ("halfflat", "map"), ("known", "map"), ("known_scalar", "map")],
)  # fmt: skip
def test_negative_binomial_hessian_equals_differences_of_the_compiled_gradient(
    dispersion, mode, nb_prepared
):
    """Coefficients and log dispersion together, cross terms included."""
    x, _ = _nb_data()
    functions, config = nb_prepared(dispersion, mode)
    assert [b.family for b in config.plan.glm] == ["negative_binomial_glm"]
    mask = config.numeric_mask
    assert known(config.glm, mask) is not None and known(config.glm, mask).all()
    gamma = np.random.default_rng(1).dirichlet(np.ones(2), size=x.size)
    batches = expectations_from_resp(functions, config, gamma).batches
    u = default_start(functions, config, None) + np.random.default_rng(2).normal(0, 0.1, mask.size)
    reference = _compiled_hessian(functions, u, mask, batches)
    exact = glm_hessian(config.glm, u, mask, batches)
    if not dispersion.startswith("known"):
        # the coefficients' cross terms with log alpha are not zero away from Q's maximum
        assert np.abs(exact[:-1, -1]).max() > 1.0
    np.testing.assert_allclose(exact, reference, rtol=1e-6, atol=1e-7 * np.abs(reference).max())


@pytest.mark.parametrize("dispersion", ["gamma", "halfnormal_shared"])
def test_negative_binomial_newton_reaches_the_numeric_maximiser_of_q(
    dispersion, monkeypatch, nb_prepared
):
    """One exact M-step from the same responsibilities: Newton with the hand-written
    Hessian (no finite-difference column taken) and the finite-difference numeric step
    reach the same maximiser of Q."""
    x, _ = _nb_data()
    functions, auto = nb_prepared(dispersion, "map")
    exact = make_mstep_config(functions, auto.plan, "auto", grad_reduction=0.0)
    numeric = make_mstep_config(functions, auto.plan, "numeric", grad_reduction=0.0)
    assert numeric.glm == ()
    gamma = np.random.default_rng(4).dirichlet(np.ones(2), size=x.size)
    u0 = default_start(functions, numeric, rng=None)

    def no_differences(*args, **kwargs):
        raise AssertionError("a finite-difference Hessian column was taken")

    with monkeypatch.context() as patch:
        patch.setattr(newton_module, "_columns", no_differences)
        ua = m_step_from_resp(functions, exact, u0, gamma)
    ub = m_step_from_resp(functions, numeric, u0, gamma)
    assert_same_params(functions, ua, ub, rtol=2e-6, atol=1e-8)
    batches = [(np.ascontiguousarray(gamma.T), whole_data(functions))]
    qa, qb = (q_and_grad(functions, u, batches)[0] for u in (ua, ub))
    assert qa >= qb - 1e-9 * abs(qb)


def _nb_scipy_map(x, y, start: np.ndarray):
    """The marginal log posterior of the "gamma" model (Normal(0, 5) coefficients,
    Gamma(2, rate 0.5) dispersions at alpha, no Jacobian: find_MAP's objective), over
    (a, b, log alpha, log-odds of w), maximised by BFGS."""

    def negative(theta):
        a, b, alpha, t = theta[:2], theta[2:4], np.exp(theta[4:6]), theta[6]
        mu = np.exp(a[None, :] + b[None, :] * x[:, None])
        rows = nbinom.logpmf(y[:, None], alpha[None, :], alpha / (alpha + mu))
        logw = np.array([log_expit(-t), log_expit(t)])
        ll = logsumexp(logw[None, :] + rows, axis=1).sum()
        prior = (
            norm.logpdf(theta[:4], 0.0, PRIOR_SD).sum()
            + gamma_dist.logpdf(alpha, 2.0, scale=2.0).sum()
        )
        return -(ll + prior)

    found = minimize(negative, start, method="BFGS", options={"gtol": 1e-9})
    return found.x, -found.fun


@pytest.mark.parametrize("form", ["label", "batched", "list"])
def test_negative_binomial_fit_matches_scipy_on_the_marginal_posterior(form):
    x, y = _nb_data(n=1500)
    fit = ppl_em.fit(_nb_model(x, y, form=form), progressbar=False, tol=1e-10)
    assert fit.converged
    assert [b.family for b in fit.prepared.config.plan.glm] == ["negative_binomial_glm"]
    p = fit.params
    start = np.r_[p["a"], p["b"], np.log(p["alpha"]), np.log(p["w"][1] / p["w"][0])]
    theta, best = _nb_scipy_map(x, y, start)
    assert fit.log_posterior == pytest.approx(best, abs=1e-6)
    np.testing.assert_allclose(np.r_[p["a"], p["b"]], theta[:4], atol=1e-3)
    np.testing.assert_allclose(np.log(p["alpha"]), theta[4:6], atol=1e-3)


def test_negative_binomial_exact_and_finite_difference_newton_reach_the_same_optimum(
    nb_prepared,
):
    x, y = _nb_data()
    model = _nb_model(x, y, "halfnormal_shared")
    exact = ppl_em.fit(prepared=nb_prepared("halfnormal_shared", "map"), progressbar=False,
                       tol=1e-10)  # fmt: skip
    numeric = ppl_em.fit(model, progressbar=False, tol=1e-10, mstep="numeric")
    assert exact.log_posterior == pytest.approx(numeric.log_posterior, abs=1e-7)
    for name in ("a", "b", "alpha", "w"):
        np.testing.assert_allclose(exact.params[name], numeric.params[name], atol=1e-5)


def _nb_unsupported(x, y, case: str) -> pm.Model:
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = pm.Normal("b", 0.0, PRIOR_SD, shape=2)
        z = pm.Categorical("z", p=w, shape=x.size)
        if case == "reciprocal":
            alpha = 1.0 / pm.HalfNormal("phi", 1.0, shape=2)[z]
        elif case == "weibull_prior":
            alpha = pm.Weibull("alpha", 2.0, 5.0, shape=2)[z]
        elif case == "untransformed":
            alpha = pm.HalfNormal("alpha", 10.0, shape=2, default_transform=None)[z]
        else:  # the dispersion also enters a potential
            raw = pm.HalfNormal("alpha", 10.0, shape=2)
            pm.Potential("tie", -((raw[0] - raw[1]) ** 2))
            alpha = raw[z]
        pm.NegativeBinomial("y", mu=pt.exp(a[z] + b[z] * x), alpha=alpha, observed=y)
    return model


@pytest.mark.parametrize("case", ["reciprocal", "weibull_prior", "untransformed", "potential"])
def test_negative_binomial_dispersion_it_cannot_read_keeps_finite_differences(case):
    """Where alpha enters otherwise than as a plain log-transformed variable with a prior
    the curvature knows, no exact Hessian: the numeric step's finite differences."""
    x, y = _nb_data()
    _, config = ppl_em.prepare(_nb_unsupported(x, y, case))
    assert config.plan.glm == () and config.glm == ()
    assert known(config.glm, config.numeric_mask) is None


@pytest.mark.parametrize("alpha", [0.3, 2.0, 50.0])
def test_tabulated_polygamma_differences_of_counts_equal_scipy(alpha):
    y = np.random.default_rng(6).negative_binomial(2.0, 0.2, 500).astype(float)
    psi, psi1 = polygamma_differences(y, alpha)
    np.testing.assert_allclose(psi, digamma(y + alpha) - digamma(alpha), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(psi1, polygamma(1, y + alpha) - polygamma(1, alpha), rtol=1e-10,
                               atol=1e-14)  # fmt: skip
    # values that are not counts take the special functions
    psi, _ = polygamma_differences(y + 0.5, alpha)
    np.testing.assert_allclose(psi, digamma(y + 0.5 + alpha) - digamma(alpha), rtol=1e-14)


def test_the_starts_newton_stops_at_its_first_decrement_below_start_decrement(
    monkeypatch, nb_prepared
):
    """The start's Newton (its M-step from the partition) runs until its decrement (the
    standard errors, under Q, to Q's maximum) is below ``START_DECREMENT``, not the
    1e-12 of EM's exact M-steps: beyond it, at N=10^5, each step chases the rounding of
    Q's gradient, at a Hessian and a gradient over the data. The start is Q's maximiser
    all the same: on Q written by hand (the negative binomial's log-probabilities
    weighted by the partition's responsibilities, the priors without Jacobian), SciPy's
    BFGS gains nothing from it and, from PyMC's initial point, ends there too."""
    from ppl_em.em import starts
    from ppl_em.steps import numeric

    x, y = _nb_data()
    functions, config = nb_prepared("gamma", "map")
    seen, tols = [], []
    direction, maximise = newton_module.newton_direction, numeric.newton_maximise

    def recorded(h, grad):
        step, decrement = direction(h, grad)
        seen.append(decrement)
        return step, decrement

    def told(*args):
        tols.append(args[5])
        return maximise(*args)

    with monkeypatch.context() as patch:
        patch.setattr(newton_module, "newton_direction", recorded)
        patch.setattr(numeric, "newton_maximise", told)
        u = default_start(functions, config, None)
    assert tols == [starts.START_DECREMENT] and starts.START_DECREMENT > 1e-12
    assert seen[-1] < starts.START_DECREMENT <= min(seen[:-1])
    k = functions.graph.n_components
    labels = starts.partition(starts.data_features(functions), k, None)
    gamma = starts.soft_responsibilities(labels, k)

    def negative_q(theta):
        a, b, alpha = theta[:2], theta[2:4], np.exp(theta[4:6])
        mu = np.exp(a[None, :] + b[None, :] * x[:, None])
        rows = nbinom.logpmf(y[:, None], alpha[None, :], alpha / (alpha + mu))
        prior = norm.logpdf(theta[:4], 0.0, PRIOR_SD).sum()
        prior += gamma_dist.logpdf(alpha, 2.0, scale=2.0).sum()
        return -(np.sum(gamma * rows) + prior)

    def theta(v):
        values = dict(zip(functions.layout.rv_names, functions.constrain(v), strict=True))
        return np.concatenate([values["a"], values["b"], np.log(values["alpha"])])

    ours = theta(u)
    polished = minimize(negative_q, ours, method="BFGS", options={"gtol": 1e-10})
    assert negative_q(ours) - polished.fun < 1e-9
    found = minimize(negative_q, theta(starts.initial_u(functions)), method="BFGS",
                     options={"gtol": 1e-10})  # fmt: skip
    np.testing.assert_allclose(ours, found.x, rtol=1e-5, atol=1e-6)
