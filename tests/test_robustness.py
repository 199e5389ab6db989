"""Degenerate fits: collapse, reg_covar, empty and identical components, warning flags."""

import warnings

import numpy as np
import pymc as pm
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp
from scipy.stats import invgamma, norm, poisson
from sklearn.mixture import GaussianMixture

import ppl_em
from ppl_em import diagnostics
from ppl_em.em import apply_start, run_em
from ppl_em.steps import joint
from tests.models_for_tests import coin_label

# 50 standard-normal points and one outlier: a 2-component Gaussian MLE started on the
# outlier puts a component on it alone, whose sigma then goes to 0.
X_OUT = np.r_[np.random.default_rng(0).normal(0.0, 1.0, 50), 7.0]
START_OUT = {"w": [0.9, 0.1], "mu": [0.0, 7.0], "sigma": [1.0, 0.5]}


def _gauss(x, sigma_prior):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = sigma_prior("sigma")
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return model


@pytest.fixture(scope="module")
def gauss_mle():
    model = _gauss(X_OUT, lambda n: pm.HalfNormal(n, 5.0, shape=2))
    return ppl_em.prepare(model, mode="mle")


@pytest.fixture(scope="module")
def gauss_invgamma():
    model = _gauss(X_OUT, lambda n: pm.InverseGamma(n, 2.0, 1.0, shape=2))
    return ppl_em.prepare(model, mode="map")


def numpy_gmm(x, w, mu, sd, reg=0.0, n_iter=2000):
    """Reference EM for a 1-D Gaussian mixture (MLE), reg added to each variance."""
    w, mu, sd = (np.array(v, dtype=float) for v in (w, mu, sd))
    for _ in range(n_iter):
        logp = np.log(w) + norm.logpdf(x[:, None], mu, sd)
        g = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        nk = g.sum(0)
        w, mu = nk / len(x), g.T @ x / nk
        sd = np.sqrt((g * (x[:, None] - mu) ** 2).sum(0) / nk + reg)
    return w, mu, sd


def test_collapse_in_mle_raises_naming_component_and_remedies(gauss_mle):
    with pytest.raises(ppl_em.CollapseError) as err:
        ppl_em.fit(start=START_OUT, prepared=gauss_mle, progressbar=False)
    msg = str(err.value)
    assert "component 1" in msg and "observation 50" in msg and "7.0" in msg
    assert "mode='map'" in msg and "reg_covar" in msg and "fewer components" in msg


def test_reg_covar_floors_variance_like_sklearn(gauss_mle):
    res = ppl_em.fit(
        start=START_OUT, prepared=gauss_mle, progressbar=False, reg_covar=1e-6, tol=1e-14
    )
    w, mu, sd = numpy_gmm(X_OUT, *START_OUT.values(), reg=1e-6)
    np.testing.assert_allclose(res.params["w"], w, atol=1e-8)
    np.testing.assert_allclose(res.params["mu"], mu, atol=1e-8)
    np.testing.assert_allclose(res.params["sigma"], sd, rtol=1e-7)
    gm = GaussianMixture(
        2,
        covariance_type="diag",
        reg_covar=1e-6,
        tol=1e-12,
        max_iter=2000,
        weights_init=START_OUT["w"],
        means_init=np.c_[START_OUT["mu"]],
        precisions_init=1 / np.c_[START_OUT["sigma"]] ** 2,
    ).fit(X_OUT[:, None])
    np.testing.assert_allclose(res.params["mu"], gm.means_.ravel(), atol=1e-7)
    np.testing.assert_allclose(res.params["sigma"], np.sqrt(gm.covariances_.ravel()), rtol=1e-6)
    # The outlier's component owns it alone: variance 0 + reg_covar exactly.
    assert res.params["sigma"][1] == pytest.approx(1e-3, rel=1e-6)
    assert res.diagnostics["collapsed_components"] == [] and res.diagnostics["issues"] == []


def test_reg_covar_refused_for_numeric_scales(gauss_invgamma):
    with pytest.raises(ValueError, match=r"only supported with the closed-form Normal.*'sigma'"):
        ppl_em.fit(prepared=gauss_invgamma, progressbar=False, reg_covar=1e-6)


def _neg_log_post(theta, x):
    """Marginal log posterior (no Jacobian) of the InverseGamma model, hand-written."""
    w1, mu, sd = 1 / (1 + np.exp(-theta[0])), theta[1:3], np.exp(theta[3:5])
    w = np.array([1 - w1, w1])
    ll = logsumexp(np.log(w) + norm.logpdf(x[:, None], mu, sd), axis=1).sum()
    prior = norm.logpdf(mu, 0, 10).sum() + invgamma.logpdf(sd, 2.0, scale=1.0).sum()
    return -(ll + prior)


def test_map_with_proper_prior_does_not_collapse(gauss_invgamma):
    res = ppl_em.fit(start=START_OUT, prepared=gauss_invgamma, progressbar=False, tol=1e-12)
    assert res.diagnostics["collapsed_components"] == []
    w, mu, sd = res.params["w"], res.params["mu"], res.params["sigma"]
    theta = np.r_[np.log(w[1] / w[0]), mu, np.log(sd)]
    ref = minimize(_neg_log_post, theta, args=(X_OUT,), method="BFGS", options={"gtol": 1e-9})
    np.testing.assert_allclose(theta, ref.x, atol=1e-4)
    assert -ref.fun == pytest.approx(res.log_posterior, abs=1e-6)
    # The lone point's sigma sits near the prior's pull b / (a + 2) = 0.25, far from 0.
    assert 0.2 < sd[1] < 0.3


def test_map_with_halfnormal_prior_still_collapses():
    # Without Jacobian a HalfNormal's log density is finite at sigma = 0: no protection.
    model = _gauss(X_OUT, lambda n: pm.HalfNormal(n, 5.0, shape=2))
    with pytest.raises(ppl_em.CollapseError, match=r"component 1 collapsed onto observation 50"):
        ppl_em.fit(model, start=START_OUT, mode="map", progressbar=False)


def test_restarts_skip_collapsed_run(gauss_mle):
    functions, config = gauss_mle
    # Every asymmetric start collapses on this data; the symmetric one stays put.
    symmetric = {"w": [0.5, 0.5], "mu": [0.0, 0.0], "sigma": [1.0, 1.0]}
    starts = [apply_start(functions, s, np.zeros(functions.layout.size))
              for s in (START_OUT, symmetric)]  # fmt: skip
    runs = [run_em(functions, config, u, max_iter=500) for u in starts]
    joints = [joint(functions, r.state.u) for r in runs]
    objectives = [r.state.objective for r in runs]
    assert objectives[0] > objectives[1] + 100  # the collapsed likelihood is far higher
    best, found = diagnostics.select_run(
        objectives, joints, [r.state.log_resp for r in runs], X_OUT[:, None]
    )
    assert best == 1 and found["collapsed_restarts"] == 1
    np.testing.assert_allclose(functions.constrain(runs[1].state.u)[2], X_OUT.std(), rtol=1e-10)


def test_symmetric_start_is_reported_as_identical(gauss_mle):
    start = {"w": [0.5, 0.5], "mu": [0.0, 0.0], "sigma": [1.0, 1.0]}
    res = ppl_em.fit(start=start, prepared=gauss_mle, progressbar=False)
    # Identical components are a fixed point: both become the pooled Gaussian MLE.
    np.testing.assert_allclose(res.params["mu"], [X_OUT.mean()] * 2, atol=1e-12)
    np.testing.assert_allclose(res.params["sigma"], [X_OUT.std()] * 2, rtol=1e-10)
    assert res.diagnostics["identical_components"] == [[0, 1]]
    assert res.diagnostics["n_distinct_components"] == 1


def test_coin_components_are_not_identified():
    x = np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2, 5, 2, 4, 4, 6, 4, 5, 6, 3, 3])
    start = {"w": [0.25, 0.5, 0.25], "p": [0.4, 0.5, 0.65]}
    res = ppl_em.fit(coin_label(x), start=start, progressbar=False)
    # The three biases all drift to the pooled MLE sum(x) / (10 N) = 0.415.
    np.testing.assert_allclose(res.params["p"], x.sum() / (10 * len(x)), atol=1e-3)
    assert res.diagnostics["identical_components"] == [[0, 1, 2]]
    assert res.diagnostics["n_distinct_components"] == 1
    assert any("identical" in s for s in res.diagnostics["issues"])


@pytest.fixture(scope="module")
def poisson2():
    rng = np.random.default_rng(3)
    x = np.r_[rng.poisson(2.0, 60), rng.poisson(15.0, 40)]
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 1.0, 0.01, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Poisson("x", mu=mu[z], observed=x)
    return x, ppl_em.prepare(model, mode="mle")


def numpy_poisson_em(x, w, mu, n_iter=3000):
    w, mu = np.array(w, dtype=float), np.array(mu, dtype=float)
    for _ in range(n_iter):
        logp = np.log(w) + poisson.logpmf(x[:, None], mu)
        g = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        w, mu = g.sum(0) / len(x), g.T @ x / g.sum(0)
    return w, mu


def test_empty_component_is_reported(poisson2):
    x, prepared = poisson2
    res = ppl_em.fit(
        start={"w": [0.5, 0.5], "mu": [6.0, 900.0]}, prepared=prepared, progressbar=False
    )
    assert res.diagnostics["empty_components"] == [1]
    assert res.diagnostics["n_distinct_components"] == 1
    # The one live component is the pooled Poisson MLE.
    assert res.params["mu"][0] == pytest.approx(x.mean(), rel=1e-10)
    assert res.params["w"][1] < 1e-100


def test_restarts_prefer_the_better_non_empty_fit(poisson2):
    x, prepared = poisson2
    bad = {"w": [0.5, 0.5], "mu": [6.0, 900.0]}
    res = ppl_em.fit(
        start=bad, prepared=prepared, n_init=4, random_seed=0, tol=1e-13, progressbar=False
    )
    assert res.objective > res.objectives_per_init[0] + 10
    assert res.diagnostics["empty_components"] == []
    w, mu = numpy_poisson_em(x, [0.5, 0.5], [2.0, 15.0])
    order = np.argsort(res.params["mu"])
    np.testing.assert_allclose(res.params["mu"][order], mu, rtol=1e-6)
    np.testing.assert_allclose(res.params["w"][order], w, atol=1e-7)


def test_non_convergence_flag_and_warning(poisson2):
    _, prepared = poisson2
    with pytest.warns(ppl_em.ConvergenceWarning, match="max_iter=2"):
        res = ppl_em.fit(prepared=prepared, max_iter=2, progressbar=False)
    assert not res.converged and not res.converged_ and res.n_iter == 2
    assert res.history.shape == (3,) and res.monotone


def test_non_monotone_flag_and_warning(gauss_mle):
    # A large reg_covar makes the update maximise something other than the likelihood,
    # so from the pooled MLE (a symmetric fixed point) the likelihood must go down.
    m, sd = X_OUT.mean(), X_OUT.std()
    start = {"w": [0.5, 0.5], "mu": [m, m], "sigma": [sd, sd]}
    with pytest.warns(ppl_em.NonMonotoneWarning):
        res = ppl_em.fit(start=start, prepared=gauss_mle, reg_covar=100.0, progressbar=False)
    assert not res.monotone and res.converged
    assert res.history[0] == pytest.approx(norm.logpdf(X_OUT, m, sd).sum(), rel=1e-12)
    floored = norm.logpdf(X_OUT, m, np.sqrt(sd**2 + 100.0)).sum()
    assert res.history[1] == pytest.approx(floored, rel=1e-12) and floored < res.history[0]


def test_diagnostics_pure_functions():
    log_resp = np.log(np.array([[0.5, 0.3, 0.2, 0.0], [0.25, 0.15, 0.6, 0.0]]) + 1e-320)
    assert diagnostics.empty_components(log_resp) == [3]
    # Columns 0 and 1 are proportional (ratio 5/3 on every row): identical components.
    assert diagnostics.identical_components(log_resp) == [(0, 1)]
    assert diagnostics.identical_groups([(0, 1), (1, 2)], 4) == [[0, 1, 2]]
    joint = np.log(np.array([[0.1, 1e30], [0.2, 1e-30]]))
    resp = joint - logsumexp(joint, axis=1, keepdims=True)
    # 69 nats above the data's own Gaussian: beyond float64 resolution, a point mass.
    assert diagnostics.collapsed_components(joint, resp, np.array([[0.0], [1.0]])) == [1]
    # One observation (no spread): a density 18 nats above the data's is sigma -> 0 ...
    one = np.array([[3.0]])
    assert diagnostics.collapsed_components(np.array([[16.0]]), np.zeros((1, 1)), one) == [0]
    # ... but a pmf (log <= 0) on repeated counts is bounded, not a collapse.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counts = np.array([[5.0], [5.0]])
        assert (
            diagnostics.collapsed_components(np.full((2, 1), -1.5), np.zeros((2, 1)), counts) == []
        )
