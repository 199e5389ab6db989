"""Closed-form M-steps beyond one value per observation: latent class analysis, diagonal,
spherical and tied covariances. References: a NumPy EM written here, scikit-learn's
GaussianMixture, and the exact numeric M-step on the same Q."""

import numpy as np
import pymc as pm
import pytest
from sklearn.mixture import GaussianMixture

import ppl_em
from ppl_em.em import default_start, em_init, em_step
from ppl_em.model import build_plan
from ppl_em.steps import m_step_from_resp, make_mstep_config

RNG = np.random.default_rng(3)
N, D, K = 600, 3, 3
Z = RNG.integers(0, K, N)
MEANS = np.array([[-4.0, 0.0, 2.0], [0.0, 3.0, -2.0], [4.0, -3.0, 0.0]])
SDS = np.array([[1.0, 0.5, 2.0], [0.7, 1.5, 0.6], [1.2, 0.8, 1.0]])
X = RNG.normal(MEANS[Z], SDS[Z])
TIGHT = {"mode": "mle", "tol": 1e-14, "gap_tol": 1e-12, "progressbar": False}


def _gaussian(sigma_kind: str, x=X):
    """``sigma_kind``: "diag" (K, D), "spherical" (K,) shared by the items, "tied" (D,)
    shared by the components."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(K))
        mu = pm.Flat("mu", shape=(K, D))
        z = pm.Categorical("z", p=w, shape=N)
        if sigma_kind == "diag":
            s = pm.HalfFlat("s", shape=(K, D))
            pm.Normal("x", mu=mu[z], sigma=s[z], observed=x)
        elif sigma_kind == "spherical":
            s = pm.HalfFlat("s", shape=K)
            pm.Normal("x", mu=mu[z], sigma=s[z][:, None], observed=x)
        else:
            s = pm.HalfFlat("s", shape=D)
            pm.Normal("x", mu=mu[z], sigma=s, observed=x)
    return model


@pytest.mark.parametrize("kind", ["diag", "spherical"])
def test_diagonal_and_spherical_gaussians_equal_sklearn(kind):
    em = ppl_em.fit(_gaussian(kind), **TIGHT)
    assert em.prepared.config.plan.closed == {"w", "mu", "s"}
    gm = GaussianMixture(K, covariance_type=kind, tol=1e-13, reg_covar=0.0, max_iter=10_000,
                         random_state=0).fit(X)  # fmt: skip
    assert em.loglik == pytest.approx(gm.score(X) * N, rel=1e-10)
    order, sk = np.argsort(em.params["mu"][:, 0]), np.argsort(gm.means_[:, 0])
    np.testing.assert_allclose(em.params["mu"][order], gm.means_[sk], rtol=1e-6, atol=1e-8)
    sd = em.params["s"][order] ** 2
    np.testing.assert_allclose(sd, gm.covariances_[sk], rtol=1e-5)


def _numpy_em_tied(x, w, mu, sd, steps):
    """EM for a Gaussian mixture with per-component means and one diagonal covariance
    shared by the components, written out."""
    for _ in range(steps):
        dev = (x[:, None, :] - mu[None]) / sd
        logp = np.log(w)[None, :] - 0.5 * np.sum(dev**2 + np.log(2 * np.pi * sd**2), axis=2)
        g = np.exp(logp - logp.max(1, keepdims=True))
        g /= g.sum(1, keepdims=True)
        nk = g.sum(0)
        w, mu = nk / N, (g.T @ x) / nk[:, None]
        sd = np.sqrt(np.einsum("nk,nkd->d", g, (x[:, None, :] - mu[None]) ** 2) / N)
    return w, mu, sd


def test_tied_diagonal_scale_iterates_equal_a_numpy_em():
    functions, config = ppl_em.prepare(_gaussian("tied"), mode="mle")
    assert config.plan.closed == {"w", "mu", "s"}
    u = default_start(functions, config, None)
    w, mu, sd = functions.constrain(u)
    state = em_init(functions, u, config)
    for step in range(1, 6):
        state = em_step(functions, config, state)
        ref = _numpy_em_tied(X, w, mu, sd, step)
        for got, want in zip(functions.constrain(state.u), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10)


def _lca(answers, k=K):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        p = pm.Beta("p", 2.0, 2.0, shape=(k, answers.shape[1]))
        z = pm.Categorical("z", p=w, shape=answers.shape[0])
        pm.Bernoulli("answers", p=p[z], observed=answers)
    return model


def _numpy_lca_map(x, w, p, steps, a=2.0, b=2.0):
    """MAP EM for latent class analysis (Dirichlet(1) weights, Beta(a, b) item
    probabilities), written out."""
    for _ in range(steps):
        logp = np.log(w)[None] + x @ np.log(p).T + (1 - x) @ np.log1p(-p).T
        g = np.exp(logp - logp.max(1, keepdims=True))
        g /= g.sum(1, keepdims=True)
        nk = g.sum(0)
        w = nk / nk.sum()
        p = (g.T @ x + a - 1) / (nk[:, None] + a + b - 2)
    return w, p


def test_latent_class_analysis_is_closed_form_and_equals_a_numpy_em():
    """2,218 respondents, 20 binary items, 3 classes (the size users reported slow)."""
    n, j = 2218, 20
    z = RNG.integers(0, K, n)
    truth = RNG.uniform(0.1, 0.9, (K, j))
    answers = (RNG.random((n, j)) < truth[z]).astype(int)
    functions, config = ppl_em.prepare(_lca(answers))
    assert config.plan.closed == {"w", "p"} and not config.numeric_mask.any()
    u = default_start(functions, config, None)
    w, p = functions.constrain(u)
    state = em_init(functions, u, config)
    for step in range(1, 6):
        state = em_step(functions, config, state)
        ref = _numpy_lca_map(answers, w, p, step)
        for got, want in zip(functions.constrain(state.u), ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9)
    fit = ppl_em.fit(prepared=ppl_em.PreparedEM(functions, config), progressbar=False)
    assert fit.converged


def _tied_full(x, form):
    n, d = x.shape
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=(2, d))
        chol, _, _ = pm.LKJCholeskyCov("chol", n=d, eta=1.0, sd_dist=pm.HalfFlat.dist())
        if form == "label":
            z = pm.Categorical("z", p=w, shape=n)
            pm.MvNormal("x", mu=mu[z], chol=chol, observed=x)
        else:
            comps = [pm.MvNormal.dist(mu=mu[j], chol=chol) for j in range(2)]
            pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


@pytest.mark.parametrize("form", ["label", "mixture"])
def test_tied_full_covariance_is_closed_form_and_equals_sklearn(form):
    """Two clusters whose features differ in scale by about 20x (Old Faithful-like)."""
    rng = np.random.default_rng(1)
    short = rng.random(272) < 0.35
    dur = np.where(short, rng.normal(2.0, 0.25, 272), rng.normal(4.3, 0.4, 272))
    wait = np.where(short, rng.normal(54.5, 6.0, 272), rng.normal(80.0, 6.0, 272))
    x = np.column_stack([dur, wait + 5.0 * (dur - 3)])
    em = ppl_em.fit(_tied_full(x, form), **TIGHT)
    assert em.prepared.config.plan.closed == {"w", "mu", "chol"}
    gm = GaussianMixture(2, covariance_type="tied", tol=1e-13, reg_covar=0.0, max_iter=10_000,
                         random_state=0).fit(x)  # fmt: skip
    assert em.loglik == pytest.approx(gm.score(x) * x.shape[0], rel=1e-10)


@pytest.mark.parametrize("kind", ["diag", "spherical", "tied"])
def test_closed_form_equals_the_exact_numeric_mstep(kind):
    """Q's maximiser from given responsibilities: closed form against Newton on Q."""
    functions, closed = ppl_em.prepare(_gaussian(kind), mode="mle")
    plan = build_plan(functions.graph, "mle", functions.spec)
    numeric = make_mstep_config(functions, plan, "numeric", grad_reduction=0.0)
    gamma = np.exp(em_init(functions, default_start(functions, closed, None), closed).log_resp)
    gamma = 0.7 * gamma + 0.3 * RNG.dirichlet(np.ones(K), size=N)  # not a fixed point
    u0 = default_start(functions, closed, None)
    a = m_step_from_resp(functions, closed, u0, gamma)
    b = m_step_from_resp(functions, numeric, u0, gamma)
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-9)


def test_list_components_with_their_own_priors_each_get_their_own():
    """Each list component's mean is its own scalar with its own Normal prior; the
    conjugate update must shrink each towards its own prior (it once used the first
    component's prior for both). Reference: a NumPy EM with the conjugate updates."""
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-2.0, 1.0, 30), rng.normal(3.0, 1.0, 30)]
    m0, s0 = np.array([0.0, 1.0]), np.array([0.5, 100.0])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        means = [pm.Normal(f"m{k}", m0[k], s0[k]) for k in range(2)]
        pm.Mixture("x", w=w, comp_dists=[pm.Normal.dist(m, 1.0) for m in means], observed=x)
    start = {"w": np.array([0.5, 0.5]), "m0": np.array(-1.0), "m1": np.array(1.0)}
    fit = ppl_em.fit(model, start=start, tol=1e-14, gap_tol=1e-12, progressbar=False,
                     accelerate=None)  # fmt: skip
    assert fit.prepared.config.plan.closed == {"w", "m0", "m1"}
    w, mu = start["w"].copy(), np.array([-1.0, 1.0])
    for _ in range(fit.n_iter):
        dens = w * np.exp(-0.5 * (x[:, None] - mu) ** 2)
        gamma = dens / dens.sum(axis=1, keepdims=True)
        w, nk = gamma.mean(axis=0), gamma.sum(axis=0)
        mu = (gamma.T @ x + m0 / s0**2) / (nk + 1.0 / s0**2)
    np.testing.assert_allclose(fit.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose([fit.params["m0"], fit.params["m1"]], mu, rtol=1e-9)


def test_a_prior_broadcast_over_the_items_is_read_item_by_item():
    """Means of shape (K, D) with a Normal prior whose sd has shape (D,): each feature's
    conjugate update uses its own prior sd (it once used the first for all). Reference:
    a NumPy EM with the conjugate updates, from the same start."""
    rng = np.random.default_rng(0)
    n, d = 40, 3
    x = rng.normal(np.array([[-3.0, 0.0, 5.0], [3.0, 2.0, -5.0]])[rng.integers(0, 2, n)], 1.0)
    s0 = np.array([0.3, 10.0, 100.0])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, s0, shape=(2, d))
        z = pm.Categorical("z", p=w, shape=n)
        pm.Normal("x", mu=mu[z], sigma=1.0, observed=x)
    start = {"w": np.array([0.5, 0.5]), "mu": np.array([[-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])}
    fit = ppl_em.fit(model, start=start, tol=1e-14, gap_tol=1e-12, progressbar=False,
                     accelerate=None)  # fmt: skip
    assert fit.prepared.config.plan.closed == {"w", "mu"}
    w, mu = start["w"].copy(), start["mu"].copy()
    for _ in range(fit.n_iter):
        log_dens = np.log(w) - 0.5 * ((x[:, None, :] - mu[None]) ** 2).sum(axis=2)
        gamma = np.exp(log_dens - log_dens.max(axis=1, keepdims=True))
        gamma /= gamma.sum(axis=1, keepdims=True)
        w, nk = gamma.mean(axis=0), gamma.sum(axis=0)
        mu = (gamma.T @ x) / (nk[:, None] + 1.0 / s0**2)
    np.testing.assert_allclose(fit.params["w"], w, rtol=1e-9)
    np.testing.assert_allclose(fit.params["mu"], mu, rtol=1e-9)
