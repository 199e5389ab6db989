"""3-component Gaussian mixture: the EM optimum against pm.find_MAP and scikit-learn."""

import numpy as np
import pymc as pm
import pymc_extras as pmx
import pytest
from sklearn.mixture import GaussianMixture

import ppl_em
from tests.conftest import assert_monotone, numpy_ops
from tests.models_for_tests import gaussian_data, gaussian_label, gaussian_mixture


@pytest.fixture(scope="module")
def x():
    return gaussian_data(n=600, seed=0)


def _marginal_logp(model, point):
    with numpy_ops():
        fn = model.compile_logp(jacobian=False)
    ip = model.initial_point()
    full = {**ip, **{k: v for k, v in point.items() if k in ip}}
    return float(fn(full))


@pytest.mark.parametrize("builder", [gaussian_label, gaussian_mixture])
def test_em_optimum_is_find_map(builder, x):
    model = builder(x)
    res = ppl_em.fit(model, progressbar=False, tol=1e-12)
    assert res.converged
    assert_monotone(res.history)
    marginal = pmx.marginalize(model, ["z"]) if "z" in model.named_vars else model
    with numpy_ops():
        map_est = pm.find_MAP(
            model=marginal,
            start=res.params,
            progressbar=False,
            maxeval=20000,
            options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 20000},
        )
    for name, value in res.params.items():
        np.testing.assert_allclose(value, map_est[name], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(res.log_posterior, _marginal_logp(marginal, map_est), rtol=1e-6)
    # EM's log posterior is the marginal model's own logp (jacobian=False) at the estimate
    transformed = _transformed(marginal, res.params)
    np.testing.assert_allclose(res.log_posterior, _marginal_logp(marginal, transformed), rtol=1e-10)


def _transformed(model, params: dict) -> dict:
    """The model's value variables at the constrained ``params``."""
    point = model.initial_point()
    for rv in model.free_RVs:
        tr = model.rvs_to_transforms.get(rv)
        val = params[rv.name]
        val = tr.forward(val, *rv.owner.inputs).eval() if tr else val
        point[model.rvs_to_values[rv].name] = val
    return point


@pytest.mark.parametrize("builder", [gaussian_label, gaussian_mixture])
def test_mle_loglik_equals_sklearn(builder, x):
    model = builder(x)
    res = ppl_em.fit(model, mode="mle", progressbar=False, tol=1e-13)
    gm = GaussianMixture(3, covariance_type="full", tol=1e-14, max_iter=10000, reg_covar=0.0,
                         n_init=5, random_state=0).fit(x[:, None])  # fmt: skip
    sk_loglik = gm.score(x[:, None]) * len(x)
    np.testing.assert_allclose(res.loglik, sk_loglik, rtol=1e-6)
    order = np.argsort(res.params["mu"])
    np.testing.assert_allclose(res.params["mu"][order], np.sort(gm.means_[:, 0]), atol=1e-3)
    assert_monotone(res.history)
    # The iterations of an MLE fit never evaluate the log prior; the result's is PyMC's
    marginal = pmx.marginalize(model, ["z"]) if "z" in model.named_vars else model
    with numpy_ops():
        prior = marginal.compile_logp(vars=marginal.free_RVs, jacobian=False)
    logprior = float(prior(_transformed(marginal, res.params)))
    np.testing.assert_allclose(res.log_posterior - res.loglik, logprior, rtol=1e-10)
