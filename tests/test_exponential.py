"""The seed's exponential mixture (shared/seeds/000): M-step formulas and recovery."""

import numpy as np
import pymc as pm
import pytest

import ppl_em
from ppl_em.em import apply_start, em_init
from ppl_em.steps import m_step_from_resp, make_mstep_config
from tests.conftest import EXACT, assert_monotone

RATES, WEIGHTS = np.array([0.5, 5.0]), np.array([0.4, 0.6])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    z = rng.choice(2, size=3000, p=WEIGHTS)
    return rng.exponential(1.0 / RATES[z])


def label_model(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", alpha=1.0, beta=0.1, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Exponential("x", lam=lam[z], observed=x)
    return model


def mixture_model(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", alpha=1.0, beta=0.1, shape=2)
        pm.Mixture("x", w=w, comp_dists=pm.Exponential.dist(lam=lam), observed=x)
    return model


@pytest.mark.parametrize("builder", [label_model, mixture_model])
def test_mstep_is_the_seed_formula(builder, data):
    prepared = ppl_em.prepare(builder(data), mode="mle")
    functions, auto = prepared
    assert auto.plan.closed == {"w", "lam"}
    numeric = make_mstep_config(functions, auto.plan, "numeric", grad_reduction=EXACT)
    u = apply_start(functions, {"w": [0.5, 0.5], "lam": [1.0, 2.0]}, np.zeros(3))
    gamma = np.exp(em_init(functions, u).log_resp)
    # The seed: pi_j = mean_i gamma_ij, lambda_j = N_j / sum_i gamma_ij x_i
    pi = gamma.mean(axis=0)
    lam = gamma.sum(axis=0) / (gamma.T @ data)
    for config in (auto, numeric):
        w_new, lam_new = functions.constrain(m_step_from_resp(functions, config, u, gamma))
        np.testing.assert_allclose(w_new, pi, rtol=1e-7)
        np.testing.assert_allclose(lam_new, lam, rtol=1e-7)


def test_fit_recovers_true_rates(data):
    res = ppl_em.fit(mixture_model(data), progressbar=False)
    order = np.argsort(res.params["lam"])
    assert res.converged
    assert_monotone(res.history)
    np.testing.assert_allclose(res.params["lam"][order], RATES, rtol=0.12)
    np.testing.assert_allclose(res.params["w"][order], WEIGHTS, atol=0.05)
