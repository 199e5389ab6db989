"""EM standard errors against an independent reference.

The reference is a central finite-difference Hessian of the marginal log-likelihood (or
log posterior) written directly with SciPy densities in a full-rank constrained
parameterisation (w_1 instead of the simplex, mu, sigma as they are). At the mode the
gradient vanishes, so inverting that Hessian gives the same covariance as ppl_em's
unconstrained Hessian mapped by the delta method; the two code paths share nothing.
"""

import numpy as np
import pymc as pm
import pytest
from scipy import stats
from scipy.special import logsumexp

import ppl_em
from models import coin, poisson_counts
from ppl_em import NotIdentifiedError
from ppl_em.inference.stderr import covariance, standard_errors


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


# The exact PyTensor Hessian of a label model takes minutes to compile on a loaded
# machine, so that combination runs with the slow tests.
METHODS = ["gradient", pytest.param("exact", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", METHODS)
def test_poisson_mle_se_matches_finite_difference_hessian(method):
    x = poisson_counts.default_data(n=250, seed=5)
    res = ppl_em.fit(poisson_counts.build_model(x), mode="mle", tol=1e-12, progressbar=False)
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


@pytest.mark.parametrize("method", ["exact", "gradient"])
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
