"""The MvNormal M-step's map back to the free variables, in the covariance's Cholesky factor.

Where the model writes each covariance as ``L @ L.mT`` the solve targets the factor; it
must land where the covariance's own solve lands (both reproduce the weighted moments
computed in NumPy here), with fewer evaluations of the map, and fall back to the
covariance's solve where the model's ``L`` is not a lower-triangular factor.
"""

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest

import ppl_em
from ppl_em.em import default_start
from ppl_em.steps.mvn_moments import weighted_moments
from ppl_em.steps.mvn_solve import MvnUpdate, solve_params
from tests.test_mvnormal import blobs, flat_cholesky_mixture, gaussian_2d_label, lkj_mixture


def _free_factor(k: int, d: int, symmetric: bool = False):
    """``(w, mu, factor)``: free weights and means, and (K, D, D) factors with free
    standard deviations on the diagonal and free entries below it (and, ``symmetric``,
    mirrored above it)."""
    rows, cols = np.tril_indices(d, -1)
    w = pm.Dirichlet("w", a=np.ones(k))
    mu = pm.Flat("mu", shape=(k, d))
    sd = pm.HalfFlat("sd", shape=(k, d))
    off = pm.Flat("off", shape=(k, len(rows)))
    factor = pt.set_subtensor(pt.zeros((k, d, d))[:, np.arange(d), np.arange(d)], sd)
    factor = pt.set_subtensor(factor[:, rows, cols], off)
    return w, mu, pt.set_subtensor(factor[:, cols, rows], off) if symmetric else factor


def _flat_cholesky_label(x: np.ndarray, k: int) -> pm.Model:
    """An explicit label indexing (K, D, D) factors built from free entries."""
    with pm.Model() as model:
        w, mu, chol = _free_factor(k, x.shape[1])
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=x)
    return model


def _symmetric_root_mixture(x: np.ndarray, k: int) -> pm.Model:
    """``cov = S @ S.mT`` with ``S`` symmetric: one-to-one onto the covariances (``S`` is
    their square root), but ``S`` is no Cholesky factor. Its lower triangle can match
    the target's factor exactly while its upper one is not zero, so the factor's solve
    succeeds on the wrong covariance unless it is checked."""
    with pm.Model() as model:
        w, mu, root = _free_factor(k, x.shape[1], symmetric=True)
        comps = [pm.MvNormal.dist(mu=mu[j], cov=root[j] @ root[j].T) for j in range(k)]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


class _Counted:
    """A map that counts its evaluations."""

    def __init__(self, params):
        self.params, self.calls = params, 0

    def __call__(self, u):
        self.calls += 1
        return self.params(u)


def _counted(update: MvnUpdate) -> tuple[MvnUpdate, _Counted]:
    """``update`` whose every evaluation of the compiled map is counted."""
    if update.factor is None:
        counter = _Counted(update.params)
        return update._replace(params=counter), counter
    counter = _Counted(update.factor.params)
    cov = update.params._replace(factor_params=counter)
    return update._replace(params=cov, factor=update.factor._replace(params=counter)), counter


def _setup(model, x):
    functions, config = ppl_em.prepare(model, mode="mle")
    (update,) = config.mvn
    u0 = default_start(functions, config, rng=None)
    gamma = np.random.default_rng(3).dirichlet(np.ones(2), size=len(x))
    return functions, update, u0, weighted_moments(gamma, x)


def _assert_reproduces(update: MvnUpdate, u: np.ndarray, mu: np.ndarray, cov: np.ndarray):
    k, d = mu.shape
    got = update.params(u)
    np.testing.assert_allclose(got[: k * d].reshape(k, d), mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[k * d :].reshape(k, d, d), cov, rtol=1e-8, atol=1e-12)


# name: (model builder, groups of the factor's Jacobian; None: the sd-correlation form)
MODELS = {
    "flat-cholesky-list": (lambda x: flat_cholesky_mixture(x, 2), 1),
    "flat-cholesky-label": (lambda x: _flat_cholesky_label(x, 2), 1),
    "lkj-cholesky-list": (lambda x: lkj_mixture(x, 2), 1),
    "sd-correlation": (lambda x: gaussian_2d_label(), None),
}


@pytest.fixture(scope="module")
def setups():
    """Each model of ``MODELS`` prepared once for the module: ``(functions, update, u0,
    (mu, cov))`` (the tests copy what they change)."""
    cache = {}

    def get(name):
        if name not in cache:
            build, groups = MODELS[name]
            x = blobs(300, 2, 2, seed=8) if groups is None else blobs(300, 2, 3)
            cache[name] = _setup(build(x), x)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_the_factor_solve_lands_where_the_covariance_solve_does(setups, name):
    groups = MODELS[name][1]
    _, update, u0, (mu, cov) = setups(name)
    assert update.factor is not None, "the model's L @ L.mT was not found"
    if groups is not None:
        # one free value per entry of the factor: its Jacobian is one difference
        assert len(update.factor.groups) == groups
    by_factor, counter = _counted(update)
    a = solve_params(by_factor, u0, mu, cov)
    by_cov, cov_counter = _counted(update._replace(factor=None))
    b = solve_params(by_cov, u0, mu, cov)
    assert a is not None and b is not None
    _assert_reproduces(update, a, mu, cov)
    _assert_reproduces(update, b, mu, cov)
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    assert counter.calls < cov_counter.calls


def test_a_factor_that_is_not_a_cholesky_factor_falls_back_to_the_covariance():
    x = blobs(300, 2, 3)
    _, update, u0, (mu, cov) = _setup(_symmetric_root_mixture(x, 2), x)
    assert update.factor is not None
    got = solve_params(update, u0, mu, cov)
    assert got is not None
    _assert_reproduces(update, got, mu, cov)


@pytest.mark.parametrize("name", ["flat-cholesky-list", "lkj-cholesky-list"])
def test_a_factor_set_entry_by_entry_is_solved_entry_by_entry(setups, name):
    """Free values that set the mean's and factor's entries one each (through their
    transforms): the solve divides each entry's error by its own derivative, and lands
    where the whole whitened Jacobian's Newton lands, on the weighted moments."""
    _, update, u0, (mu, cov) = setups(name)
    factor = update.factor
    assert factor.outputs is not None
    assert np.array_equal(np.flatnonzero(factor.pattern.any(axis=1)), np.sort(factor.outputs))
    a = solve_params(update, u0, mu, cov)
    b = solve_params(update._replace(factor=factor._replace(outputs=None)), u0, mu, cov)
    assert a is not None and b is not None
    _assert_reproduces(update, a, mu, cov)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_factor_whose_entries_share_free_values_is_not_solved_entry_by_entry(setups):
    """``L = diag(sd) chol(R)``: a standard deviation moves a whole row of ``L``."""
    _, update, _, _ = setups("sd-correlation")
    assert update.factor.outputs is None and update.outputs is None
