"""Bad input raises a clear error naming the variable, the value or position, and the fix."""

import numpy as np
import pymc as pm
import pytest

import ppl_em
from ppl_em import DataError, ModelStructureError, StartError
from ppl_em.em import apply_start
from ppl_em.model import analyse_model

X = np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2])


def binomial(x, k=2, n=10):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        p = pm.Beta("p", 1.0, 1.0, shape=k)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Binomial("x", n=n, p=p[z], observed=x)
    return model


@pytest.fixture(scope="module")
def prepared():
    return ppl_em.prepare(binomial(X))


@pytest.fixture(scope="module")
def poisson_prepared():
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 2.0, 1.0, shape=2)
        pm.Mixture("y", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=X)
    return ppl_em.prepare(model)


def exponential(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", 1.0, 0.1, shape=2)
        pm.Mixture("t", w=w, comp_dists=pm.Exponential.dist(lam=lam), observed=x)
    return model


# --- observed data -------------------------------------------------------------------


def test_nan_in_one_dimensional_observed_data_is_a_missing_observation():
    with pytest.raises(DataError, match=r"observation 1 of \['x'\] is missing entirely"):
        analyse_model(binomial(np.array([1.0, np.nan, 3.0])))


def test_inf_in_observed_data():
    x = np.array([0.5, 1.0, np.inf, 2.0])
    with pytest.raises(DataError, match=r"'t' are not finite at index \(2,\) \(value .*inf"):
        analyse_model(exponential(x))


@pytest.mark.parametrize(("x", "index", "value"), [([3, 11, 4, 2], 1, 11), ([3, 4, -1, 2], 2, -1)])
def test_binomial_counts_outside_0_n(x, index, value):
    # The support check runs in fit, at PyMC's initial point, before any EM step.
    with pytest.raises(DataError, match=rf"observation {index} of 'x' has value {value}\b"):
        ppl_em.fit(binomial(np.array(x)), progressbar=False)


def test_binomial_counts_above_n_via_with_data(prepared):
    bad = X.copy()
    bad[7] = 12
    with pytest.raises(DataError, match=r"observation 7 of 'x' has value 12.*Binomial"):
        ppl_em.with_data(prepared, x=bad)


def test_negative_poisson_count(poisson_prepared):
    bad = X.copy()
    bad[3] = -2
    with pytest.raises(DataError, match=r"observation 3 of 'y' has value -2.*Poisson"):
        ppl_em.with_data(poisson_prepared, y=bad)


def test_negative_exponential_time():
    x = np.array([0.5, 1.2, 3.0, -0.1, 2.0, 0.0])
    # 0.0 (index 5) is in the Exponential's support (density lam); only index 3 is named.
    with pytest.raises(DataError, match=r"observation 3 of 't' has value -0.1.*ial.*indices \[3\]"):
        ppl_em.fit(exponential(x), progressbar=False)


def test_with_data_wrong_shape_dtype_name_and_fractional_counts(prepared):
    with pytest.raises(DataError, match=r"shape \(9,\).*compiled for shape \(10,\)"):
        ppl_em.with_data(prepared, x=X[:9])
    with pytest.raises(TypeError, match=r"'x' has dtype <U1"):
        ppl_em.with_data(prepared, x=np.array(list("abcdefghij")))
    with pytest.raises(DataError, match=r"'heads' is not an observed variable.*\['x'\]"):
        ppl_em.with_data(prepared, heads=X)
    with pytest.raises(DataError, match=r"must be integers.*index \(4,\) holds 2.5"):
        ppl_em.with_data(prepared, x=np.where(np.arange(10) == 4, 2.5, X))
    with pytest.raises(DataError, match=r"not finite at index \(0,\)"):
        ppl_em.with_data(prepared, x=np.where(np.arange(10) == 0, np.nan, X))


def test_with_data_refits_without_recompiling(prepared):
    new = np.array([9, 8, 9, 1, 0, 1, 9, 1, 8, 0])
    res = ppl_em.fit(prepared=ppl_em.with_data(prepared, x=new), mode="map", progressbar=False)
    # Two well separated coins: the estimate is near the two groups' pooled frequencies.
    hi, lo = new[new > 4], new[new <= 4]
    np.testing.assert_allclose(
        np.sort(res.params["p"]), [lo.mean() / 10, hi.mean() / 10], atol=1e-3
    )
    assert prepared.functions.data[0].tolist() == X.tolist()  # the original is untouched


def test_k_larger_than_n():
    with pytest.raises(ModelStructureError, match=r"K=3 components but only N=2"):
        analyse_model(binomial(np.array([1, 2]), k=3))


def test_label_and_observed_shapes():
    ones = np.ones((5, 2), dtype=int)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Beta("p", 1.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=(5, 2))
        pm.Binomial("x", n=10, p=p[z], observed=ones)
    with pytest.raises(ModelStructureError, match=r"label 'z' has shape \(5, 2\).*shape \(N,\)"):
        analyse_model(model)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Beta("p", 1.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=2)
        pm.Binomial("x", n=10, p=p[z][None, :], observed=ones)
    with pytest.raises(ModelStructureError, match=r"'x' has shape \(5, 2\) but label 'z' has"):
        analyse_model(model)


def test_observed_pm_data_has_a_shape():
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=3)
        pm.Normal("x", mu=mu[z], sigma=1.0, observed=pm.Data("xd", np.array([1.0, 2.0, 3.0])))
    assert analyse_model(model).n_obs == 3


# --- start ----------------------------------------------------------------------------


def _apply(prepared, start):
    functions = prepared.functions
    return apply_start(functions, start, np.zeros(functions.layout.size))


@pytest.mark.parametrize(
    ("start", "match"),
    [
        ({"q": [0.5, 0.5]}, r"unknown variable 'q'; the free parameters are \['w', 'p'\]"),
        ({"z": [0, 1]}, r"unknown variable 'z'.*label is marginalised"),
        ({"w_simplex__": [0.0]}, r"constrained name 'w'"),
        ({"p": [0.5, 0.5, 0.5]}, r"start\['p'\] has shape \(3,\) but 'p' has shape \(2,\)"),
        ({"p": [0.5, 1.5]}, r"start\['p'\] = \[0.5, 1.5\] is outside the support"),
        ({"p": [0.0, 0.5]}, r"start\['p'\] = \[0.0, 0.5\] is outside the support"),
        ({"w": [0.5, 0.6]}, r"start\['w'\] = \[0.5, 0.6\] is outside the support.*summing"),
        ({"w": [-0.5, 1.5]}, r"start\['w'\] .* is outside the support"),
        ({"p": [np.nan, 0.5]}, r"start\['p'\] is not finite at index \(0,\)"),
        ({"p": ["a", "b"]}, r"start\['p'\] = \['a', 'b'\] is not numeric"),
    ],
)
def test_bad_start(prepared, start, match):
    with pytest.raises(StartError, match=match):
        _apply(prepared, start)


def test_start_not_a_dict(prepared):
    with pytest.raises(StartError, match=r"start must be a dict.*got list"):
        ppl_em.fit(prepared=prepared, start=[0.5, 0.5], progressbar=False)


def test_good_start_round_trips(prepared):
    u = _apply(prepared, {"w": [0.3, 0.7], "p": [0.2, 0.9]})
    w, p = prepared.functions.constrain(u)
    np.testing.assert_allclose(w, [0.3, 0.7], rtol=1e-12)
    np.testing.assert_allclose(p, [0.2, 0.9], rtol=1e-12)


# --- model structure and latent= --------------------------------------------------------


def test_latent_names():
    model = binomial(X)
    with pytest.raises(ModelStructureError, match=r"latent='zz' is not a variable.*'z'"):
        analyse_model(model, latent="zz")
    with pytest.raises(ModelStructureError, match=r"latent='p' is not a free finite discrete"):
        analyse_model(model, latent="p")
    with pytest.raises(ModelStructureError, match=r"latent='x' is an observed Binomial"):
        analyse_model(model, latent="x")
    with pytest.raises(TypeError, match=r"latent must be a variable name \(str\), got 3"):
        analyse_model(model, latent=3)


def test_infinite_discrete_label():
    with pm.Model() as model:
        rate = pm.Gamma("rate", 2.0, 1.0)
        z = pm.Poisson("z", mu=rate, shape=len(X))
        pm.Normal("x", mu=z, sigma=1.0, observed=X)
    with pytest.raises(ModelStructureError, match=r"label 'z' is a PoissonRV.*Categorical"):
        analyse_model(model)


def test_other_discrete_latents():
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Beta("p", 1.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(X))
        pm.Bernoulli("flag", p=0.5)
        pm.Binomial("x", n=10, p=p[z], observed=X)
    with pytest.raises(ModelStructureError, match=r"2 discrete latent variables \['z', 'flag'\]"):
        analyse_model(model)
    with pytest.raises(ModelStructureError, match=r"besides the label 'z'.*\['flag'\]"):
        analyse_model(model, latent="z")


def test_label_without_observed_dependent():
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        pm.Categorical("z", p=w, shape=len(X))
        pm.Binomial("x", n=10, p=0.5, observed=X)
    with pytest.raises(ModelStructureError, match=r"label 'z' has no observed dependent"):
        analyse_model(model)


def test_no_mixture_at_all():
    with pm.Model() as model:
        p = pm.Beta("p", 1.0, 1.0)
        pm.Binomial("x", n=10, p=p, observed=X)
    with pytest.raises(ModelStructureError, match=r"found no mixture"):
        analyse_model(model)


# --- fit arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "ml"}, ValueError, r"mode='ml' is not one of \('map', 'mle'\)"),
        ({"mstep": "exact"}, ValueError, r"mstep='exact' is not one of"),
        ({"max_iter": 0}, ValueError, r"max_iter=0 must be an integer >= 1"),
        ({"max_iter": 10.5}, ValueError, r"max_iter=10.5 must be an integer"),
        ({"max_iter": "10"}, ValueError, r"max_iter='10' must be an integer"),
        ({"max_iter": True}, ValueError, r"max_iter=True must be an integer"),
        ({"tol": -1.0}, ValueError, r"tol=-1.0 must be a positive finite number"),
        ({"tol": "1e-8"}, ValueError, r"tol='1e-8' must be a positive finite number"),
        ({"tol": np.nan}, ValueError, r"tol=nan must be a positive finite"),
        ({"n_init": 0}, ValueError, r"n_init=0 must be an integer >= 1"),
        ({"random_seed": "42"}, TypeError, r"random_seed must be None, an int or a numpy"),
        ({"random_seed": 1.5}, TypeError, r"random_seed must be .* got float"),
        ({"progressbar": "yes"}, TypeError, r"progressbar must be True or False, got 'yes'"),
        ({"prepared": "compiled"}, TypeError, r"prepared must be the result of ppl_em.prepare"),
        ({"reg_covar": -1e-6}, ValueError, r"reg_covar=-1e-06 must be a finite number >= 0"),
        ({"reg_covar": np.inf}, ValueError, r"reg_covar=inf must be"),
        ({"latent": ["z"]}, TypeError, r"latent must be a variable name"),
        ({"model": "coin"}, TypeError, r"model must be a pm.Model or None, got str"),
    ],
)
def test_fit_argument_types(kwargs, error, match):
    model = kwargs.pop("model", binomial(X))
    with pytest.raises(error, match=match):
        ppl_em.fit(model, progressbar=kwargs.pop("progressbar", False), **kwargs)


def test_reg_covar_without_normal_components(prepared):
    with pytest.raises(ValueError, match=r"reg_covar=0.1 is only supported.*has none"):
        ppl_em.fit(prepared=prepared, reg_covar=0.1, progressbar=False)
