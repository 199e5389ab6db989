"""Closed-form and numeric M-steps give the same update on every supported family."""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest

import ppl_em
from ppl_em.em import default_start
from ppl_em.model import analyse_model, build_plan, data_spec
from ppl_em.steps import m_step_from_resp, make_mstep_config, q_and_grad, whole_data
from tests.conftest import EXACT

RNG = np.random.default_rng(3)
N = 150


def binomial_label():
    x = RNG.binomial(12, 0.4, size=N)
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.full(3, 2.0))
        p = pm.Beta("p", 2.0, 3.0, shape=3)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Binomial("x", n=12, p=p[z], observed=x)
    return m, {"w", "p"}


def bernoulli_two_labels():
    x = RNG.binomial(1, 0.3, size=(N, 1)).ravel()
    with pm.Model() as m:
        pi = pm.Beta("pi", 2.0, 2.0)
        q = pm.Uniform("q", 0.0, 1.0, shape=2)
        z = pm.Bernoulli("z", p=pi, shape=N)
        pm.Bernoulli("x", p=q[z], observed=x)
    return m, {"pi", "q"}


def poisson_mixture():
    x = RNG.poisson(np.where(RNG.random(N) < 0.5, 2.0, 9.0))
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", alpha=2.0, beta=0.5, shape=2)
        pm.Mixture("x", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=x)
    return m, {"w", "mu"}


def exponential_list():
    x = RNG.exponential(np.where(RNG.random(N) < 0.5, 0.5, 4.0))
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.full(2, 1.5))
        lam = pm.Gamma("lam", alpha=2.0, beta=1.0, shape=2)
        comps = [pm.Exponential.dist(lam=lam[0]), pm.Exponential.dist(lam=lam[1])]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return m, {"w", "lam"}


def normal_known_sigma():
    x = RNG.normal(np.where(RNG.random(N) < 0.5, -2.0, 3.0), 1.0)
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 2.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu=mu[z], sigma=pt.as_tensor(np.array([1.0, 1.5]))[z], observed=x)
    return m, {"w", "mu"}


def normal_flat():
    x = RNG.normal(np.where(RNG.random(N) < 0.5, -2.0, 3.0), 1.0)
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=2)
        sigma = pm.HalfFlat("sigma", shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return m, {"w", "mu", "sigma"}


CASES = [binomial_label, bernoulli_two_labels, poisson_mixture, exponential_list,
         normal_known_sigma, normal_flat]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_closed_equals_numeric(case):
    model, expected_closed = case()
    functions, closed = ppl_em.prepare(model, mstep="closed")
    assert closed.plan.closed == expected_closed
    numeric = make_mstep_config(functions, closed.plan, "numeric", grad_reduction=EXACT)
    u0 = default_start(functions, numeric, rng=None)
    k = functions.graph.n_components
    gamma = RNG.dirichlet(np.ones(k), size=functions.graph.n_obs)
    a = functions.constrain(m_step_from_resp(functions, closed, u0, gamma))
    b = functions.constrain(m_step_from_resp(functions, numeric, u0, gamma))
    for name, va, vb in zip(functions.layout.rv_names, a, b, strict=True):
        np.testing.assert_allclose(va, vb, rtol=2e-6, atol=1e-8, err_msg=name)
    # Both are maximisers of the same Q: neither may beat the other
    batches = [(np.ascontiguousarray(gamma.T), whole_data(functions))]
    qa, _ = q_and_grad(functions, m_step_from_resp(functions, closed, u0, gamma), batches)
    qb, _ = q_and_grad(functions, m_step_from_resp(functions, numeric, u0, gamma), batches)
    assert qa >= qb - 1e-8 * abs(qb)


def test_map_with_non_conjugate_prior_goes_numeric():
    x = RNG.normal(size=N)
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 2.0, shape=2)
        sigma = pm.HalfNormal("sigma", 1.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    graph = analyse_model(m)
    plan = build_plan(graph, "map", data_spec(graph))
    assert plan.closed == {"w"}
    assert "sigma" in plan.reasons and "mu" in plan.reasons
    with pytest.raises(ppl_em.ClosedFormUnavailableError, match=r"'mu'|'sigma'"):
        ppl_em.prepare(m, mstep="closed")
    # the same model in mode="mle" is fully closed-form
    assert build_plan(graph, "mle", data_spec(graph)).closed == {"w", "mu", "sigma"}
