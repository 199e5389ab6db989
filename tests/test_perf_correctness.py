"""The fast paths compute the same numbers as the slow ones and as independent references.

- the M-step from fused statistics equals the closed form from full responsibilities;
- the compiled joint and the E-step equal SciPy's densities;
- a converged fit equals scikit-learn's GaussianMixture;
- new data of the same shape reuse the compiled functions.
"""

import numpy as np
import pymc as pm
import pytest
from scipy import stats
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture

import ppl_em
import ppl_em.compiled.functions as compiled_functions
from ppl_em.compiled import build_em_functions
from ppl_em.em import apply_start, default_start, em_init, em_step, run_em
from ppl_em.model import analyse_model
from ppl_em.steps import Expectations, e_step, joint, m_step, m_step_from_resp, whole_data
from ppl_em.steps.passes import fused_estep
from tests.models_for_tests import coin_label, gaussian_data, gaussian_label, mvnormal_mixture

RNG = np.random.default_rng(11)
X_GAUSS = gaussian_data(n=3000, seed=4)


def _flat_gaussian_mixture(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Flat("mu", shape=3)
        sigma = pm.HalfFlat("sigma", shape=3)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model


def _gaussian_label_flat(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Flat("mu", shape=3)
        sigma = pm.HalfFlat("sigma", shape=3)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return model


def _poisson(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 2.0, 0.5, shape=2)
        pm.Mixture("x", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=x)
    return model


def _exponential(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", 1.0, 0.1, shape=2)
        pm.Mixture("x", w=w, comp_dists=pm.Exponential.dist(lam=lam), observed=x)
    return model


def _binomial_per_obs_trials(x, n):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        p = pm.Beta("p", 2.0, 2.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Binomial("x", n=n, p=p[z], observed=x)
    return model


def _known_sigma(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Normal("mu", 0.0, 10.0, shape=3)
        pm.NormalMixture("x", w=w, mu=mu, sigma=np.array([1.0, 0.7, 1.5]), observed=x)
    return model


N_TRIALS = RNG.integers(5, 30, size=400)
# Components 10^5 of their standard deviations apart: the fused second moments about
# the data mean would cancel, so the statistics path must refuse (and gamma is used).
X_FAR = np.concatenate([RNG.normal(m, 1.0, 200) for m in (0.0, 5e4, 1e5)])
MODELS = {
    "normal_mixture": lambda: (_flat_gaussian_mixture(X_GAUSS), "mle"),
    "normal_label": lambda: (_gaussian_label_flat(X_GAUSS), "map"),
    "normal_tiny_scale": lambda: (_flat_gaussian_mixture(X_GAUSS * 1e-110), "mle"),
    "normal_offset": lambda: (_flat_gaussian_mixture(X_GAUSS + 1e8), "mle"),
    "normal_far_apart": lambda: (_flat_gaussian_mixture(X_FAR), "mle"),
    "normal_known_sigma": lambda: (_known_sigma(X_GAUSS), "map"),
    "poisson": lambda: (_poisson(RNG.poisson(np.repeat([2.0, 9.0], 300))), "map"),
    "exponential": lambda: (_exponential(RNG.exponential(np.repeat([0.5, 4.0], 300))), "map"),
    "binomial_trials": lambda: (
        _binomial_per_obs_trials(RNG.binomial(N_TRIALS, np.repeat([0.2, 0.7], 200)), N_TRIALS),
        "map",
    ),
    "coin": lambda: (coin_label(np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2, 5, 2, 4, 4, 6])), "map"),
}


# At 1e8 +- 1 the gamma path's sum(gamma x) / N_k is off by ~1e-7 (the statistics
# path, centred on the data mean, by 1 ulp: next test), and the objective by ~1e-9.
OBJECTIVE_RTOL = {"normal_offset": 1e-8}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stats_mstep_equals_gamma_mstep(name):
    model, mode = MODELS[name]()
    functions, config = ppl_em.prepare(model, mode=mode)
    assert not config.numeric_mask.any()
    state = em_init(functions, default_start(functions, config, None), config)
    assert state.stats is not None
    for _ in range(3):
        fast = em_step(functions, config, state)
        # the same M-step from statistics of the responsibilities matrix, not the fused pass
        slow_u = m_step_from_resp(functions, config, state.u, np.exp(state.log_resp))
        slow = em_init(functions, slow_u, config)
        np.testing.assert_allclose(fast.u, slow.u, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            fast.objective, slow.objective, rtol=OBJECTIVE_RTOL.get(name, 1e-12)
        )
        state = fast


def test_stats_mstep_is_accurate_at_large_offsets():
    """Reference: the weighted moments in extended precision (np.longdouble)."""
    model, mode = MODELS["normal_offset"]()
    functions, config = ppl_em.prepare(model, mode=mode)
    state = em_init(functions, default_start(functions, config, None), config)
    new = em_step(functions, config, state)
    gamma = np.exp(state.log_resp).astype(np.longdouble)
    x = (X_GAUSS + 1e8).astype(np.longdouble)[:, None]
    nk = gamma.sum(axis=0)
    mu = (gamma * x).sum(axis=0) / nk
    var = (gamma * (x - mu) ** 2).sum(axis=0) / nk
    params = dict(zip(functions.layout.rv_names, functions.constrain(new.u), strict=True))
    assert np.all(np.abs(params["mu"] - mu) <= 2 * np.spacing(1e8))
    np.testing.assert_allclose(params["sigma"] ** 2, var.astype(float), rtol=1e-14)


def test_joint_and_estep_match_scipy():
    functions, config = ppl_em.prepare(_flat_gaussian_mixture(X_GAUSS), mode="mle")
    w, mu, sigma = np.array([0.2, 0.3, 0.5]), np.array([-3.0, 0.5, 4.0]), np.array([1, 2, 0.5])
    u = apply_start(functions, {"w": w, "mu": mu, "sigma": sigma}, np.zeros(8))
    expected = np.log(w) + stats.norm.logpdf(X_GAUSS[:, None], mu, sigma)
    np.testing.assert_allclose(joint(functions, u), expected, rtol=1e-12)
    st = e_step(functions, u, whole_data(functions), keep_resp=True)
    log_resp = st.log_resp
    loglik = st.loglik + functions.fixed(u, *functions.fixed_data)[0]
    lse = logsumexp(expected, axis=1)
    np.testing.assert_allclose(log_resp, expected - lse[:, None], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loglik, lse.sum(), rtol=1e-12)
    state = em_init(functions, u, config)
    gamma = np.exp(expected - lse[:, None])
    np.testing.assert_allclose(state.stats.nk, gamma.sum(axis=0), rtol=1e-11)
    # the Normal block's columns are the data centred on their mean, and their squares
    dev = X_GAUSS - X_GAUSS.mean()
    np.testing.assert_allclose(state.stats.s[0], gamma.T @ dev, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(state.stats.s[1], gamma.T @ dev**2, rtol=1e-11)


def _stats_refused(functions, config, state) -> bool:
    """Whether the closed-form M-step from ``state``'s statistics refuses them and reads
    the responsibilities instead (the second pass over them)."""
    read = []
    chunk = whole_data(functions, state.request)
    gamma_t = np.ascontiguousarray(np.exp(state.log_resp.T))

    def batches():
        read.append(True)
        return [(gamma_t, chunk)]

    m_step(functions, config, state.u, Expectations(state.stats, state.request, batches))
    return bool(read)


def test_stats_path_refuses_when_moments_would_cancel():
    functions, config = ppl_em.prepare(_flat_gaussian_mixture(X_FAR), mode="mle")
    start = {"w": [0.3, 0.3, 0.4], "mu": [0.0, 5e4, 1e5], "sigma": [1.0, 1.0, 1.0]}
    u = apply_start(functions, start, np.zeros(functions.layout.size))
    state = em_init(functions, u, config)
    assert state.stats is not None and _stats_refused(functions, config, state)
    near = ppl_em.prepare(_flat_gaussian_mixture(X_GAUSS), mode="mle")
    u = default_start(near.functions, near.config, None)
    state = em_init(near.functions, u, near.config)
    assert not _stats_refused(near.functions, near.config, state)


def test_converged_fit_equals_sklearn():
    with _flat_gaussian_mixture(X_GAUSS):
        res = ppl_em.fit(mode="mle", tol=1e-13, max_iter=5000, progressbar=False)
    gm = GaussianMixture(3, reg_covar=0.0, tol=1e-12, max_iter=5000, random_state=0)
    gm.fit(X_GAUSS[:, None])
    order, sk_order = np.argsort(res.params["mu"]), np.argsort(gm.means_[:, 0])
    np.testing.assert_allclose(res.params["mu"][order], gm.means_[sk_order, 0], rtol=1e-6)
    np.testing.assert_allclose(res.params["w"][order], gm.weights_[sk_order], rtol=1e-6)
    np.testing.assert_allclose(
        res.params["sigma"][order] ** 2, gm.covariances_[sk_order, 0, 0], rtol=1e-6
    )
    np.testing.assert_allclose(res.loglik, gm.score(X_GAUSS[:, None]) * X_GAUSS.size, rtol=1e-9)


def test_new_data_reuse_compiled_functions():
    prepared = ppl_em.prepare(_flat_gaussian_mixture(X_GAUSS), mode="mle")
    first = ppl_em.fit(prepared=prepared, mode="mle", tol=1e-12, progressbar=False)
    compiled = prepared.functions.rows.compiled
    x2 = gaussian_data(n=3000, seed=9)
    again = ppl_em.with_data(prepared, x=x2)
    second = ppl_em.fit(prepared=again, mode="mle", tol=1e-12, progressbar=False)
    assert again.functions.rows.compiled is compiled
    with _flat_gaussian_mixture(x2):
        fresh = ppl_em.fit(mode="mle", tol=1e-12, progressbar=False)
    np.testing.assert_allclose(second.loglik, fresh.loglik, rtol=1e-12)
    assert not np.isclose(first.loglik, second.loglik)


def test_threaded_fused_estep_equals_serial():
    """Large N splits the fused pass across threads; the split must not change the
    answer beyond summation order (1e-12 relative)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=50_000)
    mu, sd = np.array([-1.0, 0.5, 2.0]), np.array([1.0, 0.3, 2.0])
    joint = stats.norm.logpdf(x[None], mu[:, None], sd[:, None]) + np.log(1 / 3)
    cols = np.stack([x, x**2])
    serial = fused_estep(joint.copy(), cols, chunk=4096, workers=1)
    threaded = fused_estep(joint.copy(), cols, chunk=4096, workers=2)
    np.testing.assert_array_equal(serial[0], threaded[0])
    assert threaded[1] == pytest.approx(serial[1], rel=1e-12)
    for a, b in zip(serial[2:], threaded[2:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # and both equal the direct computation
    resp = np.exp(joint - logsumexp(joint, axis=0))
    np.testing.assert_allclose(threaded[2], resp.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(threaded[3][0], resp @ x, rtol=1e-10)
    np.testing.assert_allclose(threaded[3][1], resp @ x**2, rtol=1e-10)


def test_backend_choice_changes_speed_not_results():
    x = gaussian_data(300, seed=2)
    auto = ppl_em.fit(_flat_gaussian_mixture(x), mode="mle", random_seed=0, progressbar=False)
    prepared = ppl_em.prepare(_flat_gaussian_mixture(x), mode="mle", backend="c")
    c = ppl_em.fit(prepared=prepared, random_seed=0, progressbar=False)
    assert c.loglik == pytest.approx(auto.loglik, rel=1e-12)
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(c.params[name], auto.params[name], rtol=1e-9)
    with pytest.raises(ValueError, match=r"backend='gpu' is not one of"):
        ppl_em.prepare(_flat_gaussian_mixture(x), backend="gpu")


def test_a_small_numeric_fit_runs_q_on_numpy_ops_until_many_calls(monkeypatch):
    """With a numeric M-step on a small data set Q starts on NumPy-backed Ops (compiling
    it to C was most of a cold fit) and switches to C after ``SWITCH_CALLS`` calls, a
    multivariate logp's Q too (a cold first fit of the 2-D MvNormal example took 76.7 s
    with C from the start, 11.6 s so). Either way the fit is C's fit."""
    x = gaussian_data(300, seed=2)
    reference = ppl_em.fit(
        prepared=ppl_em.prepare(gaussian_label(x), mstep="numeric", backend="c"),
        progressbar=False,
    )

    def fit_auto():
        prepared = ppl_em.prepare(gaussian_label(x), mstep="numeric")
        return prepared, ppl_em.fit(prepared=prepared, progressbar=False)

    prepared, short = fit_auto()
    assert not prepared.functions.compiled_rows
    assert not prepared.functions.q_and_grad.is_compiled
    monkeypatch.setattr(compiled_functions, "SWITCH_CALLS", 20)
    prepared, switched = fit_auto()
    assert prepared.functions.q_and_grad.is_compiled
    for fit in (short, switched):
        assert fit.objective == pytest.approx(reference.objective, abs=1e-8)
        for name in ("w", "mu", "sigma"):
            np.testing.assert_allclose(fit.params[name], reference.params[name], rtol=1e-6)
    mvn = ppl_em.prepare(mvnormal_mixture(RNG.normal(size=(40, 2))), mstep="numeric")
    assert isinstance(mvn.functions.q_and_grad, compiled_functions.SwitchingFunction)
    assert not mvn.functions.compiled_rows


def test_q_is_differentiated_only_when_a_fit_asks_for_it(monkeypatch):
    """Q's gradient graph is built on first use, once: a closed-form fit never calls Q
    (differentiating it was most of preparing the 2-D MvNormal example)."""
    built = []
    q_graph = compiled_functions._q_graph
    monkeypatch.setattr(compiled_functions, "_q_graph", lambda *a: built.append(a) or q_graph(*a))
    prepared = ppl_em.prepare(gaussian_label(gaussian_data(300, seed=2)), mode="mle")
    assert ppl_em.fit(prepared=prepared, progressbar=False).converged
    assert not built
    q = prepared.functions.q_and_grad
    inputs, outputs, _ = q._python.graph
    assert q._c.graph[:2] == (inputs, outputs) and len(built) == 1


def test_label_with_per_observation_probabilities_joint_matches_scipy():
    """The row-by-row joint must also hold when the label's probabilities vary by
    observation (a logistic gate), not only when they are shared weights."""
    import pytensor.tensor as pt

    rng = np.random.default_rng(0)
    n = 200
    x = np.concatenate([rng.normal(-2, 1, 100), rng.normal(2, 1, 100)])
    covariate = rng.normal(size=n)
    with pm.Model() as model:
        beta = pm.Normal("beta", 0, 1)
        mu = pm.Normal("mu", 0, 10, shape=2)
        p1 = pm.math.sigmoid(beta * covariate)
        z = pm.Categorical("z", p=pt.stack([1 - p1, p1], axis=1), shape=n)
        pm.Normal("x", mu=mu[z], sigma=1.0, observed=x)
    functions = ppl_em.prepare(model).functions
    rows = joint(functions, np.array([0.3, -1.0, 1.5]))
    q = 1 / (1 + np.exp(-0.3 * covariate))
    ref = np.stack(
        [np.log(1 - q) + stats.norm.logpdf(x, -1.0, 1), np.log(q) + stats.norm.logpdf(x, 1.5, 1)],
        axis=1,
    )
    np.testing.assert_allclose(rows, ref, rtol=1e-12, atol=1e-12)


def test_writing_to_the_users_array_after_prepare_changes_nothing():
    x = gaussian_data(300, seed=3)
    model = _flat_gaussian_mixture(x)
    prepared = ppl_em.prepare(model, mode="mle")
    before = ppl_em.fit(prepared=prepared, random_seed=0, progressbar=False)
    x[:] = 0.0  # the caller reuses its buffer
    after = ppl_em.fit(prepared=prepared, random_seed=0, progressbar=False)
    assert after.loglik == before.loglik


def test_label_joint_fallback_equals_row_by_row():
    """Where an Op insists on the label's own length, the joint is vectorised over a
    full (K, N) domain instead (as pymc-extras does); both constructions must agree."""
    x = gaussian_data(200, seed=6)
    u = np.array([0.3, -0.2, -3.0, 0.5, 4.0, 0.1, -0.3, 0.4])
    fast = ppl_em.prepare(_gaussian_label_flat(x), mode="mle").functions
    slow = build_em_functions(
        analyse_model(_gaussian_label_flat(x)), mode="mle", broadcast_label=False
    )
    assert fast.layout.size == u.size
    np.testing.assert_allclose(joint(fast, u), joint(slow, u), rtol=1e-12, atol=1e-12)


def test_em_loop_skips_log_resp_but_returns_it():
    """The closed-form loop keeps no log-responsibilities per iteration; the run's final
    state has them, equal to an E-step at its estimate."""
    x = X_GAUSS
    functions, config = ppl_em.prepare(_flat_gaussian_mixture(x), mode="mle")
    u0 = default_start(functions, config, np.random.default_rng(0))
    state = em_init(functions, u0, config, keep_resp=False)
    assert state.log_resp is None and state.stats is not None
    kept = em_init(functions, u0, config)
    assert state.objective == pytest.approx(kept.objective, rel=1e-14)
    lean = em_step(functions, config, state, keep_resp=False)
    full = em_step(functions, config, kept)
    np.testing.assert_array_equal(lean.u, full.u)
    assert lean.log_resp is None
    run = run_em(functions, config, u0, tol=1e-10)
    np.testing.assert_allclose(
        run.state.log_resp,
        e_step(functions, run.state.u, whole_data(functions), keep_resp=True).log_resp,
        atol=1e-13,
    )


def test_loop_without_log_resp_still_names_the_bad_observation():
    """keep_resp=False stores no log-responsibilities; a non-finite E-step still says
    which observation no component explains."""
    x = RNG.poisson(np.repeat([2.0, 9.0], 50)).astype(float)
    x[17] = -1.0  # outside every Poisson component's support
    functions, config = ppl_em.prepare(_poisson(x), mode="map")
    u0 = default_start(functions, config, np.random.default_rng(0))
    with pytest.raises(ppl_em.DataError, match="observation 17 of 'x'"):
        em_init(functions, u0, config, keep_resp=False)
