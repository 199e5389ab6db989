"""EM standard errors against an independent reference.

The reference is a central finite-difference Hessian of the marginal log-likelihood (or
log posterior) written directly with SciPy densities in a full-rank constrained
parameterisation (w_1 instead of the simplex, mu, sigma as they are). At the mode the
gradient vanishes, so inverting that Hessian gives the same covariance as ppl_em's
unconstrained Hessian mapped by the delta method; the two code paths share nothing.

The default method, Louis' identity on EM's compiled rows ("louis"), is also checked
against the older central differences of the PyTensor gradient ("gradient") on models of
both forms, closed-form and numeric M-steps and an MvNormal; against closed forms; its
information matrix against a hand-written NumPy marginal log posterior; and for units.
"""

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from scipy import stats
from scipy.special import logsumexp

import ppl_em
from models import coin, gaussian_2d, poisson_counts, regression_mixture
from ppl_em import NotIdentifiedError
from ppl_em.inference.information import louis_information
from ppl_em.inference.stderr import covariance, curvature, standard_errors


def fd_hessian(f, x, rel=1e-4):
    """Central second differences with steps proportional to |x|."""
    x = np.asarray(x, dtype=float)
    h = rel * np.maximum(np.abs(x), 1e-2)
    n = x.size
    hess = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            ei, ej = np.eye(n)[i] * h[i], np.eye(n)[j] * h[j]
            val = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)) / (
                4 * h[i] * h[j]
            )
            hess[i, j] = hess[j, i] = val
    return hess


def reference_se(f, x):
    cov = np.linalg.inv(-fd_hessian(f, x))
    return np.sqrt(np.diag(cov))


METHODS = ["louis", "gradient", "exact"]


@pytest.fixture(scope="module")
def poisson_mle_fit():
    x = poisson_counts.default_data(n=250, seed=5)
    return x, ppl_em.fit(poisson_counts.build_model(x), mode="mle", tol=1e-12, progressbar=False)


@pytest.mark.parametrize("method", METHODS)
def test_poisson_mle_se_matches_finite_difference_hessian(poisson_mle_fit, method):
    x, res = poisson_mle_fit
    se = standard_errors(res, method)

    def loglik(theta):
        w1, mu0, mu1 = theta
        comps = np.stack(
            [
                np.log1p(-w1) + stats.poisson.logpmf(x, mu0),
                np.log(w1) + stats.poisson.logpmf(x, mu1),
            ]
        )
        return logsumexp(comps, axis=0).sum()

    theta = [res.params["w"][1], *res.params["mu"]]
    ref = reference_se(loglik, theta)
    np.testing.assert_allclose(se["w"], [ref[0], ref[0]], rtol=1e-4)
    np.testing.assert_allclose(se["mu"], ref[1:], rtol=1e-4)
    # Sanity against the textbook scale: a Poisson mean's SE is about sqrt(mu / N_k).
    nk = res.responsibilities.sum(axis=0)
    np.testing.assert_allclose(se["mu"], np.sqrt(res.params["mu"] / nk), rtol=0.25)


@pytest.fixture(scope="module")
def normal_mixture_fit():
    rng = np.random.default_rng(11)
    z = rng.choice(2, size=200, p=[0.4, 0.6])
    x = rng.normal(np.array([-2.0, 2.0])[z], np.array([1.0, 0.7])[z])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return x, ppl_em.fit(model, tol=1e-12, progressbar=False)


@pytest.mark.parametrize("method", ["louis", "exact", "gradient"])
def test_normal_mixture_map_se_matches_finite_difference_hessian(normal_mixture_fit, method):
    x, res = normal_mixture_fit
    se = standard_errors(res, method)

    def logpost(theta):
        w1, m0, m1, s0, s1 = theta
        mus, sds = np.array([m0, m1]), np.array([s0, s1])
        comps = np.log([1 - w1, w1])[:, None] + stats.norm.logpdf(x, mus[:, None], sds[:, None])
        prior = stats.norm.logpdf(mus, 0, 10).sum() + stats.halfnorm.logpdf(sds, scale=5).sum()
        return logsumexp(comps, axis=0).sum() + prior  # Dirichlet(1) is constant on the simplex

    theta = [res.params["w"][1], *res.params["mu"], *res.params["sigma"]]
    ref = reference_se(logpost, theta)
    np.testing.assert_allclose(se["w"], [ref[0], ref[0]], rtol=1e-4)
    np.testing.assert_allclose(se["mu"], ref[1:3], rtol=1e-4)
    np.testing.assert_allclose(se["sigma"], ref[3:], rtol=1e-4)
    names, cov = covariance(res, method)
    assert names == ["w[0]", "w[1]", "mu[0]", "mu[1]", "sigma[0]", "sigma[1]"]
    # The simplex constraint: w[0] = 1 - w[1] exactly, so their covariance is -Var(w[1]).
    np.testing.assert_allclose(cov[0, 1], -cov[1, 1], rtol=1e-8)


def test_unidentified_estimate_raises_naming_the_weights():
    # The seed's 20 counts: EM ends with three equal biases, where the weights leave the
    # likelihood unchanged, so the observed information is singular along w.
    res = ppl_em.fit(coin.build_model(), progressbar=False)
    assert np.ptp(res.params["p"]) < 1e-3
    with pytest.raises(NotIdentifiedError, match=r"w_simplex__"):
        standard_errors(res, "gradient")
    with pytest.raises(ValueError, match="method='hessian'"):
        standard_errors(res, "hessian")


def test_louis_is_the_default_and_raises_on_the_unidentified_seed_fit():
    res = ppl_em.fit(coin.build_model(), progressbar=False)
    assert np.ptp(res.params["p"]) < 1e-3
    with pytest.raises(NotIdentifiedError, match=r"w_simplex__"):
        standard_errors(res)
    with pytest.raises(NotIdentifiedError, match=r"w_simplex__"):
        standard_errors(res, "louis")


def _assert_same_se(a, b, rtol):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, err_msg=name)


@pytest.fixture(scope="module")
def regression_fit():
    # A label model on the numeric M-step (its default is Newton on the statistics).
    model = regression_mixture.build_model()
    return ppl_em.fit(model, mstep="numeric", tol=1e-12, progressbar=False)


@pytest.fixture(scope="module")
def mvnormal_fit():
    # MvNormal components, full covariances from (sigma, rho): the closed-form MvNormal
    # block under mode="mle". Q on NumPy-backed Ops: the gradient differences call it 23
    # times, and compiling its MvNormal gradient to C took 46 s on a cold cache.
    x = gaussian_2d.default_data(n=200, seed=7)
    prepared = ppl_em.prepare(gaussian_2d.build_model(x), mode="mle", backend="python")
    return ppl_em.fit(prepared=prepared, tol=1e-12, progressbar=False)


@pytest.mark.parametrize(
    "fit_name", ["poisson_mle_fit", "normal_mixture_fit", "regression_fit", "mvnormal_fit"]
)
def test_louis_matches_gradient_differences(fit_name, request):
    """Label (Poisson, regression, MvNormal) and pm.Mixture (NormalMixture) forms;
    closed-form (Poisson, NormalMixture, MvNormal) and numeric (regression) M-steps."""
    fitted = request.getfixturevalue(fit_name)
    res = fitted[1] if isinstance(fitted, tuple) else fitted
    if fit_name == "regression_fit":
        assert res.prepared.config.numeric_mask.any()
    louis, gradient = curvature(res, "louis"), curvature(res, "gradient")
    # The same matrix, entry by entry in units of the complete-data information (both
    # methods are within about 1e-10 of the exact Hessian) ...
    unit = np.outer(louis.scale, louis.scale)
    assert np.max(np.abs(louis.hessian - gradient.hessian) / unit) < 1e-8
    # ... the same gradient by Fisher's identity (~0 at the mode), the same objective ...
    assert np.max(np.abs(louis.gradient - gradient.gradient) / louis.scale) < 1e-8
    np.testing.assert_allclose(louis.objective, res.objective, rtol=1e-12)
    # ... and the same standard errors.
    _assert_same_se(standard_errors(res), standard_errors(res, "gradient"), rtol=1e-4)


def _single_component(observed_dist, x, **params):
    """K=1 label model: ``observed_dist("x", **{name: var[z]}, observed=x)``."""
    with pm.Model() as model:
        made = {name: make() for name, make in params.items()}
        z = pm.Categorical("z", p=np.array([1.0]), shape=len(x))
        observed_dist("x", **{name: v[z] for name, v in made.items()}, observed=x)
    return model


def test_single_normal_component_has_textbook_standard_errors():
    # The MLE of one Normal: SE(mu) = sigma / sqrt(N), SE(sigma) = sigma / sqrt(2N) exactly
    # (the observed information at the MLE equals the expected one, no cross term).
    x = np.random.default_rng(3).normal(2.0, 1.5, size=200)
    model = _single_component(
        pm.Normal,
        x,
        mu=lambda: pm.Normal("mu", 0.0, 10.0, shape=1),
        sigma=lambda: pm.HalfNormal("sigma", 5.0, shape=1),
    )
    res = ppl_em.fit(model, mode="mle", tol=1e-14, gap_tol=1e-12, progressbar=False)
    sigma = np.std(x)
    np.testing.assert_allclose(res.params["sigma"], [sigma], rtol=1e-8)
    se = standard_errors(res)
    np.testing.assert_allclose(se["mu"], [sigma / np.sqrt(x.size)], rtol=1e-6)
    np.testing.assert_allclose(se["sigma"], [sigma / np.sqrt(2 * x.size)], rtol=1e-6)


def test_single_binomial_and_poisson_components_have_textbook_standard_errors():
    rng = np.random.default_rng(4)
    heads = rng.binomial(10, 0.3, size=150)
    model = _single_component(
        lambda name, **kw: pm.Binomial(name, n=10, **kw),
        heads,
        p=lambda: pm.Beta("p", 1.0, 1.0, shape=1),
    )
    res = ppl_em.fit(model, mode="mle", tol=1e-14, gap_tol=1e-12, progressbar=False)
    p = heads.mean() / 10
    np.testing.assert_allclose(res.params["p"], [p], rtol=1e-8)
    np.testing.assert_allclose(
        standard_errors(res)["p"], [np.sqrt(p * (1 - p) / (10 * heads.size))], rtol=1e-6
    )
    counts = rng.poisson(4.0, size=150)
    model = _single_component(pm.Poisson, counts, mu=lambda: pm.Gamma("mu", 2.0, 0.2, shape=1))
    res = ppl_em.fit(model, mode="mle", tol=1e-14, gap_tol=1e-12, progressbar=False)
    np.testing.assert_allclose(
        standard_errors(res)["mu"], [np.sqrt(counts.mean() / counts.size)], rtol=1e-6
    )


def test_louis_information_equals_differences_of_a_numpy_log_posterior(normal_mixture_fit):
    """Minus the Hessian in ``u`` of the NormalMixture's marginal log posterior written
    by hand: w = softmax([y, -y]) (PyMC's simplex transform for K=2), sigma = exp(s),
    Normal(0, 10) and HalfNormal(5) priors without Jacobian, Dirichlet(1) constant."""
    x, res = normal_mixture_fit
    layout = res.prepared.functions.layout
    assert layout.value_names == ("w_simplex__", "mu", "sigma_log__")

    def logpost(u):
        y, mu, sd = u[0], u[1:3], np.exp(u[3:5])
        logw = np.array([y, -y]) - np.logaddexp(y, -y)
        comps = (
            logw[:, None]
            - 0.5 * ((x - mu[:, None]) / sd[:, None]) ** 2
            - np.log(sd[:, None] * np.sqrt(2 * np.pi))
        )
        prior = np.sum(-0.5 * (mu / 10.0) ** 2) + np.sum(-0.5 * (sd / 5.0) ** 2)
        return np.sum(np.logaddexp(comps[0], comps[1])) + prior

    u = np.asarray(res.unconstrained)
    # The hand-written transforms are PyMC's: the same constrained values.
    w = np.exp(np.array([u[0], -u[0]]) - np.logaddexp(u[0], -u[0]))
    np.testing.assert_allclose(w, res.params["w"], rtol=1e-12)
    np.testing.assert_allclose(np.exp(u[3:5]), res.params["sigma"], rtol=1e-12)
    # Central second differences with Richardson's extrapolation: about 3e-9 here.
    hessian = (4 * fd_hessian(logpost, u, rel=3e-3) - fd_hessian(logpost, u, rel=6e-3)) / 3
    louis = curvature(res, "louis")
    unit = np.outer(louis.scale, louis.scale)
    assert np.max(np.abs(-louis.hessian + hessian) / unit) < 1e-7


@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_louis_standard_errors_follow_the_data_units(normal_mixture_fit, c):
    """A fit on c * x: the weights' SEs unchanged, the means' and scales' times c."""
    x, _ = normal_mixture_fit

    def se_of(scale):
        with pm.Model() as model:
            w = pm.Dirichlet("w", a=np.ones(2))
            mu = pm.Normal("mu", 0.0, 10.0, shape=2)
            sigma = pm.HalfNormal("sigma", 5.0, shape=2)
            pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=scale * x)
        # The same start in the data's units: the same EM path, the same component order.
        start = {"w": [0.5, 0.5], "mu": [-scale, scale], "sigma": [scale, scale]}
        res = ppl_em.fit(
            model, mode="mle", start=start, tol=1e-14, gap_tol=1e-12, progressbar=False
        )
        return res.params, standard_errors(res)

    params, se = se_of(1.0)
    params_c, se_c = se_of(c)
    np.testing.assert_allclose(params_c["mu"], c * params["mu"], rtol=1e-7)
    np.testing.assert_allclose(se_c["w"], se["w"], rtol=1e-6)
    np.testing.assert_allclose(se_c["mu"], c * se["mu"], rtol=1e-6)
    np.testing.assert_allclose(se_c["sigma"], c * se["sigma"], rtol=1e-6)


def test_louis_over_chunks_equals_the_whole_data(poisson_mle_fit):
    _, res = poisson_mle_fit
    _assert_same_se(standard_errors(res, chunk_size=37), standard_errors(res), rtol=1e-8)
    louis, whole = louis_information(res.prepared.functions, res.unconstrained, 37), curvature(res)
    np.testing.assert_allclose(louis.observed, -whole.hessian, rtol=1e-8)


def test_louis_compiles_nothing(monkeypatch):
    # A closed-form fit has compiled its rows, fixed terms and transforms, not Q's
    # gradient; the standard errors must not compile anything (no C compilation).
    res = ppl_em.fit(poisson_counts.build_model(), progressbar=False)

    def refuse(*args, **kwargs):
        raise AssertionError("standard_errors compiled a PyTensor function")

    monkeypatch.setattr(pytensor, "function", refuse)
    se = standard_errors(res)
    assert all(np.all(np.isfinite(v)) for v in se.values())


def test_louis_information_where_a_variable_moves_a_row_only_with_another():
    """``mu = (a b, b)`` at ``a = 0``: at that point ``b`` moves the second component's
    row only and ``a`` the first's only, yet ``d2 L_1 / da db = x - 2 a b`` is not zero.
    Pairs whose rows move with both variables are also looked for at a point off ``u``,
    so this pair is differenced. Against minus the Hessian of the marginal
    log-likelihood written by hand, at a point that is not the optimum (Louis' identity
    holds at any point)."""
    x = np.random.default_rng(4).normal(np.repeat([0.0, 2.0], 60), 1.0)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a, b = pm.Flat("a"), pm.Flat("b")
        pm.NormalMixture("x", w=w, mu=pt.stack([a * b, b]), sigma=1.0, observed=x)
    functions = ppl_em.prepare(model, mode="mle").functions
    assert functions.layout.value_names == ("w_simplex__", "a", "b")
    u = np.array([0.3, 0.0, 2.0])

    def loglik(v):
        logw = np.array([v[0], -v[0]]) - np.logaddexp(v[0], -v[0])
        means = np.array([v[1] * v[2], v[2]])
        return np.sum(logsumexp(logw[:, None] + stats.norm.logpdf(x, means[:, None]), axis=0))

    hessian = (4 * fd_hessian(loglik, u, rel=3e-3) - fd_hessian(loglik, u, rel=6e-3)) / 3
    unit = np.sqrt(np.outer(np.abs(np.diag(hessian)), np.abs(np.diag(hessian))))
    assert abs(hessian[1, 2]) > 0.1 * unit[1, 2]  # the pair matters
    observed = louis_information(functions, u).observed
    # The reference's steps in a (3e-5 at a = 0) leave it about 1e-7 from exact here;
    # leaving the pair out misses its complete-data cross term, 0.069 of the unit.
    np.testing.assert_allclose(observed / unit, -hessian / unit, rtol=0, atol=1e-6)
