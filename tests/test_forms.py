"""Models as users write them: pm.Data, coords and dims, censored, truncated,
element-wise, zero-inflated and hurdle mixtures; each against an independent reference
(the same model with plain arrays, SciPy on the hand-written likelihood, a closed-form
MLE, pm.find_MAP)."""

import warnings

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import optimize, stats
from scipy.special import logsumexp

import ppl_em
from tests.conftest import numpy_ops

RNG = np.random.default_rng(0)
N = 300
Z0 = RNG.integers(0, 2, N)
X = RNG.normal(np.array([-2.0, 2.0])[Z0], 1.0)
TIGHT = {"mode": "mle", "tol": 1e-14, "gap_tol": 1e-12, "progressbar": False}


def _plain_label():
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=2)
        s = pm.HalfNormal("s", 5, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu=mu[z], sigma=s[z], observed=X)
    return model


def _data_label(dims: bool):
    coords = {"obs": range(N), "component": ["low", "high"]} if dims else {}
    with pm.Model(coords=coords) as model:
        xd = pm.Data("xd", X, dims="obs" if dims else None)
        kw = {"dims": "component"} if dims else {"shape": 2}
        w = pm.Dirichlet("w", a=np.ones(2), **kw)
        mu = pm.Normal("mu", 0, 10, **kw)
        s = pm.HalfNormal("s", 5, **kw)
        z = pm.Categorical("z", p=w, **({"dims": "obs"} if dims else {"shape": N}))
        pm.Normal("x", mu=mu[z], sigma=s[z], observed=xd, **({"dims": "obs"} if dims else {}))
    return model


@pytest.mark.parametrize("dims", [False, True])
def test_pm_data_with_and_without_dims_fits_like_plain_arrays(dims):
    reference = ppl_em.fit(_plain_label(), progressbar=False)
    got = ppl_em.fit(_data_label(dims), progressbar=False)
    assert got.loglik == pytest.approx(reference.loglik, rel=1e-10)
    for name in ("w", "mu", "s"):
        np.testing.assert_allclose(got.params[name], reference.params[name], rtol=1e-7)


def test_inference_data_carries_the_models_coords_and_dims():
    idata = ppl_em.fit(_data_label(True), progressbar=False).to_inference_data()
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw", "component")
    assert list(post["mu"].coords["component"].values) == ["low", "high"]
    assert post["lp_z"].dims == ("chain", "draw", "obs", "component")
    assert post["lp_z"].shape == (1, 1, N, 2)


def test_weights_sized_by_a_component_coordinate_stick_breaking():
    """PyMC's stick-breaking example: K from a coordinate, weights from Beta sticks."""
    k = 4
    with pm.Model(coords={"component": range(k)}) as model:
        v = pm.Beta("v", 1.0, 1.0, dims="component")
        w = v * pt.concatenate([[1.0], pt.extra_ops.cumprod(1 - v)[:-1]])
        mu = pm.Normal("mu", 0, 10, dims="component")
        s = pm.HalfNormal("s", 5, dims="component")
        pm.NormalMixture("x", w=w / w.sum(), mu=mu, sigma=s, observed=X)
    em = ppl_em.fit(model, progressbar=False)
    assert em.n_components == k and em.converged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with numpy_ops():
            point = pm.find_MAP(start=dict(em.params), model=model, progressbar=False)
            logp_fn = model.compile_logp(jacobian=False)
    logp = logp_fn({v.name: point[v.name] for v in model.value_vars})
    assert logp - em.log_posterior <= 1e-6


def _censored_loglik(theta, x, upper, sd=1.0):
    w1, mu0, mu1 = 1 / (1 + np.exp(-theta[0])), theta[1], theta[2]
    dens = []
    for w, mu in ((1 - w1, mu0), (w1, mu1)):
        inside = stats.norm.logpdf(x, mu, sd)
        dens.append(np.log(w) + np.where(x >= upper, stats.norm.logsf(upper, mu, sd), inside))
    return np.logaddexp(*dens).sum()


def _truncated_loglik(theta, x, upper, sd=1.0):
    w1, mu0, mu1 = 1 / (1 + np.exp(-theta[0])), theta[1], theta[2]
    dens = [np.log(w) + stats.norm.logpdf(x, mu, sd) - stats.norm.logcdf(upper, mu, sd)
            for w, mu in ((1 - w1, mu0), (w1, mu1))]  # fmt: skip
    return np.logaddexp(*dens).sum()


def _bounded_mixture(kind: str, x, upper, label: bool):
    wrap = pm.Censored if kind == "censored" else pm.Truncated
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=2)
        if label:
            z = pm.Categorical("z", p=w, shape=len(x))
            wrap("x", pm.Normal.dist(mu[z], 1.0), lower=None, upper=upper, observed=x)
        else:
            comps = [wrap.dist(pm.Normal.dist(mu[k], 1.0), lower=None, upper=upper)
                     for k in range(2)]  # fmt: skip
            pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


@pytest.mark.parametrize("kind", ["censored", "truncated"])
def test_censored_and_truncated_components_in_both_forms(kind):
    upper = 2.5
    x = np.minimum(X, upper) if kind == "censored" else X[upper > X]
    loglik = _censored_loglik if kind == "censored" else _truncated_loglik
    ref = optimize.minimize(lambda t: -loglik(t, x, upper), [0.0, -1.0, 1.0], method="BFGS",
                            options={"gtol": 1e-9}).x  # fmt: skip
    for label in (False, True):
        model = _bounded_mixture(kind, x, upper, label)
        em = ppl_em.fit(model, **TIGHT)
        mu = np.sort(em.params["mu"])
        np.testing.assert_allclose(mu, np.sort(ref[1:]), rtol=1e-6, err_msg=f"label={label}")
        theta = [np.log(em.params["w"][1] / em.params["w"][0]), *em.params["mu"]]
        # (PyMC's normal log-cdf is an approximation, good to about 1e-9 relative)
        assert em.loglik == pytest.approx(loglik(theta, x, upper), rel=1e-8)
        # the same point, three E-steps: the same log-likelihood (nothing random left)
        again = {ppl_em.fit(prepared=em.prepared, start=em.params, max_iter=1, tol=1e300,
                            progressbar=False).history[0] for _ in range(3)}  # fmt: skip
        assert len(again) == 1


def test_elementwise_mixture_over_n_by_j_data():
    """``pm.NormalMixture`` over (N, J) data with (J, K) means: one mixture per element."""
    j = 3
    data = RNG.normal(np.array([-2.0, 2.0])[Z0][:, None] + np.arange(j), 1.0)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0, 10, shape=(j, 2))
        pm.NormalMixture("x", w=w, mu=mu, sigma=1.0, observed=data)
    em = ppl_em.fit(model, progressbar=False)
    rows = em.joint_logp()
    assert rows.shape == (N * j, 2) and em.n_obs == N * j
    w, mu = em.params["w"], em.params["mu"]
    expected = np.log(w) + stats.norm.logpdf(data.reshape(-1, 1), mu.reshape(1, j, 2).repeat(N, 0)
                                             .reshape(-1, 2), 1.0)  # fmt: skip
    np.testing.assert_allclose(rows, expected, rtol=1e-12)
    assert em.loglik == pytest.approx(logsumexp(expected, axis=1).sum(), rel=1e-12)
    # the model's own log density (PyMC's element-wise mixture logp) at the estimate
    logp = model.compile_logp(jacobian=False)
    point = model.initial_point()
    point.update(mu=mu, w_simplex__=model.rvs_to_transforms[model["w"]].forward(w).eval())
    assert logp(point) == pytest.approx(em.log_posterior, rel=1e-12)


def test_zero_inflated_poisson_is_the_mle():
    y = RNG.poisson(3.0, N) * (RNG.random(N) > 0.3)
    with pm.Model() as model:
        psi = pm.Beta("psi", 1, 1)
        mu = pm.Gamma("mu", 2, 0.5)
        pm.ZeroInflatedPoisson("y", psi=psi, mu=mu, observed=y)
    em = ppl_em.fit(model, **TIGHT)

    def negative(theta):
        psi_, mu_ = 1 / (1 + np.exp(-theta[0])), np.exp(theta[1])
        zero = np.log((1 - psi_) + psi_ * np.exp(-mu_))
        return -np.where(y == 0, zero, np.log(psi_) + stats.poisson.logpmf(y, mu_)).sum()

    ref = optimize.minimize(negative, [0.0, 1.0], method="BFGS", options={"gtol": 1e-10}).x
    assert em.params["psi"] == pytest.approx(1 / (1 + np.exp(-ref[0])), rel=1e-6)
    assert em.params["mu"] == pytest.approx(np.exp(ref[1]), rel=1e-6)


def test_hurdle_poisson_is_the_closed_form_mle():
    """Hurdle: P(0) = 1 - psi, P(y > 0) = psi Poisson(y) / (1 - e^-mu): psi's MLE is the
    fraction of non-zeros, mu's solves mean(y | y > 0) = mu / (1 - e^-mu)."""
    y = RNG.poisson(3.0, N) * (RNG.random(N) > 0.3)
    with pm.Model() as model:
        psi = pm.Beta("psi", 1, 1)
        mu = pm.Gamma("mu", 2, 0.5)
        pm.HurdlePoisson("y", psi=psi, mu=mu, observed=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        em = ppl_em.fit(model, **TIGHT)
    positive = y[y > 0]
    mu = optimize.brentq(lambda m: m / (1 - np.exp(-m)) - positive.mean(), 1e-6, 100, xtol=1e-14)
    assert em.params["psi"] == pytest.approx(positive.size / y.size, rel=1e-8)
    assert em.params["mu"] == pytest.approx(mu, rel=1e-7)


def test_continuous_hurdle_is_refused_clearly():
    with pm.Model() as model:
        psi = pm.Beta("psi", 1, 1)
        pm.HurdleGamma("y", psi=psi, alpha=2.0, beta=1.0, observed=np.abs(X) * (Z0 > 0))
    with pytest.raises(ppl_em.ModelStructureError, match=r"continuous hurdle model"):
        ppl_em.fit(model, progressbar=False)
