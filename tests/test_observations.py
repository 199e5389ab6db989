"""Observation weights, partly known labels and fixed parameters, against independent
references: the fit on repeated rows, a NumPy semi-supervised EM written here, and the
model written with the fixed values as constants."""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy import stats

import ppl_em
from tests.models_for_tests import gaussian_data

RNG = np.random.default_rng(8)
TIGHT = {"tol": 1e-14, "gap_tol": 1e-12, "progressbar": False}


def _normal_2(x, form: str, priors: bool):
    """Two Normal components; ``priors`` gives HalfNormal scales (a numeric M-step)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2) if priors else pm.Flat("mu", shape=2)
        sigma = pm.HalfNormal("sigma", 5.0, shape=2) if priors else pm.HalfFlat("sigma", shape=2)
        if form == "label":
            z = pm.Categorical("z", p=w, shape=len(x))
            pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
        else:
            pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model


START = {"w": [0.5, 0.5], "mu": [-1.0, 1.0], "sigma": [1.0, 1.0]}


@pytest.mark.parametrize("form", ["label", "mixture"])
@pytest.mark.parametrize("priors", [False, True], ids=["closed", "numeric"])
def test_integer_weights_equal_repeated_rows(form, priors):
    values = np.round(RNG.normal(np.repeat([-2.0, 2.0], 40), 1.0), 1)
    counts = RNG.integers(1, 5, size=values.size)
    mode = "map" if priors else "mle"
    weighted = ppl_em.fit(_normal_2(values, form, priors), mode=mode, start=START,
                          weights=counts, **TIGHT)  # fmt: skip
    repeated = ppl_em.fit(_normal_2(np.repeat(values, counts), form, priors), mode=mode,
                          start=START, **TIGHT)  # fmt: skip
    assert weighted.loglik == pytest.approx(repeated.loglik, rel=1e-11)
    assert weighted.bic() == pytest.approx(repeated.bic(), rel=1e-11)
    se_w, se_r = ppl_em.standard_errors(weighted), ppl_em.standard_errors(repeated)
    for name in ("mu", "sigma"):
        np.testing.assert_allclose(se_w[name], se_r[name], rtol=1e-6)
    for name in ("w", "mu", "sigma"):
        if priors:
            # A numeric M-step stops where the remaining gain is below gap_tol, so two
            # fits of one optimum agree to a small fraction of a standard error.
            np.testing.assert_array_less(
                np.abs(weighted.params[name] - repeated.params[name]), 1e-4 * se_r[name]
            )
        else:
            np.testing.assert_allclose(weighted.params[name], repeated.params[name], rtol=1e-9)


def test_latent_class_patterns_with_counts_equal_the_full_answers():
    """A latent class data set given as response patterns and how often each occurred."""
    n, j = 3000, 4
    z = RNG.integers(0, 2, n)
    answers = RNG.random((n, j)) < np.array([[0.9, 0.8, 0.2, 0.1], [0.2, 0.1, 0.8, 0.9]])[z]
    answers = answers.astype(int)
    patterns, counts = np.unique(answers, axis=0, return_counts=True)

    def lca(x):
        with pm.Model() as model:
            w = pm.Dirichlet("w", a=np.ones(2))
            p = pm.Beta("p", 1.0, 1.0, shape=(2, j))
            zz = pm.Categorical("z", p=w, shape=len(x))
            pm.Bernoulli("answers", p=p[zz], observed=x)
        return model

    start = {"w": [0.5, 0.5], "p": [[0.7, 0.6, 0.4, 0.3], [0.3, 0.4, 0.6, 0.7]]}
    short = ppl_em.fit(lca(patterns), start=start, weights=counts, **TIGHT)
    full = ppl_em.fit(lca(answers), start=start, **TIGHT)
    assert patterns.shape[0] <= 16
    assert short.log_posterior == pytest.approx(full.log_posterior, rel=1e-11)
    np.testing.assert_allclose(short.params["p"], full.params["p"], rtol=1e-9)


def _numpy_semi_supervised(x, labels, w, mu, sd, steps):
    """EM for a 2-component Gaussian mixture (maximum likelihood) where ``labels >= 0``
    fixes an observation's component, written out."""
    for _ in range(steps):
        logp = np.log(w)[None] + stats.norm.logpdf(x[:, None], mu[None], sd[None])
        g = np.exp(logp - logp.max(1, keepdims=True))
        g /= g.sum(1, keepdims=True)
        known = labels >= 0
        g[known] = np.eye(2)[labels[known]]
        nk = g.sum(0)
        w, mu = nk / nk.sum(), g.T @ x / nk
        sd = np.sqrt(np.einsum("nk,nk->k", g, (x[:, None] - mu[None]) ** 2) / nk)
    return w, mu, sd


@pytest.mark.filterwarnings("ignore::ppl_em.ConvergenceWarning")  # seven steps on purpose
@pytest.mark.parametrize("form", ["label", "mixture"])
def test_partly_known_labels_equal_a_numpy_semi_supervised_em(form):
    x = gaussian_data(300, seed=4)[:300]
    labels = np.full(300, -1)
    labels[:60] = (x[:60] > 0).astype(int)
    functions_start = {"w": [0.5, 0.5], "mu": [-1.0, 2.0], "sigma": [2.0, 2.0]}
    got = ppl_em.fit(_normal_2(x, form, False), mode="mle", start=functions_start,
                     labels=labels, max_iter=7, tol=1e-300, progressbar=False)  # fmt: skip
    ref = _numpy_semi_supervised(
        x, labels, np.array([0.5, 0.5]), np.array([-1.0, 2.0]), np.array([2.0, 2.0]), 7
    )
    for name, want in zip(("w", "mu", "sigma"), ref, strict=True):
        np.testing.assert_allclose(got.params[name], want, rtol=1e-9)
    known = labels >= 0
    np.testing.assert_array_equal(got.predict()[known], labels[known])


def test_labels_reduce_the_error_of_the_estimates():
    """Two heavily overlapping components: a tenth of the labels known brings the
    estimates closer to the truth than none (over several simulated data sets)."""
    errors = {"none": [], "some": []}
    # One model compiled, refitted on each simulated data set (prepare/with_data).
    prepared = ppl_em.prepare(_normal_2(np.zeros(400), "label", False), mode="mle")
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        z = rng.integers(0, 2, 400)
        x = rng.normal(np.array([-0.8, 0.8])[z], 1.0)
        labels = np.where(rng.random(400) < 0.1, z, -1)
        on_x = ppl_em.with_data(prepared, x=x)
        for key, lab in (("none", None), ("some", labels)):
            res = ppl_em.fit(prepared=on_x, labels=lab, accelerate="squarem", max_iter=5000,
                             progressbar=False)  # fmt: skip
            assert res.converged
            mu = np.sort(res.params["mu"])
            errors[key].append(np.abs(mu - [-0.8, 0.8]).sum())
    assert np.mean(errors["some"]) < np.mean(errors["none"])


def test_fixed_parameters_equal_the_model_with_constants():
    x = gaussian_data(300, seed=2)
    sigma = np.array([1.0, 0.7, 1.5])

    def model(fixed_sigma):
        with pm.Model() as m:
            w = pm.Dirichlet("w", a=np.ones(3))
            mu = pm.Normal("mu", 0.0, 10.0, shape=3)
            s = (pt.as_tensor_variable(fixed_sigma) if fixed_sigma is not None
                 else pm.HalfNormal("sigma", 5.0, shape=3))  # fmt: skip
            z = pm.Categorical("z", p=w, shape=len(x))
            pm.Normal("x", mu=mu[z], sigma=s[z], observed=x)
        return m

    held = ppl_em.fit(model(None), fixed={"sigma": sigma}, **TIGHT)
    constants = ppl_em.fit(model(sigma), **TIGHT)
    assert set(held.params) == {"w", "mu"}
    np.testing.assert_allclose(held.fixed["sigma"], sigma)
    for name in ("w", "mu"):
        np.testing.assert_allclose(held.params[name], constants.params[name], rtol=1e-9)
    assert held.loglik == pytest.approx(constants.loglik, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": np.r_[-1.0, np.ones(79)]}, ppl_em.DataError, r"weights\[0\] = -1.0"),
        ({"weights": np.r_[np.nan, np.ones(79)]}, ppl_em.DataError, r"weights\[0\] = nan"),
        ({"weights": np.zeros(80)}, ppl_em.DataError, r"weights are all 0"),
        ({"weights": np.ones(5)}, ppl_em.DataError, r"weights has shape \(5,\).*\(80,\)"),
        ({"labels": np.r_[2, -np.ones(79)]}, ppl_em.DataError, r"labels\[0\] = 2.0 is not a comp"),
        ({"labels": np.r_[-1, np.nan, -np.ones(78)]}, ppl_em.DataError, r"labels\[1\] = nan"),
        ({"labels": np.r_[-1, 0.5, -np.ones(78)]}, ppl_em.DataError, r"labels\[1\] = 0.5"),
        ({"fixed": {"sigma": [1.0, -1.0]}}, ppl_em.StartError, r"outside the support of 'sigma'"),
        ({"fixed": {"z": np.zeros(80)}}, ppl_em.StartError, r"'z'.*not a free variable|label"),
        ({"fixed": {"tau": 1.0}}, ppl_em.StartError, r"'tau', which is not a free variable"),
    ],
)
def test_bad_weights_labels_and_fixed_values_are_named(kwargs, error, match):
    x = np.concatenate([RNG.normal(-2, 1, 40), RNG.normal(2, 1, 40)])
    with pytest.raises(error, match=match):
        ppl_em.fit(_normal_2(x, "label", True), progressbar=False, **kwargs)


def test_weights_on_a_streamed_fit_and_fixed_with_prepared_are_refused():
    x = np.concatenate([RNG.normal(-2, 1, 40), RNG.normal(2, 1, 40)])
    model = _normal_2(x, "label", False)
    with pytest.raises(ValueError, match=r"weights= with data=.*omit data="):
        ppl_em.fit(model, data={"x": x}, weights=np.ones(80), progressbar=False)
    prepared = ppl_em.prepare(model)
    with pytest.raises(ValueError, match=r"fixed= with prepared=.*omit prepared"):
        ppl_em.fit(prepared=prepared, fixed={"mu": [0.0, 1.0]}, progressbar=False)
