"""SQUAREM reaches plain EM's optimum with fewer E-steps, never lowering the objective;
the fused E-step's statistics equal a hand-written NumPy computation."""

import itertools

import numpy as np
import pymc as pm
import pytest
from scipy.special import logsumexp

import ppl_em
from ppl_em.em import apply_start, default_start, em_init, em_step, run_em
from ppl_em.em.squarem import extrapolate, squarem_alpha, squarem_step
from ppl_em.steps.passes import fused_estep
from tests.conftest import assert_monotone
from tests.models_for_tests import stick_breaking


def overlapping_gaussian(n=1500, seed=1):
    """Three overlapping components: plain EM needs hundreds of iterations."""
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=n, p=[0.3, 0.4, 0.3])
    x = rng.normal(np.array([-3.0, 0.0, 3.0])[z], 1.0)
    with pm.Model() as model:
        w_ = pm.Dirichlet("w", a=np.ones(3))
        mu_ = pm.Flat("mu", shape=3)
        sigma_ = pm.HalfFlat("sigma", shape=3)
        pm.NormalMixture("x", w=w_, mu=mu_, sigma=sigma_, observed=x)
    start = {"w": [0.2, 0.5, 0.3], "mu": [-2.0, 0.0, 1.0], "sigma": [1.0, 1.0, 1.0]}
    return model, start


def overlapping_binomial(n=400, seed=2):
    rng = np.random.default_rng(seed)
    p, w = np.array([0.35, 0.5, 0.6]), np.array([0.3, 0.4, 0.3])
    z = rng.choice(3, size=n, p=w)
    x = rng.binomial(10, p[z])
    with pm.Model() as model:
        w_ = pm.Dirichlet("w", a=np.full(3, 2.0))
        p_ = pm.Beta("p", 2.0, 2.0, shape=3)
        z_ = pm.Categorical("z", p=w_, shape=n)
        pm.Binomial("x", n=10, p=p_[z_], observed=x)
    return model, {"w": [0.25, 0.5, 0.25], "p": [0.3, 0.45, 0.7]}


@pytest.fixture(scope="module", params=["gaussian_mle", "binomial_map"])
def problem(request):
    model, start = (
        overlapping_gaussian() if request.param == "gaussian_mle" else (overlapping_binomial())
    )
    mode = "mle" if request.param == "gaussian_mle" else "map"
    prepared = ppl_em.prepare(model, mode=mode)
    u0 = apply_start(prepared.functions, start, np.zeros(prepared.functions.layout.size))
    return prepared, u0


def _run(prepared, u0, accelerate):
    return run_em(
        prepared.functions, prepared.config, u0, max_iter=20000, tol=1e-14, accelerate=accelerate
    )


@pytest.fixture(scope="module")
def plain_run(problem):
    """Plain EM on ``problem`` (hundreds of iterations), run once for the tests below."""
    return _run(*problem, None)


def test_squarem_same_optimum_fewer_esteps(problem, plain_run):
    prepared, u0 = problem
    plain, fast = plain_run, _run(prepared, u0, "squarem")
    assert plain.converged and fast.converged
    assert plain.n_estep > 100  # the problem is slow for plain EM, or the test is moot
    assert fast.n_estep < plain.n_estep / 2
    # Plain EM crawls: with the same tol it stops a little short of the optimum.
    np.testing.assert_allclose(fast.state.objective, plain.state.objective, rtol=1e-11)
    assert fast.state.objective >= plain.state.objective - 1e-12 * abs(plain.state.objective)
    f = prepared.functions
    for a, b in zip(f.constrain(fast.state.u), f.constrain(plain.state.u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert_monotone(fast.history, rel=1e-12)
    assert_monotone(plain.history, rel=1e-12)
    assert fast.monotone


def test_squarem_cycle_never_below_plain_em(problem):
    """The safeguard: each cycle ends at or above two plain EM steps from the same state."""
    prepared, u0 = problem
    f, c = prepared
    state = em_init(f, u0, c)
    for _ in range(5):
        cycle = squarem_step(f, c, state)
        two = em_step(f, c, em_step(f, c, state))
        assert cycle.state.objective >= two.objective - 1e-9 * abs(two.objective)
        state = cycle.state


def test_sqs3_step_length():
    u0, u1, u2 = np.array([0.0, 0.0]), np.array([1.0, 0.5]), np.array([1.5, 0.7])
    r, v = u1 - u0, u2 - 2 * u1 + u0
    alpha = -np.linalg.norm(r) / np.linalg.norm(v)
    point, a = extrapolate(u0, u1, u2)
    assert a == pytest.approx(alpha)
    np.testing.assert_allclose(point, u0 - 2 * alpha * r + alpha**2 * v)
    # A step shorter than plain EM's is replaced by plain EM (alpha = -1 gives u2).
    assert squarem_alpha(np.array([1.0]), np.array([10.0])) == -1.0
    np.testing.assert_allclose(extrapolate(u0, u0 + 1e-3, u0 + 1.0)[0], u0 + 1.0)


def test_fused_estep_matches_numpy():
    rng = np.random.default_rng(3)
    n, k = 20000 + 17, 4  # not a multiple of the chunk width
    joint = rng.normal(size=(n, k)) * 5
    joint[5, 2] = -np.inf  # a component that cannot produce one observation
    x, t = rng.normal(size=n) * 3 + 1, rng.integers(1, 20, size=n).astype(float)
    cols = np.stack([x, t, (x - 1.0) ** 2])
    log_resp, loglik, nk, s = fused_estep(np.ascontiguousarray(joint.T), cols)

    lse = logsumexp(joint, axis=1)
    gamma = np.exp(joint - lse[:, None])
    np.testing.assert_allclose(log_resp, joint - lse[:, None], rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(loglik, lse.sum(), rtol=1e-12)
    np.testing.assert_allclose(nk, gamma.sum(axis=0), rtol=1e-11)
    for m, v in enumerate(cols):
        np.testing.assert_allclose(s[m], gamma.T @ v, rtol=1e-11)


def test_fit_accepts_accelerate():
    model, start = overlapping_binomial()
    with model:
        plain = ppl_em.fit(start=start, tol=1e-13, max_iter=5000, progressbar=False)
        fast = ppl_em.fit(
            start=start, tol=1e-13, max_iter=5000, progressbar=False, accelerate="squarem"
        )
        with pytest.raises(ValueError, match="accelerate"):
            ppl_em.fit(start=start, progressbar=False, accelerate="aitken")
    np.testing.assert_allclose(fast.params["p"], plain.params["p"], atol=1e-5)
    np.testing.assert_allclose(fast.log_posterior, plain.log_posterior, rtol=1e-10)
    assert fast.log_posterior >= plain.log_posterior - 1e-12 * abs(plain.log_posterior)


def test_marginal_ascents_run_only_where_em_crawls_on_a_non_closed_form_m_step(problem, plain_run):
    """An ascent is for a long crawl (the rate predicts more than CRAWL iterations) of an
    M-step that is not all closed form and has no variance floor (with numeric
    variables, for more than NUMERIC_CRAWL: the next test). Both problems here
    are closed form: ``accelerate="auto"`` runs exactly the plain EM iterates."""
    from ppl_em.em.marginal import (
        CELL_SECONDS,
        COMPILE_WORTH,
        CRAWL,
        ITERATION_SECONDS,
        ascends,
        crawling,
    )

    rate = 0.95  # the gap shrinks 20-fold in log(20)/log(1/0.95) = 58 iterations
    assert crawling(rate, 20 * 5e-7, 5e-7) == (np.log(20) / np.log(1 / rate) > CRAWL)
    assert crawling(0.99, 1e-3, 5e-7)
    assert not crawling(0.5, 1e-3, 5e-7)  # fast: about 11 iterations to go
    assert not crawling(None, np.inf, 5e-7)  # no rate measured yet
    assert not crawling(0.99, 1e-7, 5e-7)  # already within the tolerance
    # Q's gradient not compiled yet: only a crawl estimated to last longer than
    # COMPILE_WORTH seconds, or longer than the iterations left
    left = np.log(5e-7 / 1e-3) / np.log(0.99)  # 756 iterations
    for factor in (0.5, 2.0):
        pace = factor * COMPILE_WORTH / left
        cells = (pace - ITERATION_SECONDS) / CELL_SECONDS
        assert crawling(0.99, 1e-3, 5e-7, q_compiled=False, cells=cells) == (factor > 1)
        assert crawling(0.99, 1e-3, 5e-7, q_compiled=False, cells=cells, remaining=700)
    prepared, u0 = problem
    assert not ascends(prepared.config)
    np.testing.assert_array_equal(_run(prepared, u0, "auto").history, plain_run.history)


@pytest.mark.parametrize("spike", [False, True], ids=["plain", "recentred"])
def test_an_ascent_reads_q_from_the_statistics_where_they_cover_every_variable(spike, monkeypatch):
    """Stick-breaking sticks and Normal components with priors: every variable is in a
    block maximised from the statistics, so the ascent's Q (responsibilities held) is
    the sum of those blocks' Q of the E-step's sums, with no pass over the data. Its
    gradient, the marginal gradient by Fisher's identity, equals Q's over the data,
    also where a component on a few points makes the sums be recentred."""
    from ppl_em.em.marginal import _q_at, statistics_cover
    from ppl_em.em.step import em_data
    from ppl_em.steps import stats_newton
    from ppl_em.steps.estep import q_and_grad

    rng = np.random.default_rng(4)
    x = rng.normal(np.array([-3.0, 2.0])[rng.integers(0, 2, 400)], 1.0)
    if spike:
        x = np.r_[x, 9.0 + rng.normal(0.0, 0.01, 5)]
    functions, config = ppl_em.prepare(stick_breaking(x, 4))
    near = {"v": [0.4, 0.5, 0.1, 0.5], "mu": [-3.0, 2.0, 9.0, 0.0],
            "sigma": [1.0, 1.0, 0.01 if spike else 1.0, 1.0]}  # fmt: skip
    u = apply_start(functions, near, np.zeros(functions.layout.size))
    assert statistics_cover(config, u.size)
    data = em_data(functions, config)
    state = em_init(functions, u, config, data, keep_resp=True)
    _, q_functions, batches = data.expectations(functions, state)
    reference = q_and_grad(q_functions, u, batches())[1]
    recentred = []
    real = stats_newton._centred_sums
    monkeypatch.setattr(stats_newton, "_centred_sums", lambda *a: recentred.append(1) or real(*a))
    q_at = _q_at(functions, config, state, data)
    assert q_at.__name__ == "from_statistics"
    np.testing.assert_allclose(q_at(u)[1], reference,
                               rtol=1e-9, atol=1e-9 * np.abs(reference).max())  # fmt: skip
    assert bool(recentred) == spike


def test_a_moderate_crawl_of_a_numeric_m_step_gets_an_ascent():
    """A negative-binomial regression mixture's EM settles at a rate of about 0.8: 105
    iterations to converge here, each a Newton M-step over the data. That is a crawl
    worth an ascent (with the rate threshold at 0.9 none ran, and "auto" was plain EM);
    with one, the fit takes under half the E-steps and ends at least as high."""
    from tests.test_glm_negative_binomial import _nb_data, _nb_model

    x, y = _nb_data(n=1500)
    functions, config = ppl_em.prepare(_nb_model(x, y))
    u0 = default_start(functions, config, None)
    auto = run_em(functions, config, u0)
    plain = run_em(functions, config, u0, accelerate=None)
    assert auto.converged and plain.converged
    assert auto.n_estep < plain.n_estep / 2
    assert auto.state.objective >= plain.state.objective - 1e-9


def test_an_ascent_replaces_the_dear_iterations_of_a_numeric_m_step(monkeypatch):
    """A Poisson regression mixture's EM converges at a moderate rate, in 36 iterations
    here, each an E-step, two gradients of Q over the data and its Hessian. An ascent's
    evaluation is an E-step and one gradient, so an ascent pays for far shorter crawls
    than a closed-form M-step's: "auto" takes one after ``FIRST`` iterations, passes
    over the data fewer than half the times plain EM does, and ends at least as high
    (before, at a rate under ``SLOW_RATE``, "auto" was plain EM)."""
    from ppl_em.em.marginal import crawling
    from ppl_em.steps import mstep
    from tests.test_glm import _data, _model

    # about 11 iterations to go: worth an ascent where the M-step is numeric, not else
    assert crawling(0.5, 1e-3, 5e-7, numeric=True) and not crawling(0.5, 1e-3, 5e-7)
    assert not crawling(0.2, 1e-3, 5e-7, numeric=True)  # about 5 to go
    assert not crawling(-0.3, 1e-3, 5e-7, numeric=True)  # oscillating: no rate to read
    x, y = _data("poisson", n=600)
    functions, config = ppl_em.prepare(_model("poisson", x, y))
    u0 = default_start(functions, config, None)
    passes = {"data": 0}  # Q's gradients and Hessians over the data (E-steps: n_estep)

    def counted(fn):
        def call(*args):
            passes["data"] += 1
            return fn(*args)

        return call

    monkeypatch.setattr(mstep, "glm_hessian", counted(mstep.glm_hessian))
    counting = functions._replace(q_and_grad=counted(functions.q_and_grad))
    runs = {}
    for accelerate in ("auto", None):
        passes["data"] = 0
        run = run_em(counting, config, u0, accelerate=accelerate)
        assert run.converged
        runs[accelerate] = (run, passes["data"] + run.n_estep)
    (auto, auto_passes), (plain, plain_passes) = runs["auto"], runs[None]
    assert auto.n_iter < plain.n_iter
    assert auto_passes < plain_passes / 2
    assert auto.state.objective >= plain.state.objective - 1e-9


def test_the_first_ascent_comes_once_the_rate_is_measured_twice(monkeypatch):
    """A logistic-regression mixture crawls from its start (EM alone took 1109
    iterations): its first ascent runs after ``FIRST`` EM iterations, not after
    ``SPACING`` as a later one does, and the fit reaches SciPy's optimum of the
    marginal posterior."""
    from ppl_em.em import loop
    from ppl_em.em.marginal import FIRST, SPACING
    from tests.test_glm import _data, _model, _scipy_map

    after = []

    def recorded(functions, config, state, data, history, gap_tol):
        after.append(len(history) - 1)
        return ascend(functions, config, state, data, history, gap_tol)

    ascend = loop._ascend
    monkeypatch.setattr(loop, "_ascend", recorded)
    x, y = _data("bernoulli", n=1500)
    fit = ppl_em.fit(_model("bernoulli", x, y), progressbar=False, tol=1e-10)
    assert fit.converged
    assert FIRST < SPACING and after[0] == FIRST
    assert all(b - a > SPACING for a, b in itertools.pairwise(after))
    start = np.r_[fit.params["a"], fit.params["b"], np.log(fit.params["w"][1] / fit.params["w"][0])]
    _, best = _scipy_map("bernoulli", x, y, start)
    assert fit.log_posterior == pytest.approx(best, abs=1e-6)


def test_an_ascent_scales_regression_coefficients_by_their_written_curvature():
    """An ascent's coordinates are scaled by Q's curvature along each variable. For
    regression coefficients that curvature is written out (the IRLS Hessian: one pass
    over the data for all of them) where differences of Q's gradient cost a pass each:
    the ascent then differences only the weights' entry. Its diagonal agrees with those
    differences of the compiled gradient."""
    from ppl_em.em import marginal
    from ppl_em.em.step import em_data
    from ppl_em.steps.mstep import written_curvature
    from ppl_em.steps.numeric import _curvature
    from tests.test_glm import _data, _model

    x, y = _data("poisson", n=600)
    functions, config = ppl_em.prepare(_model("poisson", x, y))
    data = em_data(functions, config)
    state = em_init(functions, default_start(functions, config, None), config, data)
    for _ in range(3):
        state = em_step(functions, config, state, data)
    q_at = marginal._q_at(functions, config, state, data)
    grad = q_at(state.u)[1]
    written = written_curvature(config, state.u, data.expectations(functions, state)[2])
    differenced = np.array([-_curvature(q_at, state.u, grad, i) for i in range(grad.size)])
    assert np.isnan(written[0]) and np.isfinite(written[1:]).all()  # w, then a and b
    np.testing.assert_allclose(written[1:], differenced[1:], rtol=1e-3)
    calls = {"q": 0}

    def counted(*args, q=functions.q_and_grad):
        calls["q"] += 1
        return q(*args)

    ascent = marginal.marginal_ascent(functions._replace(q_and_grad=counted), config, state, data)
    assert ascent.state.objective > state.objective
    # one gradient per evaluation, one at the start, one difference for the weights
    assert calls["q"] == ascent.n_estep + 2


def test_an_ascent_that_gains_nothing_measurable_ends_after_stale_evaluations(monkeypatch):
    """At the optimum, with a gradient that points away from it, every step L-BFGS
    tries loses or gains less than the objective's rounding: the ascent ends after
    ``STALE`` evaluations (L-BFGS-B alone would spend its line search's 20 and more),
    and hands back its start."""
    from ppl_em.em import marginal
    from ppl_em.em.step import em_data
    from tests.test_glm import _data, _model

    x, y = _data("poisson", n=600)
    fit = ppl_em.fit(_model("poisson", x, y), progressbar=False, tol=1e-10)
    assert fit.converged
    functions, config = fit.prepared
    data = em_data(functions, config)
    u = fit.unconstrained
    state = em_init(functions, u, config, data, keep_resp=True)
    calls = []

    def misleading(*args):
        calls.append(1)
        return np.full(u.size, 10.0)

    monkeypatch.setattr(marginal, "_gradient", misleading)
    ascent = marginal.marginal_ascent(functions, config, state, data)
    assert ascent.n_estep == marginal.STALE == len(calls)
    assert ascent.state.objective == state.objective
    np.testing.assert_array_equal(ascent.state.u, u)
