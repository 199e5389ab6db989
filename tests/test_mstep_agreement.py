"""Closed-form and numeric M-steps give the same update on every supported family."""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest

import ppl_em
from ppl_em.em import default_start
from ppl_em.model import analyse_model, build_plan, data_spec
from ppl_em.steps import m_step_from_resp, make_mstep_config, q_and_grad, stats_newton, whole_data
from ppl_em.steps import mstep as mstep_module
from tests.conftest import EXACT, assert_same_params

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


def categorical_lca():
    """Latent class analysis with 3 items of 4 categories; Dirichlet(2) item priors."""
    probs = np.array([[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]])
    z = RNG.integers(0, 2, N)
    x = np.stack([[RNG.choice(4, p=probs[k]) for _ in range(3)] for k in z])
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Dirichlet("p", a=np.full(4, 2.0), shape=(2, 3, 4))
        label = pm.Categorical("z", p=w, shape=N)
        pm.Categorical("x", p=p[label], observed=x)
    return m, {"w", "p"}


def _regression_flat(x, y, form="label"):
    """With a label, or a Mixture of batched (N, 2) or of list components."""
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Flat("alpha", shape=2)
        beta = pm.Flat("beta", shape=2)
        sigma = pm.HalfFlat("sigma", shape=2)
        if form == "label":
            z = pm.Categorical("z", p=w, shape=len(y))
            pm.Normal("y", mu=alpha[z] + beta[z] * x, sigma=sigma[z], observed=y)
        elif form == "batched":
            comps = pm.Normal.dist(mu=alpha + beta * x[:, None], sigma=sigma)
            pm.Mixture("y", w=w, comp_dists=comps, observed=y)
        else:
            comps = [pm.Normal.dist(alpha[k] + beta[k] * x, sigma[k]) for k in range(2)]
            pm.Mixture("y", w=w, comp_dists=comps, observed=y)
    return m, {"w", "alpha", "beta", "sigma"}


def gaussian_regression_flat():
    x = RNG.uniform(-3, 3, N)
    y = np.where(RNG.random(N) < 0.5, 1.0 + 2.0 * x, -1.0 - 0.5 * x) + RNG.normal(0, 0.5, N)
    return _regression_flat(x, y)


CASES = [categorical_lca, gaussian_regression_flat, binomial_label, bernoulli_two_labels,
         poisson_mixture, exponential_list, normal_known_sigma, normal_flat]  # fmt: skip


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


def test_map_with_non_conjugate_prior_is_maximised_from_the_statistics():
    x = RNG.normal(size=N)
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 2.0, shape=2)
        sigma = pm.HalfNormal("sigma", 1.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    graph = analyse_model(m)
    plan = build_plan(graph, "map", data_spec(graph))
    assert plan.closed == {"w"}
    assert plan.from_statistics == {"mu", "sigma"}
    assert "Newton's method maximises its Q from the E-step's statistics" in plan.reasons["sigma"]
    with pytest.raises(ppl_em.ClosedFormUnavailableError, match=r"'mu'|'sigma'"):
        ppl_em.prepare(m, mstep="closed")
    # the same model in mode="mle" is fully closed-form
    assert build_plan(graph, "mle", data_spec(graph)).closed == {"w", "mu", "sigma"}
    # a hierarchical prior (a free hyperparameter) is not a function of the statistics
    with pm.Model() as h:
        w = pm.Dirichlet("w", a=np.ones(2))
        scale = pm.HalfNormal("scale", 1.0)
        mu = pm.Normal("mu", 0.0, scale, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=1.0, observed=x)
    graph = analyse_model(h)
    assert build_plan(graph, "map", data_spec(graph)).from_statistics == frozenset()


def normal_halfnormal():
    return normal_halfnormal_on(RNG.normal(np.where(RNG.random(N) < 0.5, -2.0, 3.0), 1.0))


def normal_halfnormal_on(x):
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 2.0, shape=2)
        sigma = pm.HalfNormal("sigma", 1.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return m, {"mu", "sigma"}


def diagonal_lognormal_scales():
    x = RNG.normal(np.where(RNG.random((N, 1)) < 0.5, -2.0, 2.0), [1.0, 0.5])
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 5.0, shape=(2, 2))
        sigma = pm.LogNormal("sigma", 0.0, 1.0, shape=(2, 2))
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return m, {"mu", "sigma"}


def poisson_lognormal():
    x = RNG.poisson(np.where(RNG.random(N) < 0.5, 2.0, 9.0))
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.LogNormal("mu", 1.0, 1.0, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Poisson("x", mu=mu[z], observed=x)
    return m, {"mu"}


def lca_sharp_beta():
    x = RNG.binomial(1, np.where(RNG.random((N, 1)) < 0.5, 0.2, 0.8), size=(N, 4))
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Beta("p", 0.8, 0.8, shape=(2, 4))
        z = pm.Categorical("z", p=w, shape=N)
        pm.Bernoulli("x", p=p[z], observed=x)
    return m, {"p"}


def binomial_trials_per_observation():
    n = RNG.integers(5, 15, size=N)
    x = RNG.binomial(n, np.where(RNG.random(N) < 0.5, 0.3, 0.7))
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Beta("p", 0.7, 0.9, shape=2)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Binomial("x", n=n, p=p[z], observed=x)
    return m, {"p"}


def exponential_halfnormal_scale():
    x = RNG.exponential(np.where(RNG.random(N) < 0.5, 0.5, 4.0))
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        scale = pm.HalfNormal("scale", 5.0, shape=2)
        pm.Mixture("x", w=w, comp_dists=pm.Exponential.dist(scale=scale), observed=x)
    return m, {"scale"}


def _no_data_pass(*args, **kwargs):
    raise AssertionError("Newton on the statistics fell back to the numeric step")


def gaussian_regression_priors():
    """Two covariates (one in pm.Data, written before its coefficient), one noise scale
    shared by the components, Normal and HalfNormal priors."""
    x1, x2 = RNG.uniform(-3, 3, N), RNG.normal(size=N)
    y = np.where(RNG.random(N) < 0.5, 1.0 + 2.0 * x1 - x2, -1.0 - 0.5 * x1 + x2)
    y = y + RNG.normal(0, 0.5, N)
    with pm.Model() as m:
        data = pm.Data("x2", x2)
        w = pm.Dirichlet("w", a=np.ones(2))
        b = [pm.Normal(f"b{j}", 0.0, 5.0, shape=2) for j in range(3)]
        sigma = pm.HalfNormal("sigma", 2.0)
        z = pm.Categorical("z", p=w, shape=N)
        pm.Normal("y", mu=b[0][z] + b[1][z] * x1 + data * b[2][z], sigma=sigma, observed=y)
    return m, {"b0", "b1", "b2", "sigma"}


def stick_breaking_weights():
    """Weights from Beta sticks (PyMC's stick-breaking example): Q of the sticks is
    sum_k N_k log w_k(v), a function of the counts; flat means and scales."""
    x = RNG.normal(np.where(RNG.random(N) < 0.5, -2.0, 3.0), 1.0)
    with pm.Model() as m:
        v = pm.Beta("v", 1.0, 2.0, shape=3)
        w = v * pt.concatenate([[1.0], pt.extra_ops.cumprod(1 - v)[:-1]])
        mu = pm.Flat("mu", shape=3)
        sigma = pm.HalfFlat("sigma", shape=3)
        pm.NormalMixture("x", w=w / w.sum(), mu=mu, sigma=sigma, observed=x)
    return m, {"v"}


def _newton_equals_numeric(prepared, expected: set, gamma, monkeypatch):
    """One M-step from ``gamma`` by Newton on the statistics (no pass of the numeric
    step over the data allowed) and by the numeric step run to the end: the same
    maximiser. Returns both flat results and Newton's, constrained, by name."""
    functions, auto = prepared
    assert auto.plan.from_statistics == expected
    numeric = make_mstep_config(functions, auto.plan, "numeric", grad_reduction=EXACT)
    u0 = default_start(functions, numeric, rng=None)
    with monkeypatch.context() as patch:
        patch.setattr(mstep_module, "maximise_q", _no_data_pass)
        ua = m_step_from_resp(functions, auto, u0, gamma)
    ub = m_step_from_resp(functions, numeric, u0, gamma)
    assert_same_params(functions, ua, ub, rtol=2e-6, atol=1e-8)
    return ua, ub, dict(zip(functions.layout.rv_names, functions.constrain(ua), strict=True))


STATISTICS_CASES = [stick_breaking_weights, gaussian_regression_priors, normal_halfnormal,
                    diagonal_lognormal_scales, poisson_lognormal, lca_sharp_beta,
                    binomial_trials_per_observation, exponential_halfnormal_scale]  # fmt: skip


@pytest.mark.parametrize("case", STATISTICS_CASES, ids=lambda c: c.__name__)
def test_statistics_newton_equals_the_numeric_maximiser_of_q(case, monkeypatch):
    """Newton on Q written in the E-step's statistics reaches the maximiser of Q summed
    over the data (the numeric M-step run to the end) from the same responsibilities."""
    model, expected = case()
    prepared = ppl_em.prepare(model)
    functions = prepared.functions
    k = functions.graph.n_components
    gamma = RNG.dirichlet(np.ones(k), size=functions.graph.n_obs)
    ua, ub, _ = _newton_equals_numeric(prepared, expected, gamma, monkeypatch)
    batches = [(np.ascontiguousarray(gamma.T), whole_data(functions))]
    qa, _ = q_and_grad(functions, ua, batches)
    qb, _ = q_and_grad(functions, ub, batches)
    assert qa >= qb - 1e-9 * abs(qb)


def test_a_narrow_component_far_from_the_centre_keeps_the_statistics_newton(monkeypatch):
    """A component on 15 points spread 0.01 apart, 7 units from the data's centre:
    its sums about the centre would cancel (variance 1e-4 beside a squared shift of
    49), and its sums about its own mean are used instead: no pass of the numeric step
    over the data, and the same maximiser of Q as that step run to the end."""
    rng = np.random.default_rng(5)
    x = np.r_[rng.normal(0.0, 1.0, 400), -7.0 + rng.normal(0.0, 0.01, 15)]
    gamma = np.zeros((x.size, 2))
    gamma[:400, 0], gamma[400:, 1] = 1.0, 1.0
    gamma = 0.999999 * gamma + 0.0000005
    model, expected = normal_halfnormal_on(x)
    *_, a = _newton_equals_numeric(ppl_em.prepare(model), expected, gamma, monkeypatch)
    # the narrow component's scale is the weighted sd of its points, its prior aside
    spike = gamma[:, 1] / gamma[:, 1].sum()
    sd = np.sqrt(spike @ (x - spike @ x) ** 2)
    assert a["sigma"][1] == pytest.approx(sd, rel=1e-3)


@pytest.mark.parametrize("form", ["label", "batched", "list"])
def test_gaussian_regression_mixture_matches_a_numpy_em(form):
    """Weighted least squares per component: the fit equals an EM for a mixture of
    linear regressions written here in NumPy, from the same start."""
    n = 400
    rng = np.random.default_rng(11)
    x = rng.uniform(-3, 3, n)
    y = np.where(rng.random(n) < 0.4, 1.0 + 2.0 * x, -1.0 - 0.5 * x) + rng.normal(0, 0.6, n)
    model, _ = _regression_flat(x, y, form)
    assert "normal_linear" in [b.family for b in ppl_em.prepare(model).config.plan.blocks]
    start = {"w": np.array([0.5, 0.5]), "alpha": np.array([0.5, -0.5]),
             "beta": np.array([1.0, 0.0]), "sigma": np.array([1.0, 1.0])}  # fmt: skip
    fit = ppl_em.fit(model, mode="mle", start=start, tol=1e-14, gap_tol=1e-12,
                     progressbar=False, accelerate=None)  # fmt: skip
    w, a, b, s = (start[k].copy() for k in ("w", "alpha", "beta", "sigma"))
    design = np.stack([np.ones(n), x], axis=1)
    for _ in range(fit.n_iter):
        dens = w * np.exp(-0.5 * ((y[:, None] - a - b * x[:, None]) / s) ** 2) / s
        gamma = dens / dens.sum(axis=1, keepdims=True)
        w = gamma.mean(axis=0)
        for k in range(2):
            gw = gamma[:, k]
            a[k], b[k] = np.linalg.solve(design.T @ (gw[:, None] * design), design.T @ (gw * y))
            s[k] = np.sqrt(gw @ (y - a[k] - b[k] * x) ** 2 / gw.sum())
    for name, ref in (("w", w), ("alpha", a), ("beta", b), ("sigma", s)):
        np.testing.assert_allclose(fit.params[name], ref, rtol=1e-8, err_msg=name)


def test_statistics_newton_recentres_where_sums_would_cancel(monkeypatch):
    """Components 2000 standard deviations apart: their second moments about the data's
    mean would lose their variance to cancellation, so the block's sums are taken
    again about each component's mean (one pass over the data, not the numeric step),
    and Newton on them still reaches Q's maximiser."""
    x = np.concatenate([RNG.normal(-1e3, 1.0, N // 2), RNG.normal(1e3, 1.0, N - N // 2)])
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 1e4, shape=2)
        sigma = pm.HalfNormal("sigma", 10.0, shape=2)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    functions, auto = ppl_em.prepare(m)
    assert auto.plan.from_statistics == {"mu", "sigma"}
    exact = auto._replace(grad_reduction=EXACT)
    numeric = make_mstep_config(functions, auto.plan, "numeric", grad_reduction=EXACT)
    gamma = np.where((x > 0)[:, None], [1e-9, 1 - 1e-9], [1 - 1e-9, 1e-9])
    u0 = default_start(functions, numeric, rng=None)
    calls = []
    real = stats_newton._centred_sums
    monkeypatch.setattr(stats_newton, "_centred_sums", lambda *a: calls.append(1) or real(*a))
    with monkeypatch.context() as patch:
        patch.setattr(mstep_module, "maximise_q", _no_data_pass)
        a = functions.constrain(m_step_from_resp(functions, exact, u0, gamma))
    assert calls, "the cancelling sums were used"
    b = functions.constrain(m_step_from_resp(functions, numeric, u0, gamma))
    for name, va, vb in zip(functions.layout.rv_names, a, b, strict=True):
        np.testing.assert_allclose(va, vb, rtol=1e-6, err_msg=name)


def test_list_components_with_different_covariates_are_not_one_regression():
    """One regression needs the same covariates in every component; else each
    coefficient is left to the numeric M-step, which still fits it."""
    x = RNG.uniform(-3, 3, 50)
    with pm.Model() as m:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Flat("alpha", shape=2)
        beta = pm.Flat("beta", shape=2)
        covariates = [x, x**2]
        comps = [pm.Normal.dist(alpha[k] + beta[k] * covariates[k], 1.0) for k in range(2)]
        pm.Mixture("y", w=w, comp_dists=comps, observed=np.sin(x))
    plan = ppl_em.prepare(m).config.plan
    assert [b.family for b in plan.blocks] == ["weights"]
    assert {"alpha", "beta"} <= set(plan.reasons)
