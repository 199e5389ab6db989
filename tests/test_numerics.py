"""Numerics: float32 data, extreme scales, variances spanning 16 decades, K=50, N=1."""

import numpy as np
import pymc as pm
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp
from scipy.stats import invgamma, norm

import ppl_em
from tests.models_for_tests import gaussian_label

RNG = np.random.default_rng(11)
BASE = np.r_[RNG.normal(-3.0, 0.5, 80), RNG.normal(2.0, 1.0, 120)]
START = {"w": [0.5, 0.5], "mu": [-2.0, 1.0], "sigma": [1.0, 1.0]}


def gauss(x, k=2):
    return gaussian_label(x, k=k)


def numpy_gmm(x, w, mu, sd, tol=1e-14, max_iter=5000):
    """Reference 1-D Gaussian-mixture EM (MLE), standardised so it works at any scale."""
    s = np.max(np.abs(x))
    x, mu, sd = x / s, np.asarray(mu) / s, np.asarray(sd) / s
    w, old = np.asarray(w, dtype=float), -np.inf
    for _ in range(max_iter):
        logp = np.log(w) + norm.logpdf(x[:, None], mu, sd)
        ll = logsumexp(logp, axis=1)
        g = np.exp(logp - ll[:, None])
        nk = g.sum(0)
        w, mu = nk / len(x), g.T @ x / nk
        sd = np.sqrt((g * (x[:, None] - mu) ** 2).sum(0) / nk)
        if abs(ll.sum() - old) < tol * abs(ll.sum()):
            break
        old = ll.sum()
    return w, mu * s, sd * s, ll.sum() - len(x) * np.log(s)


@pytest.fixture(scope="module")
def gauss200():
    return ppl_em.prepare(gauss(BASE), mode="mle")


def _scaled_start(s):
    return {
        "w": START["w"],
        "mu": np.multiply(START["mu"], s),
        "sigma": np.multiply(START["sigma"], s),
    }


@pytest.mark.parametrize("scale", [1.0, 1e300, 1e-300])
def test_gaussian_at_extreme_scales(gauss200, scale):
    prepared = ppl_em.with_data(gauss200, x=BASE * scale)
    start = _scaled_start(scale)
    res = ppl_em.fit(start=start, prepared=prepared, tol=1e-13, progressbar=False)
    w, mu, sd, ll = numpy_gmm(BASE * scale, start["w"], start["mu"], start["sigma"])
    assert np.all(np.isfinite(res.unconstrained)) and np.isfinite(res.loglik)
    np.testing.assert_allclose(res.params["w"], w, rtol=1e-7)
    np.testing.assert_allclose(res.params["mu"], mu, rtol=1e-7)
    np.testing.assert_allclose(res.params["sigma"], sd, rtol=1e-7)
    assert res.loglik == pytest.approx(ll, rel=1e-10)
    assert res.diagnostics["issues"] == []


def test_variances_spanning_1e_minus8_to_1e8(gauss200):
    rng = np.random.default_rng(5)
    x = np.r_[rng.normal(0.0, 1e-4, 100), rng.normal(5e4, 1e4, 100)]
    start = {"w": [0.5, 0.5], "mu": [0.1, 4e4], "sigma": [1.0, 2e4]}
    res = ppl_em.fit(
        start=start, prepared=ppl_em.with_data(gauss200, x=x), tol=1e-13, progressbar=False
    )
    w, mu, sd, _ = numpy_gmm(x, *start.values())
    np.testing.assert_allclose(res.params["sigma"] ** 2, sd**2, rtol=1e-7)
    np.testing.assert_allclose(res.params["mu"], mu, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(res.params["w"], w, rtol=1e-7)
    assert res.params["sigma"][0] ** 2 == pytest.approx(np.var(x[:100]), rel=1e-6)
    assert res.diagnostics["issues"] == []


def test_float32_data(gauss200):
    x32 = BASE.astype(np.float32)
    w, mu, sd, ll = numpy_gmm(x32.astype(float), *START.values())
    # Through with_data (cast to the compiled float64) and through a float32 model.
    for res in (
        ppl_em.fit(start=START, prepared=ppl_em.with_data(gauss200, x=x32), tol=1e-13,
                   progressbar=False),
        ppl_em.fit(gauss(x32), start=START, mode="mle", tol=1e-13, progressbar=False),
    ):  # fmt: skip
        assert res.params["mu"].dtype == np.float64
        np.testing.assert_allclose(res.params["w"], w, rtol=1e-7)
        np.testing.assert_allclose(res.params["mu"], mu, rtol=1e-7)
        np.testing.assert_allclose(res.params["sigma"], sd, rtol=1e-7)
        assert res.loglik == pytest.approx(ll, rel=1e-10)


def numpy_exp_em(x, w, lam, n_iter):
    """Reference exponential-mixture EM (MLE), standardised so it works at any scale."""
    s = np.max(x)
    x, lam, w = x / s, np.asarray(lam) * s, np.asarray(w, dtype=float)
    for _ in range(n_iter):
        logp = np.log(w) + np.log(lam) - lam * x[:, None]
        g = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        w, lam = g.sum(0) / len(x), g.sum(0) / (g.T @ x)
    return w, lam / s


@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_exponential_at_extreme_scales(scale):
    rng = np.random.default_rng(2)
    x = np.r_[rng.exponential(1.0, 120), rng.exponential(20.0, 80)] * scale
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", 1.0, 0.1, shape=2)
        pm.Mixture("t", w=w, comp_dists=pm.Exponential.dist(lam=lam), observed=x)
    start = {"w": [0.5, 0.5], "lam": [2.0 / scale, 0.02 / scale]}
    # max_iter and tol such that it stops only when the objective stops changing; the
    # reference runs the same number of iterations.
    res = ppl_em.fit(model, start=start, mode="mle", max_iter=2000, tol=1e-300, progressbar=False)
    assert res.converged
    w, lam = numpy_exp_em(x, start["w"], start["lam"], n_iter=res.n_iter)
    np.testing.assert_allclose(res.params["lam"], lam, rtol=1e-9)
    np.testing.assert_allclose(res.params["w"], w, rtol=1e-9)
    assert np.isfinite(res.loglik) and res.diagnostics["issues"] == []


def test_fifty_components():
    k, rng = 50, np.random.default_rng(9)
    centres = 10.0 * np.arange(k)
    x = (centres[:, None] + rng.normal(0.0, 1.0, (k, 20))).ravel()
    start = {"w": np.full(k, 1 / k), "mu": centres + 0.5, "sigma": np.full(k, 1.5)}
    res = ppl_em.fit(gauss(x, k=k), start=start, mode="mle", tol=1e-13, progressbar=False)
    w, mu, sd, ll = numpy_gmm(x, *start.values())
    np.testing.assert_allclose(res.params["mu"], mu, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(res.params["sigma"], sd, rtol=1e-6)
    np.testing.assert_allclose(res.params["w"], w, rtol=1e-6)
    assert res.loglik == pytest.approx(ll, rel=1e-10)
    assert res.diagnostics["n_distinct_components"] == k


def test_single_observation_poisson():
    with pm.Model() as model:
        mu = pm.Gamma("mu", 2.0, 1.0, shape=1)
        z = pm.Categorical("z", p=np.array([1.0]), shape=1)
        pm.Poisson("x", mu=mu[z], observed=np.array([4]))
    res = ppl_em.fit(model, progressbar=False)
    # Gamma(2, 1) prior and one count of 4: the mode (4 + 2 - 1) / (1 + 1).
    assert res.params["mu"][0] == pytest.approx(2.5, rel=1e-12)
    assert res.responsibilities.shape == (1, 1) and res.converged


def _normal_n1():
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 10.0, shape=1)
        sigma = pm.InverseGamma("sigma", 2.0, 1.0, shape=1)
        z = pm.Categorical("z", p=np.array([1.0]), shape=1)
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=np.array([3.0]))
    return model


def test_single_observation_normal_mle_collapses():
    with pytest.raises(ppl_em.CollapseError, match=r"component 0 collapsed onto observation 0"):
        ppl_em.fit(_normal_n1(), mode="mle", mstep="numeric", progressbar=False)


def test_single_observation_normal_map_is_finite():
    res = ppl_em.fit(_normal_n1(), mode="map", tol=1e-14, progressbar=False)

    def neg(theta):
        mu, sd = theta[0], np.exp(theta[1])
        lp = norm.logpdf(3.0, mu, sd) + norm.logpdf(mu, 0, 10) + invgamma.logpdf(sd, 2, scale=1)
        return -lp

    ref = minimize(neg, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14})
    np.testing.assert_allclose(
        [res.params["mu"][0], np.log(res.params["sigma"][0])], ref.x, atol=1e-5
    )
    assert res.log_posterior == pytest.approx(-ref.fun, abs=1e-7)


def test_newton_stops_at_the_rounding_of_q_not_after_its_iteration_limit():
    """Q and its gradient are sums over many observations, so near Q's maximum they carry
    rounding noise that no step can reduce. Newton must stop there, at the maximiser to
    within the noise, instead of spending its iteration limit on line searches that
    cannot see Q rise (which took some 3000 evaluations per M-step of a stick-breaking
    model)."""
    from ppl_em.steps.newton import newton_maximise

    rng = np.random.default_rng(5)
    centre = rng.normal(size=20)
    calls = []

    def evaluate(x):
        calls.append(1)
        # a log-likelihood of about -3e4 with the rounding of a sum of that size; its
        # gradient's rounding, 1e-9 standard errors, is above Newton's tolerance (1e-12)
        q = -3e4 - 0.5 * np.sum((x - centre) ** 2) + rng.normal(0.0, 1e-11)
        return q, centre - x + rng.normal(0.0, 1e-9, x.size)

    found = newton_maximise(evaluate, evaluate, np.zeros(20), 0.0)
    # 100 iterations (the limit) of a 20-column Hessian alone would be 2100 calls
    assert len(calls) < 400
    # Q's rounding hides a change of 1e-11, which a step of sqrt(2e-11) ~ 5e-6 standard
    # errors makes: the maximiser is known to about that
    np.testing.assert_allclose(found.values, centre, atol=1e-4)


def test_newton_stops_when_its_decrement_rises_within_the_rounding():
    """Within 1e-6 standard errors of Q's maximum a Newton step with the exact Hessian
    makes the decrement fall, so one that rises there is the gradient's rounding, and
    each further Hessian (one pass over the data or more) is spent on nothing. The rule
    that waited for three steps without a fall by a tenth took five more Hessians at the
    negative-binomial regression's start. Here Q is quadratic, its gradient carries
    rounding of a few 1e-9 standard errors, and the start is 10 standard errors away."""
    from ppl_em.steps.newton import NOISE, newton_maximise

    rng = np.random.default_rng(11)
    centre = np.array([1.5, -0.7, 0.2])
    root = rng.normal(size=(3, 3))
    info = 1e5 * (root @ root.T / 3 + np.eye(3))
    inverse = np.linalg.inv(info)

    def evaluate(x):
        d = x - centre
        q = -3e5 - 0.5 * d @ info @ d + rng.normal(0.0, 1e-9)
        return q, -info @ d + rng.normal(0.0, 1e-6, 3)

    away = rng.normal(size=3)
    away *= 10.0 / np.sqrt(away @ info @ away)
    hessians = 0
    for _ in range(20):
        decrements = []

        def curvature(x, grad, seen=decrements):
            seen.append(float(np.sqrt(grad @ inverse @ grad)))
            return -info

        found = newton_maximise(evaluate, evaluate, centre + away, 0.0, curvature=curvature)
        hessians += len(decrements)
        below = [d < NOISE for d in decrements]
        rises = [i for i in range(1, len(decrements))
                 if below[i - 1] and below[i] and decrements[i] >= decrements[i - 1]]  # fmt: skip
        # no Hessian after the first rise within the rounding
        assert rises == [] or rises[0] == len(decrements) - 1, decrements
        assert 1e-12 < decrements[-1] < NOISE
        np.testing.assert_allclose(found.values, centre, atol=1e-9)
    # 73 here; the stall rule alone took 122
    assert hessians < 20 * 5


def test_newton_near_the_maximum_takes_the_full_step_not_its_double():
    """A full Newton step that raises Q was doubled while Q kept rising. Near Q's maximum
    the doubled step lands at the maximum's mirror image, where Q is as high as at the
    start, and Q's rounding can make it look higher: each step then overshot, and the
    next crept back by halvings (the Poisson regression's start M-step spent 149
    evaluations of Q where 9 now do). Here Q is quadratic with the rounding of a sum over
    10^5 observations (1e-9 at -3e5), its Hessian exact, and the start 2e-5 standard
    errors from the maximum, where a full step raises Q by 2e-10, below its rounding."""
    from ppl_em.steps.newton import newton_maximise

    rng = np.random.default_rng(7)
    centre = np.array([2.1, 0.9, -0.3, 0.4])
    root = rng.normal(size=(4, 4))
    info = 1e5 * (root @ root.T / 4 + np.eye(4))  # N x the information per observation
    calls = []

    def evaluate(x):
        calls.append(1)
        d = x - centre
        q = -3e5 - 0.5 * d @ info @ d + rng.normal(0.0, 1e-9)
        return q, -info @ d + rng.normal(0.0, 1e-10, 4)

    away = rng.normal(size=4)
    away *= 2e-5 / np.sqrt(away @ info @ away)  # a decrement of 2e-5
    for _ in range(20):
        calls.clear()
        found = newton_maximise(
            evaluate, evaluate, centre + away, 0.0, curvature=lambda x, g: -info
        )
        assert len(calls) <= 8
        # within the gradient's rounding (1e-10 / 1e5 per coordinate), not at the mirror
        np.testing.assert_allclose(found.values, centre, atol=1e-12)


def _independent_pairs(x):
    """Q = sum_k f(a_k, b_k) for pairs (x[k], x[K + k]), f a Normal log-likelihood of a
    mean a_k and a log-scale b_k on sufficient statistics (n_k, s_k, ss_k): the
    components of a normal block's Q. Returns Q, its gradient and its exact Hessian."""
    n, s, ss = (
        np.array([40.0, 25.0, 35.0]),
        np.array([12.0, -30.0, 70.0]),
        np.array([90.0, 80.0, 210.0]),
    )
    k = n.size
    a, b = x[:k], x[k:]
    r = ss - 2 * a * s + n * a**2  # sum (y - a)^2
    var = np.exp(2 * b)
    q = np.sum(-n * b - 0.5 * r / var)
    grad = np.concatenate([(s - n * a) / var, -n + r / var])
    h = np.zeros((2 * k, 2 * k))
    idx = np.arange(k)
    h[idx, idx] = -n / var
    h[idx, k + idx] = h[k + idx, idx] = -2 * (s - n * a) / var
    h[k + idx, k + idx] = -2 * r / var
    return q, grad, h


def test_a_hessian_of_independent_components_is_differenced_a_component_at_once():
    """Variables that do not interact (a normal block's components) are differenced
    together: the grouped Hessian equals the one differenced variable by variable and
    the exact one, from a third of the gradients."""
    from ppl_em.steps.newton import grouped_hessian, hessian, interacting

    calls = []

    def evaluate(x):
        calls.append(1)
        q, grad, _ = _independent_pairs(x)
        return q, grad

    x = np.array([0.4, -1.1, 1.9, 0.3, 0.5, 0.8])
    _, grad, exact = _independent_pairs(x)
    full = hessian(evaluate, x, grad)
    n_full, calls[:] = len(calls), []
    sets = interacting(full)
    assert [s.tolist() for s in sets] == [[0, 3], [1, 4], [2, 5]]
    grouped = grouped_hessian(evaluate, x, grad, sets)
    assert len(calls) * 3 == n_full
    np.testing.assert_allclose(grouped, full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grouped, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())


def test_variables_coupled_through_a_chain_form_one_set():
    from ppl_em.steps.newton import interacting

    h = np.diag([-1.0, -2.0, -3.0, -4.0])
    h[0, 1] = h[1, 0] = 0.5
    h[1, 3] = h[3, 1] = 0.2
    assert [s.tolist() for s in interacting(h)] == [[0, 1, 3], [2]]
