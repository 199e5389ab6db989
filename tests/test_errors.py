"""Issue 2's error cases: each raises a clear error that names the variable."""

import numpy as np
import pymc as pm
import pytest

import ppl_em
from tests.models_for_tests import coin_label

X = np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2, 5, 2, 4, 4, 6, 4, 5, 6, 3, 3])


def test_model_without_label_or_mixture():
    with pm.Model() as model:
        mu = pm.Normal("mu")
        pm.Normal("y", mu=mu, observed=np.zeros(5))
    with pytest.raises(ppl_em.ModelStructureError, match=r"no mixture.*pm.Categorical"):
        ppl_em.fit(model, progressbar=False)


@pytest.fixture(scope="module")
def coin():
    return ppl_em.prepare(coin_label(X))


def test_start_unknown_name(coin):
    with pytest.raises(ppl_em.StartError, match=r"unknown variable 'phi'.*\['w', 'p'\]"):
        ppl_em.fit(start={"phi": [0.4, 0.5, 0.6]}, prepared=coin, progressbar=False)


def test_start_transformed_name_gets_a_hint(coin):
    with pytest.raises(ppl_em.StartError, match="constrained name 'p'"):
        ppl_em.fit(start={"p_logodds__": [0.0, 0.0, 0.0]}, prepared=coin, progressbar=False)


def test_start_wrong_shape(coin):
    with pytest.raises(ppl_em.StartError, match=r"start\['p'\] has shape \(2,\).*\(3,\)"):
        ppl_em.fit(start={"p": [0.4, 0.5]}, prepared=coin, progressbar=False)


def test_start_outside_support(coin):
    with pytest.raises(ppl_em.StartError, match=r"start\['p'\].*outside the support"):
        ppl_em.fit(start={"p": [0.4, 1.5, 0.5]}, prepared=coin, progressbar=False)


@pytest.mark.filterwarnings("ignore::pymc.ImputationWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_observed(bad):
    x = np.array([0.1, 2.0, bad, 1.0, 3.0])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", 1.0, 1.0, shape=2)
        pm.Mixture("waiting", w=w, comp_dists=pm.Exponential.dist(lam=lam), observed=x)
    with pytest.raises(ppl_em.DataError, match="'waiting'"):
        ppl_em.fit(model, progressbar=False)


def test_bad_mode_and_mstep():
    model = coin_label(X)
    with pytest.raises(ValueError, match="mode='bayes'"):
        ppl_em.fit(model, mode="bayes", progressbar=False)
    with pytest.raises(ValueError, match="mstep='exact'"):
        ppl_em.fit(model, mstep="exact", progressbar=False)
