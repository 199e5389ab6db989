"""The PyTensor mode that evaluates every Op with NumPy: no C to compile.

PyTensor's Python implementation of an elementwise op is one NumPy ufunc call, except
where the node has more inputs than the ufunc takes: PyTensor's rewrites merge
``a * b * c`` into one three-input ``mul``, and NumPy's ``multiply`` takes two, so
PyTensor falls back to ``np.frompyfunc``, a Python call per element. On a Gaussian
mixture's marginal logp (N=500, K=3) one such node took 3.6 ms of a 4.7 ms gradient
(``benchmarks/README.md``). Here such nodes become chains of two-input nodes, after all
of PyTensor's other rewrites and before its in-place ones. Fusion is excluded for the
same reason: a fused op has no ufunc and would run one element at a time.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.compile import optdb
from pytensor.compile.mode import Mode
from pytensor.graph.rewriting.basic import in2out, node_rewriter
from pytensor.link.vm import VMLinker
from pytensor.tensor.elemwise import Elemwise

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


# PyTensor's rewrite database is process-wide and refuses a name twice (a reload of
# this module); the tag keeps the rewrite out of every mode but numpy_mode's.
if NAME not in optdb:
    optdb.register(NAME, in2out(binary_elemwise, name=NAME), TAG, position=POSITION)


def numpy_mode() -> Mode:
    """Every Op's NumPy implementation, with PyTensor's rewrites except fusion, and
    variadic elementwise nodes split into ufunc-sized ones."""
    linker = VMLinker(use_cloop=False, c_thunks=False)
    return Mode(linker, "fast_run").excluding("fusion").including(TAG)
