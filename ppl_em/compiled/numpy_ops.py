"""The PyTensor mode that evaluates every Op with NumPy: no C to compile.

PyTensor's Python implementation of an elementwise op is one NumPy ufunc call, except
where the node has more inputs than the ufunc takes: PyTensor's rewrites merge
``a * b * c`` into one three-input ``mul``, and NumPy's ``multiply`` takes two, so
PyTensor falls back to ``np.frompyfunc``, a Python call per element. On a Gaussian
mixture's marginal logp (N=500, K=3) one such node took 3.6 ms of a 4.7 ms gradient
(``benchmarks/README.md``). Here such nodes become chains of two-input nodes, after all
of PyTensor's other rewrites and before its in-place ones. Fusion is excluded for the
same reason: a fused op has no ufunc and would run one element at a time.

Around that ufunc call PyTensor's ``Elemwise.perform`` spends about 8 us more (a
broadcasting check over every input's shape, a floating-point error state entered and
left, a dtype cast): on those small graphs most of the time, and the same on every
call. So each elementwise node whose ufunc gives the node's dtype runs as a thunk that
calls the ufunc alone, with the broadcasting check made again only when its inputs'
shapes change, and the error state entered once per call of the whole function
(:class:`NumpyLinker`). The values are the same ufunc calls' bit for bit; a gradient
of the example models' marginal logp was 1.4-2.2x faster (``benchmarks/README.md``).
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.compile import optdb
from pytensor.compile.mode import Mode
from pytensor.graph.rewriting.basic import in2out, node_rewriter
from pytensor.link.vm import Loop, Stack, VMLinker
from pytensor.tensor.elemwise import Elemwise
from pytensor.tensor.math import Sum

TAG = "ppl_em_numpy_ops"
NAME = "ppl_em_binary_elemwise"
# After PyTensor's last merge (49), before its destroy handler and in-place rewrites.
POSITION = 49.2


@node_rewriter([Elemwise])
def binary_elemwise(fgraph, node):
    """``op(a, b, c, ...)`` as ``op(op(op(a, b), c), ...)`` where the op's ufunc takes
    two inputs and the node has more (associative ops only: add, mul, maximum, ...).
    Inputs of another dtype (a boolean mask in a product) are first cast to the
    output's, where NumPy deems that safe, so that no partial result is computed in a
    narrower type than the node's; otherwise the node stays whole."""
    op = node.op
    spec = getattr(op.scalar_op, "nfunc_spec", None)
    if op.inplace_pattern or len(node.inputs) <= 2 or spec is None or spec[1] != 2:
        return None
    if getattr(op.scalar_op, "nfunc_variadic", None) is None:
        return None  # not an associative reduction of its inputs
    (out,) = node.outputs
    dtype = out.type.dtype
    if not all(np.can_cast(x.type.dtype, dtype, "safe") for x in node.inputs):
        return None
    inputs = [x if x.type.dtype == dtype else pt.cast(x, dtype) for x in node.inputs]
    binary = Elemwise(op.scalar_op)
    acc = inputs[0]
    for x in inputs[1:]:
        acc = binary(acc, x)
    if acc.type != out.type:
        try:
            acc = out.type.filter_variable(acc)
        except TypeError:  # static shapes the chain cannot match: keep the node
            return None
    return [acc]


def _result_dtype(function, dtypes: list[np.dtype]) -> np.dtype | None:
    """The dtype ``function`` (a ufunc, or ``np.where``) returns for inputs of
    ``dtypes``; None where NumPy cannot say without the values."""
    if function is np.where:
        return np.result_type(*dtypes[1:])
    try:
        return function.resolve_dtypes((*dtypes, None))[-1]
    except (TypeError, ValueError):
        return None


def _ufunc_of(node):
    """The NumPy function an ``Elemwise`` node's thunk can call alone, or None: one
    output, the function's own number of inputs, and the node's dtype as its result
    (PyTensor casts otherwise); ``np.where`` (a switch) only where nothing is in place."""
    op = node.op
    if not isinstance(op, Elemwise) or op.nfunc is None or len(node.outputs) != 1:
        return None
    function, spec = op.nfunc, op.nfunc_spec
    if spec[1] != len(node.inputs) or spec[2] != 1 or hasattr(node.tag, "sig"):
        return None
    if not isinstance(function, np.ufunc) and (function is not np.where or op.inplace_pattern):
        return None
    dtype = _result_dtype(function, [np.dtype(x.dtype) for x in node.inputs])
    return function if dtype == np.dtype(node.outputs[0].dtype) else None


def ufunc_thunk(node, function, made, compute_map):
    """A thunk that calls ``function`` on the node's inputs and nothing else (in place
    through ``out=`` where PyTensor's rewrites made the node so), in the storage cells of
    the thunk PyTensor ``made`` (the linker may have given the storage map's entries to
    other variables since). The broadcasting check ``Elemwise.perform`` makes at every
    call is made again when the inputs' shapes change; NumPy's floating-point error
    state is :class:`NumpyLinker`'s."""
    inputs, (out,) = made.inputs, made.outputs
    done = compute_map[node.outputs[0]]
    target = node.op.inplace_pattern.get(0)
    scalar = node.outputs[0].ndim == 0
    seen: list = [None]

    def thunk():
        args = [cell[0] for cell in inputs]
        shapes = [a.shape for a in args]
        if shapes != seen[0]:
            Elemwise._check_runtime_broadcast(node, args)
            seen[0] = shapes
        value = function(*args) if target is None else function(*args, out=args[target])
        out[0] = np.asarray(value) if scalar else value  # a 0-d ufunc result is a scalar
        done[0] = True

    thunk.inputs, thunk.outputs, thunk.lazy, thunk.ufunc = inputs, [out], False, function
    return thunk


# NumPy sums a row of fewer than this many values one after another from 0.0 (beyond,
# pairwise with eight accumulators), so column-by-column additions give its result bit
# for bit.
SEQUENTIAL_SUM = 8


def _row_sum(node) -> bool:
    """Whether ``node`` sums a float64 matrix over its last axis (a squared distance per
    observation, over an MvNormal's few coordinates)."""
    op = node.op
    if not isinstance(op, Sum) or op.axis != (1,) or node.inputs[0].ndim != 2:
        return False
    dtypes = {node.inputs[0].dtype, node.outputs[0].dtype, op.acc_dtype or "float64"}
    return dtypes == {"float64"}


def row_sum_thunk(node, made, compute_map):
    """A thunk for a :func:`_row_sum` node that adds the columns of a matrix with
    fewer than ``SEQUENTIAL_SUM`` of them one by one, and leaves wider ones to PyTensor's
    own thunk ``made``. ``Sum.perform`` copies the matrix and reduces each row of it:
    over N x 4 rows, 124 us against 10 us for the columns' additions, with the same
    values (``benchmarks/README.md``)."""
    (cell,), (out,) = made.inputs, made.outputs
    done = compute_map[node.outputs[0]]

    def thunk():
        x = cell[0]
        if not 0 < x.shape[1] < SEQUENTIAL_SUM:
            made()
        else:
            acc = x[:, 0] + 0.0  # as NumPy's sum: from 0.0, so that -0.0 + -0.0 is 0.0
            for j in range(1, x.shape[1]):
                acc += x[:, j]
            out[0] = acc
        done[0] = True

    thunk.inputs, thunk.outputs, thunk.lazy, thunk.row_sum = made.inputs, [out], False, True
    return thunk


def _fast_thunk(node, thunk, compute_map):
    if _row_sum(node):
        return row_sum_thunk(node, thunk, compute_map)
    function = _ufunc_of(node)
    return thunk if function is None else ufunc_thunk(node, function, thunk, compute_map)


class _QuietLoop(Loop):
    def __call__(self):
        with np.errstate(all="ignore"):
            return super().__call__()


class _QuietStack(Stack):
    def __call__(self, *args, **kwargs):
        with np.errstate(all="ignore"):
            return super().__call__(*args, **kwargs)


QUIET = {Loop: _QuietLoop, Stack: _QuietStack}


class NumpyLinker(VMLinker):
    """PyTensor's Python VM, with each elementwise node's thunk a call of its ufunc
    alone (:func:`ufunc_thunk`; made here, after all rewrites, so that no rewrite pass
    is added: a graph rewrite making the same swap added 0.5-1 s of compilation per
    function), run with NumPy's floating-point errors ignored for the whole call (as
    ``Elemwise.perform`` ignores them for each node, and C code never reports them):
    entering that state cost about 2 us, once per node before."""

    def make_vm(self, nodes, thunks, input_storage, output_storage, storage_map,
                post_thunk_clear, computed, compute_map, updated_vars):  # fmt: skip
        thunks = [_fast_thunk(node, thunk, compute_map)
                  for node, thunk in zip(nodes, thunks, strict=True)]  # fmt: skip
        vm = super().make_vm(nodes, thunks, input_storage, output_storage, storage_map,
                             post_thunk_clear, computed, compute_map, updated_vars)  # fmt: skip
        vm.__class__ = QUIET.get(type(vm), type(vm))
        return vm


# PyTensor's rewrite database is process-wide and refuses a name twice (a reload of
# this module); the tag keeps the rewrite out of every mode but numpy_mode's.
if NAME not in optdb:
    optdb.register(NAME, in2out(binary_elemwise, name=NAME), TAG, position=POSITION)


def numpy_mode(inplace: bool = False) -> Mode:
    """Every Op's NumPy implementation, with PyTensor's rewrites except fusion and (but
    with ``inplace``) the in-place ones, variadic elementwise nodes split into
    ufunc-sized ones, and each elementwise node a call of its ufunc
    (:class:`NumpyLinker`).

    In-place rewrites save an allocation per node but check every candidate against
    the whole graph (PyTensor's destroy handler). Without them three compile-heavy test
    files ran 14 % faster; with them, a seed model's ``fit`` (compilation included) took
    0.76-1.39 times as long in two runs, and a call, at N=10^5 too, was at most 10 %
    faster (benchmarks/README.md, ``benchmarks/bench_compile.py``)."""
    linker = NumpyLinker(use_cloop=False, c_thunks=False)
    excluded = ("fusion",) if inplace else ("fusion", "inplace")
    return Mode(linker, "fast_run").excluding(*excluded).including(TAG)
