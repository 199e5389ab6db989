"""Terms of the rows that depend on the data alone are computed once per chunk, and the
rows keep their value: a Poisson mixture's ``log y!`` leaves the rows' graph, its rows
equal SciPy's log-pmf, a chunk whose arrays can change is recomputed at each call, and a
kept chunk's terms are dropped with its arrays."""

import gc

import numpy as np
import pymc as pm
import pytest
from pytensor.graph.traversal import applys_between, graph_inputs
from scipy import stats

import ppl_em
from ppl_em.compiled.hoist import DataTerms
from ppl_em.em import apply_start

RNG = np.random.default_rng(3)
Y = np.r_[RNG.poisson(2.0, 150), RNG.poisson(9.0, 100)]
START = {"w": np.array([0.3, 0.7]), "mu": np.array([1.5, 8.0])}


@pytest.fixture(scope="module")
def poisson():
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 2.0, 0.2, shape=2)
        z = pm.Categorical("z", p=w, shape=Y.size)
        pm.Poisson("y", mu=mu[z], observed=Y)
    return ppl_em.prepare(model, backend="python")


def _reference(y: np.ndarray) -> np.ndarray:
    return np.log(START["w"]) + stats.poisson.logpmf(y[:, None], START["mu"])


def test_log_factorial_is_a_data_term_and_the_rows_keep_their_value(poisson):
    f = poisson.functions
    inputs, outputs, _ = f.rows.graph
    ops = {type(getattr(n.op, "scalar_op", n.op)).__name__
           for n in applys_between(list(graph_inputs(outputs)), outputs)}  # fmt: skip
    assert "GammaLn" not in ops
    assert any(v.name and v.name.startswith("data_term") for v in inputs)
    u = apply_start(f, START, np.zeros(f.layout.size))
    np.testing.assert_allclose(np.stack(f.rows(u, *f.data), 1), _reference(Y), rtol=1e-12)


def test_a_chunk_that_can_change_is_recomputed(poisson):
    f = poisson.functions
    u = apply_start(f, START, np.zeros(f.layout.size))
    y = Y.copy()  # writable: a source may read the next chunk into it
    first = np.stack(f.rows(u, y), 1)
    y[:] = y[::-1]
    np.testing.assert_allclose(np.stack(f.rows(u, y), 1), _reference(Y[::-1]), rtol=1e-12)
    np.testing.assert_allclose(first, _reference(Y), rtol=1e-12)


def test_terms_are_kept_per_read_only_chunk_and_dropped_with_it():
    calls = []

    def compute(*arrays):
        calls.append(1)
        return [arrays[0] * 2.0]

    terms = DataTerms(compute)
    fixed = np.arange(5.0)
    fixed.flags.writeable = False
    view = fixed[1:]  # read-only down to the array that owns the memory
    np.testing.assert_array_equal(terms.of((view,))[0], view * 2.0)
    terms.of((view,))
    assert len(calls) == 1
    loose = np.arange(4.0)[::2]
    loose.flags.writeable = False  # a read-only view of a writable array can still change
    terms.of((loose,))
    terms.of((loose,))
    assert len(calls) == 3
    del view, fixed
    gc.collect()
    assert not terms._kept
