"""The NumPy-backed PyTensor mode (ppl_em.compiled.numpy_ops): variadic elementwise
nodes are split into two-input ones, which NumPy's ufuncs evaluate in one call each,
each such node's thunk is that call alone, and the values are those NumPy gives."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from pytensor.compile.mode import Mode
from pytensor.link.vm import VMLinker
from pytensor.scalar import Add, Mul
from pytensor.tensor.elemwise import Elemwise

from ppl_em.compiled.numpy_ops import numpy_mode
from tests.conftest import numpy_ops


def _variadic(fn) -> list:
    """Add and Mul nodes with more than two inputs in a compiled function's graph."""
    return [
        node
        for node in fn.maker.fgraph.apply_nodes
        if isinstance(node.op, Elemwise)
        and isinstance(node.op.scalar_op, Add | Mul)
        and len(node.inputs) > 2
    ]


def test_products_and_sums_of_many_terms_are_split_and_keep_numpys_values():
    a, b, c, d = (pt.vector(n, dtype="float64") for n in "abcd")
    out = [a * b * c * d, a + b + c + d, pt.exp(a) * (b + c + d) * (a - d)]
    fn = pytensor.function([a, b, c, d], out, mode=numpy_mode())
    assert not _variadic(fn)
    rng = np.random.default_rng(0)
    va, vb, vc, vd = rng.normal(size=(4, 50))
    got = fn(va, vb, vc, vd)
    np.testing.assert_allclose(got[0], va * vb * vc * vd, rtol=1e-15)
    np.testing.assert_allclose(got[1], va + vb + vc + vd, rtol=1e-14)
    np.testing.assert_allclose(got[2], np.exp(va) * (vb + vc + vd) * (va - vd), rtol=1e-14)


def test_other_dtypes_are_cast_to_the_output_first_so_no_partial_result_narrows():
    # int8 * int8 would overflow (to 16 and 64) were the chain to multiply them first.
    i, j = pt.vector("i", dtype="int8"), pt.vector("j", dtype="int8")
    x, mask = pt.vector("x", dtype="float64"), pt.vector("m", dtype="bool")
    fn = pytensor.function([i, j, x, mask], [i * j * x, -1.0 * mask * x], mode=numpy_mode())
    assert not _variadic(fn)
    big = np.array([100, 120], dtype="int8")
    prod, masked = fn(big, big, np.ones(2), np.array([True, False]))
    np.testing.assert_array_equal(prod, [10000.0, 14400.0])
    np.testing.assert_array_equal(masked, [-1.0, -0.0])


def test_a_mixture_gradient_has_no_variadic_node_and_keeps_its_values():
    """A Gaussian mixture's logp and gradient (the function PyMC's NUTS calls): every
    product and sum has at most two inputs, and the values equal PyTensor's own
    NumPy-backed evaluation of the unsplit graph to rounding (C's are checked in
    tests/test_reference_modes.py)."""
    x = np.random.default_rng(0).normal(np.array([-3.0, 0.0, 4.0])[np.arange(500) % 3])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        mu = pm.Normal("mu", 0.0, 10.0, shape=3)
        sigma = pm.HalfNormal("sigma", 5.0, shape=3)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    start = model.initial_point()
    values = []
    for split in (True, False):
        with contextlib.nullcontext() if split else numpy_ops():
            fn = model.logp_dlogp_function(ravel_inputs=True, mode=numpy_mode() if split else None)
        fn.set_extra_values({})
        variadic = _variadic(fn._pytensor_function)
        # PyTensor's own graph has such nodes (else this test would show nothing).
        assert not variadic if split else variadic
        point = np.concatenate([np.ravel(start[v.name]) + 0.2 for v in fn._grad_vars])
        values.append(fn(point))
    np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-12)
    np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-10, atol=1e-10)


def _pytensors_thunks(inplace: bool = False) -> Mode:
    """``numpy_mode(inplace)``'s own rewrites on PyTensor's own thunks."""
    linker = VMLinker(use_cloop=False, c_thunks=False)
    return Mode(linker, numpy_mode(inplace).provided_optimizer)


def _ufunc_nodes(fn) -> list:
    """The nodes whose thunk is a ufunc call alone."""
    return [n for n, t in zip(fn.vm.nodes, fn.vm.thunks, strict=True) if hasattr(t, "ufunc")]


def _elementwise_graph():
    x, i = pt.vector("x", dtype="float64"), pt.vector("i", dtype="int64")
    y, b, s = pt.matrix("y", dtype="float64"), pt.vector("b", dtype="bool"), pt.scalar("s")
    outputs = [
        pt.exp(x)[None, :] * y,  # broadcast
        pt.log(s - x),  # log(0) and log(< 0): -inf and NaN, which NumPy warns of
        s * 2.0 + pt.log(s),  # 0-d
        i + x,  # an integer and a float input
        pt.switch(b, x, -x),  # np.where
        pt.cast(i, "float64") * 0.5,  # a cast, which has no ufunc of its own
        ((x + 1.0) * 2.0 - x) / 3.0,  # intermediate results, rewritten in place
    ]
    rng = np.random.default_rng(1)
    values = [np.array([0.7, 0.5, 1.3, 2.0]), np.arange(4), rng.normal(size=(3, 4)),
              np.array([True, False, True, False]), np.array(0.7)]  # fmt: skip
    return [x, i, y, b, s], outputs, values


def _expected(x, i, y, b, s):
    with np.errstate(divide="ignore", invalid="ignore"):
        return [np.exp(x)[None, :] * y, np.log(s - x), s * 2.0 + np.log(s), i + x,
                np.where(b, x, -x), i.astype(float) * 0.5, ((x + 1.0) * 2.0 - x) / 3.0]  # fmt: skip


@pytest.mark.parametrize("inplace", [False, True], ids=["numpy_mode", "in-place"])
def test_each_elementwise_node_is_its_ufunc_call_with_the_same_bits(inplace):
    """Elementwise nodes run as one NumPy call each (in place where the graph's nodes
    are: numpy_mode makes none so, PyTensor's in-place rewrites some), with the values
    of PyTensor's ``Elemwise.perform`` on the same graph bit for bit and NumPy's;
    NumPy's floating-point warnings stay silent during the call, as C's are, and its
    error state is the caller's after it."""
    inputs, outputs, values = _elementwise_graph()
    fast = pytensor.function(inputs, outputs, mode=numpy_mode(inplace))
    # The same rewrites, PyTensor's own thunks.
    plain = pytensor.function(inputs, outputs, mode=_pytensors_thunks(inplace))
    assert [n.op for n in fast.vm.nodes] == [n.op for n in plain.vm.nodes]
    ufunc_nodes = _ufunc_nodes(fast)
    assert len(ufunc_nodes) >= 8
    assert any(n.op.destroy_map for n in ufunc_nodes) == inplace
    assert len(ufunc_nodes) < len(fast.vm.nodes) and not _ufunc_nodes(plain)
    state = np.geterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fast(*values)
    assert np.geterr() == state
    assert isinstance(got[2], np.ndarray) and got[2].shape == ()
    for a, b, e in zip(got, plain(*values), _expected(*values), strict=True):
        assert a.dtype == b.dtype == np.float64
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, e, rtol=1e-15)


def test_an_input_of_length_one_where_the_graph_has_no_broadcast_is_refused():
    """PyTensor refuses to broadcast an input the graph does not mark broadcastable;
    the ufunc node still does when the shapes change after a first call."""
    x, y = pt.vector("x"), pt.vector("y")
    fast = pytensor.function([x, y], pt.exp(x) + y, mode=numpy_mode())
    assert len(_ufunc_nodes(fast)) == 2
    np.testing.assert_array_equal(fast(np.zeros(3), np.ones(3)), np.full(3, 2.0))
    with pytest.raises(ValueError, match="Runtime broadcasting not allowed"):
        fast(np.zeros(1), np.ones(3))


def test_a_sum_over_a_few_columns_adds_them_one_by_one_with_numpys_bits():
    """A float64 matrix summed over its last axis (an MvNormal's squared distances, one
    per observation) runs as additions of its columns where it has fewer than
    ``SEQUENTIAL_SUM``: PyTensor's ``Sum.perform`` copies the matrix and reduces each
    row, a dozen times slower over N x 4. The values are that reduction's bit for bit,
    signed zeros included, in either memory order; wider matrices keep the reduction."""
    from ppl_em.compiled.numpy_ops import SEQUENTIAL_SUM

    m = pt.matrix("m", dtype="float64")
    outputs = [pt.sum(pt.sqr(m), axis=1), pt.sum(m, axis=1), pt.sum(m.T, axis=0)]
    fast = pytensor.function([m], outputs, mode=numpy_mode())
    plain = pytensor.function([m], outputs, mode=_pytensors_thunks())
    sums = [t for t in fast.vm.thunks if getattr(t, "row_sum", False)]
    assert len(sums) == 2 and not any(getattr(t, "row_sum", False) for t in plain.vm.thunks)
    rng = np.random.default_rng(3)
    for width in range(1, SEQUENTIAL_SUM + 3):
        values = rng.normal(size=(500, width)) * 10.0 ** rng.integers(-8, 9, (500, width))
        values[:5] = -0.0  # NumPy's sum of -0.0s is 0.0
        for layout in (values, np.asfortranarray(values), values[::-1]):
            for a, b in zip(fast(layout), plain(layout), strict=True):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(np.signbit(a), np.signbit(b))
    assert not np.signbit(fast(values)[1][:5]).any()
