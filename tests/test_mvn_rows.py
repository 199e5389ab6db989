"""The E-step's rows of MvNormal mixtures written out (:mod:`ppl_em.steps.mvn_rows`):
equal to the rows compiled from the model's graph, to SciPy's densities, and kept out
where they do not apply."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy.linalg import solve_triangular
from scipy.stats import multivariate_normal

import ppl_em
from ppl_em.prepared import PreparedEM
from ppl_em.steps.estep import e_step, joint, split, whole_data
from ppl_em.steps.mvn_rows import (
    PARALLEL_MIN,
    WrittenMvnRows,
    quadratic_rows,
    with_written_mvn_rows,
)
from tests.test_glm_scores import _off_optimum, _Shifted
from tests.test_mvnormal import (
    _chol_from_flat,
    blobs,
    flat_cholesky_mixture,
    gaussian_2d_label,
    lkj_mixture,
)


def covariance_mixture(x: np.ndarray) -> pm.Model:
    """Each 2 x 2 covariance from two variances and a free covariance (no factor in
    the graph: the written rows take its Cholesky factor)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Flat("mu", shape=(2, 2))
        var = pm.HalfFlat("var", shape=(2, 2))
        c = pm.Flat("c", shape=2)
        covs = [pt.stack([pt.stack([var[j, 0], c[j]]), pt.stack([c[j], var[j, 1]])])
                for j in range(2)]  # fmt: skip
        comps = [pm.MvNormal.dist(mu=mu[j], cov=covs[j]) for j in range(2)]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def _factors(sd, off) -> pt.TensorVariable:
    """(K, D, D) lower-triangular factors from sds (K, D) and the entries below the
    diagonal (K, D(D-1)/2), as :func:`tests.test_mvnormal._chol_from_flat` in NumPy."""
    k, d = sd.type.shape
    rows, cols = np.tril_indices(d, -1)
    chol = pt.set_subtensor(pt.zeros((k, d, d))[:, np.arange(d), np.arange(d)], sd)
    return pt.set_subtensor(chol[:, rows, cols], off)


MODELS = {
    "flat-cholesky-list": lambda: flat_cholesky_mixture(blobs(700, 3, 4), 3),
    "flat-cholesky-batched": lambda: flat_cholesky_mixture(blobs(700, 3, 4), 3, batched=True),
    "lkj-cholesky-list": lambda: lkj_mixture(blobs(400, 2, 3), 2),
    "sd-correlation-label": gaussian_2d_label,
    "covariance": lambda: covariance_mixture(blobs(400, 2, 2, seed=3)),
}


@pytest.fixture(scope="module")
def prepared():
    cache: dict[str, PreparedEM] = {}

    def get(name: str) -> PreparedEM:
        if name not in cache:
            cache[name] = ppl_em.prepare(MODELS[name](), mode="mle")
        return cache[name]

    return get


def _graph_joint(functions, arrays, u) -> np.ndarray:
    return np.stack([np.array(r) for r in functions.rows.graph_rows(u, *arrays)], axis=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_written_rows_equal_the_compiled_rows(name, prepared):
    """Every observation's ``log p(x_i, z_i = k)`` at a point off the optimum, and the
    E-step over uneven chunks (each length its own buffers) adds up to the whole
    data's with the compiled rows."""
    functions, config = prepared(name)
    assert isinstance(functions.rows, WrittenMvnRows)
    u = _off_optimum(functions, config)
    compiled = _graph_joint(functions, functions.data, u)
    np.testing.assert_allclose(joint(functions, u), compiled, rtol=1e-12, atol=1e-12)
    graph = functions._replace(rows=functions.rows.graph_rows)
    reference = e_step(graph, u, whole_data(functions))
    parts = [e_step(functions, u, chunk) for chunk in split(functions, 233)]
    assert sum(p.loglik for p in parts) == pytest.approx(reference.loglik, rel=1e-13)
    np.testing.assert_allclose(sum(p.nk for p in parts), reference.nk, rtol=1e-11)


def test_the_written_rows_are_the_weights_and_scipys_densities(prepared):
    """Against the joint written here: ``log w_k`` plus SciPy's MvNormal log density with
    ``Sigma_k = L_k L_k^T``, ``L_k`` built from the free sds and off-diagonal entries."""
    functions, config = prepared("flat-cholesky-list")
    u = _off_optimum(functions, config, seed=5)
    p = dict(zip(functions.layout.rv_names, functions.constrain(u), strict=True))
    chol = _chol_from_flat(p["sd"], p["off"])
    (x,) = functions.data
    reference = np.stack(
        [np.log(p["w"][k]) + multivariate_normal(p["mu"][k], chol[k] @ chol[k].T).logpdf(x)
         for k in range(3)], axis=1)  # fmt: skip
    np.testing.assert_allclose(joint(functions, u), reference, rtol=1e-12)


def test_quadratic_forms_on_two_threads_equal_triangular_solves():
    """From ``PARALLEL_MIN`` observations the forms run in two halves on two threads;
    each entry is ``c_k - ||L_k^-1 (x_i - mu_k)||^2 / 2`` by SciPy's triangular solve."""
    rng = np.random.default_rng(4)
    n, k, d = PARALLEL_MIN + 777, 2, 3
    x, mu = rng.normal(size=(n, d)), rng.normal(size=(k, d))
    chol = np.tril(rng.normal(size=(k, d, d)), -1) + np.eye(d) * rng.uniform(0.5, 2.0, (k, 1, d))
    p = np.linalg.inv(chol)
    c = rng.normal(size=k)
    got = quadratic_rows(x, p, np.einsum("kij,kj->ki", p, mu), c, np.empty((k, n)))
    for j in range(k):
        z = solve_triangular(chol[j], (x - mu[j]).T, lower=True)
        # atol: adding c_k rounds to its own ulps where c_k - q/2 nearly cancels
        expected = c[j] - 0.5 * np.sum(z**2, axis=0)
        np.testing.assert_allclose(got[j], expected, rtol=1e-12, atol=1e-14)


def test_a_covariance_that_is_not_positive_definite_is_the_graphs_call(prepared):
    """A free covariance beyond its variances' product: the call is the compiled rows'
    (PyMC's check makes every row -inf); near such a point ``prepare``'s check would
    compare the compiled rows with themselves, so the rows are not swapped there."""
    functions, config = prepared("covariance")
    u = _off_optimum(functions, config)
    u[functions.layout.slices[functions.layout.rv_names.index("c")]] = 50.0
    written = joint(functions, u)
    assert np.all(np.isneginf(written))
    np.testing.assert_array_equal(written, _graph_joint(functions, functions.data, u))
    compiled = functions._replace(rows=functions.rows.graph_rows)
    assert with_written_mvn_rows(compiled, config.mvn, config.plan.mvn, u) is compiled


def test_rows_that_differ_from_the_compiled_rows_are_not_swapped(prepared):
    """``prepare`` swaps the rows only where they equal the compiled rows on the data
    held (a sample of it): a constant shift (a label term read wrong) or a term varying
    by observation keeps the compiled rows."""
    functions, config = prepared("flat-cholesky-list")
    compiled = functions._replace(rows=functions.rows.graph_rows)
    u = _off_optimum(functions, config)
    assert isinstance(with_written_mvn_rows(compiled, config.mvn, config.plan.mvn, u).rows,
                      WrittenMvnRows)  # fmt: skip
    for shift in (lambda a: 0.3, lambda a: 1e-6 * a[0][:, 0]):
        shifted = compiled._replace(rows=_Shifted(compiled.rows, shift))
        out = with_written_mvn_rows(shifted, config.mvn, config.plan.mvn, u)
        assert out.rows is shifted.rows


def test_not_written_where_they_do_not_apply():
    """NumPy-backed Ops asked for (``backend="python"``), a numeric MvNormal M-step
    (``mode="map"`` with informative priors), and label probabilities that vary by
    observation keep the compiled rows; the last one's joint is the one written here."""
    x = blobs(300, 2, 2, seed=8)
    functions, _ = ppl_em.prepare(flat_cholesky_mixture(x, 2), mode="mle", backend="python")
    assert not isinstance(functions.rows, WrittenMvnRows)
    functions, config = ppl_em.prepare(gaussian_2d_label(), mode="map")
    assert not config.mvn and not isinstance(functions.rows, WrittenMvnRows)
    probs = np.random.default_rng(9).dirichlet(np.ones(2), size=x.shape[0])
    with pm.Model() as model:
        mu = pm.Flat("mu", shape=(2, 2))
        sd = pm.HalfFlat("sd", shape=(2, 2))
        off = pm.Flat("off", shape=(2, 1))
        z = pm.Categorical("z", p=probs, shape=x.shape[0])
        pm.MvNormal("x", mu=mu[z], chol=_factors(sd, off)[z], observed=x)
    functions, config = ppl_em.prepare(model, mode="mle")
    assert config.mvn and not functions.shared_label
    assert not isinstance(functions.rows, WrittenMvnRows)
    u = _off_optimum(functions, config)
    p = dict(zip(functions.layout.rv_names, functions.constrain(u), strict=True))
    chol = _chol_from_flat(p["sd"], p["off"])
    reference = np.log(probs) + np.stack(
        [multivariate_normal(p["mu"][k], chol[k] @ chol[k].T).logpdf(x) for k in range(2)],
        axis=1,
    )
    np.testing.assert_allclose(joint(functions, u), reference, rtol=1e-12)


def test_a_fit_on_written_rows_is_the_fit_on_compiled_rows(prepared):
    """The same iterations from the same start, to the same optimum."""
    functions, config = prepared("flat-cholesky-list")
    graph = PreparedEM(functions._replace(rows=functions.rows.graph_rows), config)
    a = ppl_em.fit(prepared=PreparedEM(functions, config), mode="mle", progressbar=False)
    b = ppl_em.fit(prepared=graph, mode="mle", progressbar=False)
    assert a.n_iter_ == b.n_iter_ and a.converged_ and b.converged_
    assert a.objective == pytest.approx(b.objective, rel=1e-12)
    for name in ("w", "mu", "sd", "off"):
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-7, atol=1e-9)
