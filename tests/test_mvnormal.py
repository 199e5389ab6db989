"""Closed-form MvNormal M-step: scikit-learn's full-covariance EM, and the numeric M-step.

The closed form maps the weighted moments back to whatever free variables the model
uses for each covariance; each parameterisation below is checked against the numeric
M-step (L-BFGS on Q with PyTensor gradients) and the flat one against scikit-learn.
"""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from sklearn.mixture import GaussianMixture

import ppl_em
from ppl_em.em import EMData, default_start, em_data, em_init, em_step
from ppl_em.model import analyse_model, build_plan, data_spec
from ppl_em.steps import Stats, m_step_from_resp, make_mstep_config, q_and_grad, whole_data
from ppl_em.steps.columns import StatsRequest
from ppl_em.steps.mvn_moments import weighted_moments
from ppl_em.steps.mvn_solve import solve_params
from tests.conftest import EXACT, assert_same_params

RNG = np.random.default_rng(11)


def blobs(n: int, k: int, d: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    mix = rng.normal(size=(k, d, d)) * 0.4 + np.eye(d)
    z = rng.integers(0, k, size=n)
    return centres[z] + np.einsum("nij,nj->ni", mix[z], rng.normal(size=(n, d)))


def flat_cholesky_mixture(x: np.ndarray, k: int, batched: bool = False) -> pm.Model:
    """Cholesky factors from free standard deviations and off-diagonal entries; K
    components, or with ``batched`` one component with a leading axis of length K."""
    d = x.shape[1]
    rows, cols = np.tril_indices(d, -1)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Flat("mu", shape=(k, d))
        sd = pm.HalfFlat("sd", shape=(k, d))
        off = pm.Flat("off", shape=(k, len(rows)))
        chol = pt.zeros((k, d, d))
        chol = pt.set_subtensor(chol[:, np.arange(d), np.arange(d)], sd)
        chol = pt.set_subtensor(chol[:, rows, cols], off)
        if batched:
            comps = pm.MvNormal.dist(mu=mu, chol=chol)
        else:
            comps = [pm.MvNormal.dist(mu=mu[j], chol=chol[j]) for j in range(k)]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def lkj_mixture(x: np.ndarray, k: int) -> pm.Model:
    d = x.shape[1]
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(k, d))
        comps = []
        for j in range(k):
            sd_dist = pm.HalfNormal.dist(3.0, shape=d)
            chol, _, _ = pm.LKJCholeskyCov(f"chol{j}", n=d, eta=2.0, sd_dist=sd_dist)
            comps.append(pm.MvNormal.dist(mu=mu[j], chol=chol))
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def gaussian_2d_label(n: int = 300) -> pm.Model:
    """Explicit label; each covariance from two sds and a correlation with an LKJ(2)
    potential (the parameterisation of models/gaussian_2d.py)."""
    x = blobs(n, 2, 2, seed=8)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(2, 2))
        sigma = pm.HalfNormal("sigma", 3.0, shape=(2, 2))
        rho = pm.Uniform("rho", -1.0, 1.0, shape=2)
        pm.Potential("lkj_eta2", pt.sum(pt.log1p(-(rho**2))))
        z = pm.Categorical("z", p=w, shape=n)
        row0 = pt.stack([sigma[:, 0], pt.zeros(2)], axis=-1)
        row1 = pt.stack([rho * sigma[:, 1], sigma[:, 1] * pt.sqrt(1 - rho**2)], axis=-1)
        chol = pt.stack([row0, row1], axis=-2)
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=x)
    return model


def _chol_from_flat(sd: np.ndarray, off: np.ndarray) -> np.ndarray:
    k, d = sd.shape
    chol = np.zeros((k, d, d))
    chol[:, np.arange(d), np.arange(d)] = sd
    rows, cols = np.tril_indices(d, -1)
    chol[:, rows, cols] = off
    return chol


# reg_covar's floored update is not the likelihood's M-step: dips are expected.
@pytest.mark.filterwarnings("ignore::ppl_em.NonMonotoneWarning")
@pytest.mark.parametrize("reg_covar", [0.0, 0.05])
def test_matches_sklearn_full_covariance(reg_covar):
    k, d = 3, 3
    x = blobs(600, k, d)
    centres = np.array([x[0], x[200], x[400]])
    start = {"w": np.full(k, 1 / k), "mu": centres, "sd": np.ones((k, d)),
             "off": np.zeros((k, 3))}  # fmt: skip
    prepared = ppl_em.prepare(flat_cholesky_mixture(x, k), mode="mle")
    assert prepared.config.plan.closed == {"w", "mu", "sd", "off"}
    assert not prepared.config.numeric_mask.any()
    res = ppl_em.fit(
        prepared=prepared, start=start, tol=1e-13, max_iter=5000, reg_covar=reg_covar,
        progressbar=False,
    )  # fmt: skip
    gm = GaussianMixture(
        k, covariance_type="full", tol=1e-14, max_iter=5000, reg_covar=reg_covar,
        weights_init=start["w"], means_init=centres,
        precisions_init=np.tile(np.eye(d), (k, 1, 1)),
    ).fit(x)  # fmt: skip
    assert gm.converged_ and res.converged
    np.testing.assert_allclose(res.loglik, gm.score(x) * len(x), rtol=1e-9)
    np.testing.assert_allclose(res.params["w"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(res.params["mu"], gm.means_, atol=1e-5)
    chol = _chol_from_flat(res.params["sd"], res.params["off"])
    np.testing.assert_allclose(chol @ chol.transpose(0, 2, 1), gm.covariances_, atol=1e-5)


def _closed_and_numeric(model, mode="mle"):
    functions, closed = ppl_em.prepare(model, mode=mode, mstep="closed")
    plan = build_plan(functions.graph, functions.mode, functions.spec)
    numeric = make_mstep_config(functions, plan, "numeric", grad_reduction=EXACT)
    u0 = default_start(functions, numeric, rng=None)
    gamma = RNG.dirichlet(np.ones(functions.graph.n_components), size=functions.graph.n_obs)
    a = m_step_from_resp(functions, closed, u0, gamma)
    b = m_step_from_resp(functions, numeric, u0, gamma)
    return functions, closed, gamma, a, b


@pytest.mark.parametrize(
    "build",
    [
        lambda: flat_cholesky_mixture(blobs(300, 2, 3), 2),
        lambda: lkj_mixture(blobs(300, 2, 3), 2),
        lambda: gaussian_2d_label(),
    ],
    ids=["flat-cholesky-list", "lkj-cholesky-list", "sd-correlation-label"],
)
def test_closed_equals_numeric_mstep(build):
    functions, closed, gamma, a, b = _closed_and_numeric(build())
    assert len(closed.plan.mvn) == 1 and not closed.numeric_mask.any()
    assert_same_params(functions, a, b, rtol=1e-5, atol=1e-6)
    batches = [(np.ascontiguousarray(gamma.T), whole_data(functions))]
    qa, _ = q_and_grad(functions, a, batches)
    qb, _ = q_and_grad(functions, b, batches)
    assert qa >= qb - 1e-9 * abs(qb)


def test_closed_form_reproduces_weighted_moments():
    """The solved free variables give back exactly the weighted mean and covariance."""
    x = blobs(300, 2, 3)
    _, closed, gamma, a, _ = _closed_and_numeric(lkj_mixture(x, 2))
    (update,) = closed.mvn
    mu, cov = weighted_moments(gamma, x)
    got = update.params(a)
    np.testing.assert_allclose(got[:6].reshape(2, 3), mu, rtol=1e-9)
    np.testing.assert_allclose(got[6:].reshape(2, 3, 3), cov, rtol=1e-8, atol=1e-12)


def test_map_with_informative_priors_stays_numeric():
    graph = analyse_model(gaussian_2d_label())
    plan = build_plan(graph, "map", data_spec(graph))
    assert plan.mvn == ()
    for name in ("mu", "sigma", "rho"):
        assert name in plan.reasons and "closed" not in plan.reasons[name]
    assert "not flat" in plan.reasons["mu"] or "potential" in plan.reasons["mu"]


def test_tied_covariance_is_not_one_to_one():
    """One covariance shared by all components: the per-component closed form does not
    apply (it would be the pooled covariance), so the plan leaves it numeric and says why."""
    x = blobs(200, 2, 2)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=(2, 2))
        sd = pm.HalfFlat("sd", shape=2)
        chol = pt.diag(sd)
        pm.Mixture("x", w=w, comp_dists=[pm.MvNormal.dist(mu=mu[j], chol=chol) for j in range(2)],
                   observed=x)  # fmt: skip
    graph = analyse_model(model)
    plan = build_plan(graph, "mle", data_spec(graph))
    assert plan.mvn == ()
    assert "one-to-one" in plan.reasons["sd"]


def test_unreachable_target_falls_back_to_numeric():
    """A correlation restricted to (0, 1) cannot reproduce a negative weighted
    correlation: the solve reports failure and the M-step maximises Q numerically."""
    rng = np.random.default_rng(2)
    x = rng.multivariate_normal([0, 0], [[1.0, -0.8], [-0.8, 1.0]], size=200)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=(2, 2))
        sd = pm.HalfFlat("sd", shape=(2, 2))
        rho = pm.Uniform("rho", 0.0, 1.0, shape=2)
        comps = []
        for j in range(2):
            s0, s1, r = sd[j, 0], sd[j, 1], rho[j]
            chol = pt.stack([pt.stack([s0, 0.0]), pt.stack([r * s1, s1 * pt.sqrt(1 - r**2)])])
            comps.append(pm.MvNormal.dist(mu=mu[j], chol=chol))
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    functions, closed = ppl_em.prepare(model, mode="mle")
    assert len(closed.plan.mvn) == 1
    gamma = np.full((200, 2), 0.5)
    u0 = default_start(functions, closed, rng=None)
    mu_t, cov_t = weighted_moments(gamma, x)
    assert solve_params(closed.mvn[0], u0, mu_t, cov_t) is None
    u1 = m_step_from_resp(functions, closed._replace(grad_reduction=EXACT), u0, gamma)
    batches = [(np.ascontiguousarray(gamma.T), whole_data(functions))]
    q0, _ = q_and_grad(functions, u0, batches)
    q1, _ = q_and_grad(functions, u1, batches)
    assert np.isfinite(q1) and q1 >= q0
    rho = dict(zip(functions.layout.rv_names, functions.constrain(u1), strict=True))["rho"]
    assert np.all(rho < 0.05)  # pushed towards the boundary rho -> 0


def _fused_moments(x: np.ndarray, log_gamma: np.ndarray):
    from ppl_em.model.mvn_spec import MvnSpec
    from ppl_em.model.recognise import ClosedFormPlan
    from ppl_em.steps.columns import stats_request
    from ppl_em.steps.mvn_moments import moments_from_stats
    from ppl_em.steps.passes import fused_estep

    plan = ClosedFormPlan((), frozenset(), {}, (MvnSpec("x", (), None, None),))
    request = stats_request(plan, ("x",), (x,))
    # fused_estep normalises its input row-wise: log_gamma is its own log-softmax.
    _, loglik, nk, s = fused_estep(log_gamma.T.copy(), request.columns((x,)))
    stats = Stats(len(x), loglik, nk, s)
    return moments_from_stats(stats.nk, stats, request, 0)


def test_fused_statistics_give_the_two_pass_moments():
    x = blobs(500, 3, 4)
    gamma = RNG.dirichlet(np.ones(3), size=len(x))
    mu, cov = _fused_moments(x, np.log(gamma))
    mu2, cov2 = weighted_moments(gamma, x)
    np.testing.assert_allclose(mu, mu2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, cov2, rtol=1e-10, atol=1e-12)


def test_fused_statistics_refuse_when_cancellation_would_bite():
    """A tight component 10^5 standard deviations from the data mean: the one-pass
    moments would lose digits, so they are refused (the M-step then uses two passes)."""
    x = np.concatenate([RNG.normal(size=(200, 2)), RNG.normal(size=(200, 2)) * 1e-3 + 100.0])
    gamma = np.zeros((400, 2)) + 1e-300
    gamma[:200, 0] = gamma[200:, 1] = 1.0
    assert _fused_moments(x, np.log(gamma)) is None


def test_singular_target_is_refused():
    """Two points in 3-D give a rank-1 weighted covariance: no parameter values
    reproduce it, and the solve says so rather than returning a degenerate factor."""
    x = blobs(300, 2, 3)
    functions, closed = ppl_em.prepare(flat_cholesky_mixture(x, 2), mode="mle")
    u0 = default_start(functions, closed, rng=None)
    gamma = np.zeros((300, 2))
    gamma[:, 0] = 1.0
    gamma[:2] = [[0.0, 1.0], [0.0, 1.0]]
    mu, cov = weighted_moments(gamma, x)
    assert np.linalg.matrix_rank(cov[1]) == 1
    assert solve_params(closed.mvn[0], u0, mu, cov) is None


def test_product_columns_are_computed_once_per_dataset():
    x = blobs(100, 2, 3)
    prepared = ppl_em.prepare(flat_cholesky_mixture(x, 2), mode="mle")
    functions, config = prepared
    (data,) = functions.data
    assert not data.flags.writeable  # compiled data are read-only copies
    # the columns are built once, with the EMData, and every E- and M-step reuses them
    built = []

    class CountingRequest(StatsRequest):
        def columns(self, arrays):
            built.append(len(arrays[0]))
            return super().columns(arrays)

    request = CountingRequest(*em_data(functions, config).request)
    em = EMData((whole_data(functions, request),), request)
    first = em.chunks[0].columns
    assert built == [100]
    state = em_init(functions, default_start(functions, config, None), config, data=em)
    for _ in range(2):
        state = em_step(functions, config, state, data=em)
        assert state.request is em.request and built == [100]
    # a new plan (fit(reg_covar=...) makes one) is never served the old plan's columns
    renewed = config._replace(plan=config.plan._replace(mvn=config.plan.mvn))
    rebuilt = em_data(functions, renewed)
    assert rebuilt.request is not em.request and rebuilt.request.plan is renewed.plan
    assert rebuilt.chunks[0].columns is not first
    # the user's writable array: its columns belong to the EMData built from it
    writable = data.copy()
    on_writable = functions._replace(data=(writable,))
    again = em_data(on_writable, config).chunks[0].columns
    assert again is not first and em_data(on_writable, config).chunks[0].columns is not again
    np.testing.assert_array_equal(again, first)
    # a refit on new data goes through with_data, which freezes its copy
    moved = ppl_em.with_data(prepared, x=x + 1.0)
    assert not moved.functions.data[0].flags.writeable
    res = ppl_em.fit(prepared=moved, random_seed=0, progressbar=False)
    ref = ppl_em.fit(flat_cholesky_mixture(x + 1.0, 2), mode="mle", random_seed=0,
                     progressbar=False)  # fmt: skip
    assert res.loglik == pytest.approx(ref.loglik, rel=1e-10)


def test_batched_component_equals_list_of_components():
    """One batched ``pm.MvNormal.dist(mu=(K, D), chol=(K, D, D))`` component is the same
    mixture as K separate components, and gets the same closed-form fit."""
    x, k = blobs(400, 2, 3), 2
    prepared = ppl_em.prepare(flat_cholesky_mixture(x, k, batched=True), mode="mle")
    assert len(prepared.config.plan.mvn) == 1 and not prepared.config.numeric_mask.any()
    options = dict(random_seed=0, tol=1e-12, progressbar=False)
    a = ppl_em.fit(prepared=prepared, **options)
    b = ppl_em.fit(flat_cholesky_mixture(x, k), mode="mle", **options)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)
    for name in ("w", "mu", "sd", "off"):
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-8, atol=1e-10)
