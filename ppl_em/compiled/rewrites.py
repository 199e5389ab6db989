"""Rewrites of the E-step's joint graph that change its cost, not its value (one also
mends values PyTensor's own form loses, below).

PyMC's MvNormal logp whitens the N deviations with one triangular solve per component,
``L^-1 (x - mu)^T`` with N right-hand sides. LAPACK's ``trtrs`` on a D x N block runs
at a fraction of a matrix product's speed, so the joint instead inverts the D x D factor
once and multiplies: ``(L^-1 I) (x - mu)^T``. That is scikit-learn's arithmetic for the
same quantity (``X @ precisions_cholesky``): the whitened values differ from the
solve's by rounding only, both being backward stable for a triangular factor.

PyMC guards each logp with its parameter checks (``sigma > 0``), compiled as
``switch(cond, logp, -inf)`` on every element, and divides every element by a scale.
Both keep PyTensor's C loop from vectorising. When a check's conditions are single
values (per-component parameters, not data), the rows are compiled without it and the
condition becomes a flag per row, applied after the call (a failed check makes its
rows ``-inf``, as the switch does); a division by a single value becomes a product
with its reciprocal (within 2 ulp). Only for the C backend: NumPy-backed Ops ran the
unchecked rows slower. ``benchmarks/README.md`` has the measurements of both rewrites.

PyMC's Bernoulli on ``logit_p`` computes ``switch(y, log(p), log1p(-p))`` with
``p = sigmoid(x)``, which PyTensor compiles to two softplus per element, one of them
discarded, and checks ``0 <= p <= 1`` with a third transcendental per element. The rows
and Q take ``-softplus(switch(y, -x, x))`` instead, the same value element by element,
and check ``not isnan(x)``, which holds exactly where the bounds do (``sigmoid`` maps
every other value, infinities too, into [0, 1]). Where ``p`` is a column of one
``sigmoid`` (a ``pm.Mixture`` of batched components) PyTensor makes no softplus of it:
it computes ``log(sigmoid(x))`` and ``log1p(-sigmoid(x))``, 6e-14 off, and ``-inf``
where ``sigmoid`` rounds to 0 or 1 (below about -710, above about 37); the rewrite
takes the column of ``x``.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pymc.logprob.utils import CheckParameterValue
from pytensor.graph.basic import Constant, clone_get_equiv
from pytensor.graph.fg import FunctionGraph
from pytensor.graph.traversal import ancestors, graph_inputs
from pytensor.scalar import GE, LE, Log, Log1p, Neg, Switch, TrueDiv
from pytensor.scalar.math import Sigmoid
from pytensor.tensor import TensorVariable
from pytensor.tensor.basic import get_underlying_scalar_constant_value
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import DimShuffle, Elemwise
from pytensor.tensor.exceptions import NotScalarConstantError
from pytensor.tensor.slinalg import SolveTriangular, solve_triangular
from pytensor.tensor.subtensor import Subtensor

# A solve is replaced when its right-hand side has at least this many columns; below
# it the inverse is not paid back (and a handful of columns is no E-step's bottleneck).
MANY_RHS = 256


def _inverse(a: TensorVariable, op: SolveTriangular) -> TensorVariable:
    return solve_triangular(
        a, pt.eye(a.shape[-1], dtype=a.dtype), lower=op.lower,
        unit_diagonal=op.unit_diagonal, b_ndim=2,
    )  # fmt: skip


def _many_rows(b: TensorVariable) -> bool:
    """At least ``MANY_RHS`` rows, or rows of unknown number: the E-step's inputs are
    chunks of data of any length, and chunks are long."""
    rows = b.type.shape[:-1]
    return any(r is None for r in rows) or int(np.prod(rows)) >= MANY_RHS


def _as_product(node) -> TensorVariable | None:
    """The product form of one solve node, or None if it is not a many-row solve with
    one shared factor.

    PyMC builds the whitening as ``Blockwise(SolveTriangular(b_ndim=1))`` over the
    observations, ``a`` of batch shape (1,) and ``b`` of shape (N, D): it becomes
    ``b @ (a^-1)^T``. A plain ``SolveTriangular(b_ndim=2)`` with D x N ``b`` becomes
    ``a^-1 @ b``.
    """
    out = node.outputs[0]
    if isinstance(node.op, SolveTriangular):
        a, b = node.inputs
        columns = b.type.shape[1]
        if node.op.b_ndim != 2 or (columns is not None and columns < MANY_RHS):
            return None
        return pt.dot(_inverse(a, node.op), b).astype(out.dtype)
    core = getattr(node.op, "core_op", None)
    if not (isinstance(node.op, Blockwise) and isinstance(core, SolveTriangular)):
        return None
    a, b = node.inputs
    shared = all(s == 1 for s in a.type.shape[:-2])
    if core.b_ndim != 1 or not shared or not _many_rows(b):
        return None
    a = a.reshape(a.shape[-2:], ndim=2)
    product = pt.dot(b, _inverse(a, core).T)
    return pt.shape_padleft(product, out.ndim - product.ndim).astype(out.dtype)


def fgraph_copy(outputs: list[TensorVariable]) -> FunctionGraph:
    """A copy of the graph of ``outputs`` (same inputs) to rewrite in place: the rows'
    graph is shared with Q's, which keeps PyMC's checks."""
    inputs = [v for v in graph_inputs(outputs) if not isinstance(v, Constant)]
    equiv = clone_get_equiv(inputs, outputs, copy_inputs=False, copy_orphans=False)
    return FunctionGraph(inputs, [equiv[o] for o in outputs], clone=False)


def _replace_nodes(outputs: list[TensorVariable], rule) -> list[TensorVariable]:
    """``outputs`` with each node's output replaced by ``rule(node)`` where not None.
    One node at a time, in order: replacements may nest (a division inside a division),
    which a single ``graph_replace`` of them all cannot take."""
    fg = fgraph_copy(outputs)
    for node in fg.toposort():
        if node not in fg.apply_nodes:
            continue
        new = rule(node)
        if new is not None:
            fg.replace(node.outputs[0], new, import_missing=True)
    return list(fg.outputs)


def solves_as_products(outputs: list[TensorVariable]) -> list[TensorVariable]:
    """``outputs`` with every many-right-hand-side triangular solve made a product."""
    return _replace_nodes(outputs, _as_product)


def _single(x: TensorVariable) -> bool:
    """One value, known from the static shape (any number of length-1 axes)."""
    return all(d == 1 for d in x.type.shape)


def _division_as_product(node) -> TensorVariable | None:
    if isinstance(node.op, Elemwise) and isinstance(node.op.scalar_op, TrueDiv):
        a, b = node.inputs
        if _single(b) and not _single(a):
            return a * pt.reciprocal(b)
    return None


def _scalar_check(node) -> tuple[TensorVariable, TensorVariable] | None:
    """``(logp, condition)`` of a parameter check whose conditions are single values."""
    op = node.op
    if not (isinstance(op, CheckParameterValue) and op.can_be_replaced_by_ninf):
        return None
    expr, *conds = node.inputs
    if not conds or not all(_single(c) for c in conds):
        return None
    return expr, pt.all([pt.all(c) for c in conds])


def checks_as_flags(
    rows: list[TensorVariable],
) -> tuple[list[TensorVariable], list[TensorVariable]]:
    """The rows without their single-value parameter checks and divisions by single
    values, and one boolean flag per row: False where a removed check of that row fails
    (the caller then sets the row to ``-inf``)."""
    fg = fgraph_copy(_replace_nodes(rows, _division_as_product))
    k = len(rows)
    checks = {}
    for node in fg.toposort():
        found = _scalar_check(node)
        if found is not None:
            checks[node.outputs[0]] = found
    for row in list(fg.outputs):
        above = set(ancestors([row]))
        mine = [cond for out, (_, cond) in checks.items() if out in above]
        fg.add_output(pt.all(mine) if mine else pt.constant(True), import_missing=True)
    for out, (expr, _) in checks.items():
        if out in fg.variables:
            fg.replace(out, expr, import_missing=True)
    return list(fg.outputs[:k]), list(fg.outputs[k:])


def _is(var: TensorVariable, scalar_op: type) -> bool:
    owner = var.owner
    return (
        owner is not None
        and isinstance(owner.op, Elemwise)
        and isinstance(owner.op.scalar_op, scalar_op)
    )


def _logit(p: TensorVariable) -> TensorVariable | None:
    """``x`` where ``p`` is ``sigmoid(x)``; where ``p`` indexes or broadcasts
    ``sigmoid(x)`` (a component's column of a batched ``p``), the same of ``x``; else
    None."""
    if _is(p, Sigmoid):
        return p.owner.inputs[0]
    owner = p.owner
    if owner is not None and isinstance(owner.op, Subtensor | DimShuffle):
        inner = _logit(owner.inputs[0])
        return None if inner is None else owner.op(inner, *owner.inputs[1:])
    return None


def _equals(var: TensorVariable, value: float) -> bool:
    """Whether ``var`` is the constant ``value`` (broadcast or not)."""
    try:
        return bool(get_underlying_scalar_constant_value(var) == value)
    except NotScalarConstantError:
        return False


def _logistic_node(node) -> TensorVariable | None:
    """One node of a Bernoulli logp on ``logit_p`` in its cheaper form (module
    docstring), or None."""
    if not isinstance(node.op, Elemwise):
        return None
    op = node.op.scalar_op
    if isinstance(op, Switch):
        cond, one, zero = node.inputs
        if _is(one, Log) and _is(zero, Log1p) and _is(zero.owner.inputs[0], Neg):
            p = one.owner.inputs[0]
            x = _logit(p) if p is zero.owner.inputs[0].owner.inputs[0] else None
            if x is not None:
                return -pt.softplus(pt.switch(cond, -x, x))
    if isinstance(op, GE | LE):
        p, bound = node.inputs
        x = _logit(p)
        if x is not None and _equals(bound, 0.0 if isinstance(op, GE) else 1.0):
            return pt.invert(pt.isnan(x))
    return None


def logistic_as_softplus(outputs: list[TensorVariable]) -> list[TensorVariable]:
    """``outputs`` with every Bernoulli logp on ``logit_p`` and its check in the cheaper
    form of the module docstring (the same values)."""
    return _replace_nodes(outputs, _logistic_node)
