"""Where a family parameter's values come from: free variables (a *slot*), constants,
or per-observation data.

A slot says which elements of which free variables hold the parameter, and along which
axes the parameter varies: ``"k"`` (components) and ``"d"`` (items: the values one
observation has, e.g. the answers of a latent class model or the features of a
diagonal-covariance Gaussian). ``theta[z]`` with ``theta`` of shape (K,) varies along
``("k",)`` and is shared by the items; of shape (K, D) along ``("k", "d")``; a free
variable the label does not index is shared by the components (a *tied* parameter:
``()`` or ``("d",)``). ``refs`` lists the elements in row-major order over the axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytensor.scalar as ps
import pytensor.tensor as pt
from pymc.exceptions import NotConstantValueError
from pymc.pytensorf import constant_fold
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorVariable
from pytensor.tensor.elemwise import DimShuffle, Elemwise
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1, Subtensor

from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph


class Slot(NamedTuple):
    """A free parameter: its elements ``refs = ((rv, flat index), ...)`` in row-major
    order over ``axes``; ``inverse`` when the family reads ``1 / theta``."""

    refs: tuple[tuple[TensorVariable, int], ...]
    inverse: bool
    axes: tuple[str, ...] = ("k",)


@dataclass(frozen=True)
class DataRef:
    """A family parameter known per observation: the data input ``name``, or (for data
    that cannot be cut into chunks) the whole ``array``. Not a tuple, so never taken for
    a slot."""

    name: str | None
    array: np.ndarray | None = None


def strip(var: TensorVariable) -> TensorVariable:
    while var.owner and isinstance(var.owner.op, DimShuffle) and not var.owner.op.drop:
        if var.owner.op.shuffle != sorted(var.owner.op.shuffle):
            break
        var = var.owner.inputs[0]
    return var


def _is_reciprocal(var: TensorVariable) -> bool:
    op = var.owner.op if var.owner else None
    return isinstance(op, Elemwise) and isinstance(op.scalar_op, ps.Reciprocal)


def value_of(expr: TensorVariable) -> np.ndarray:
    """The value of an expression of constants and shared variables (``pm.Data``, or a
    variable fixed by ``pm.do``), which stay put while a model is fitted."""
    try:
        return np.asarray(constant_fold([expr])[0])
    except NotConstantValueError:
        return np.asarray(expr.eval())


def shape_of(var: TensorVariable) -> tuple[int, ...]:
    """``var``'s shape: static, or read off the ``pm.Data`` and coordinate lengths
    (``dims``) it depends on, which stay put while a model is fitted."""
    if None not in var.type.shape:
        return tuple(var.type.shape)
    return tuple(int(s) for s in value_of(pt.as_tensor(var.shape)))


def all_elements(rv: TensorVariable) -> tuple:
    """Every element of ``rv`` as ``(rv, flat index)``, in order."""
    return tuple((rv, j) for j in range(int(np.prod(shape_of(rv))) if rv.ndim else 1))


def _indexed(base, graph: MixtureGraph, items: tuple, inverse: bool):
    """``base[z]``: per component, or per component and item; a known constant."""
    params = set(graph.params)
    k = graph.n_components
    if base in params and shape_of(base) == (k,):
        return all_elements(base), inverse, ("k",)
    if base in params and items and shape_of(base) == (k, *items):
        return all_elements(base), inverse, ("k", "d")
    if not inverse and not set(ancestors([base])) & params:
        # A known per-component constant such as sigma_known[z]: shape (1, K).
        return value_of(base)[None, :]
    return None


def _direct(expr, graph: MixtureGraph, k: int | None, items: tuple, inverse: bool):
    """A free variable used as it is: per component in a batched Mixture (last axis K),
    one scalar per list component, otherwise shared by the components (tied)."""
    if k is not None:
        return (all_elements(expr), inverse, ("k",)) if expr.ndim == 0 else None
    if graph.kind == "mixture" and shape_of(expr) == (graph.n_components,):
        return all_elements(expr), inverse, ("k",)
    if expr.ndim == 0:
        return all_elements(expr), inverse, ()
    if graph.kind == "label" and items and shape_of(expr) == items:
        return all_elements(expr), inverse, ("d",)
    return None


def param_slot(expr, graph: MixtureGraph, k: int | None, data: DataSpec | None, items=()):
    """``(refs, inverse, axes)``, a constant array, a :class:`DataRef`, or None if
    unrecognised. ``k`` is None when components are batched along the last axis or
    indexed by the label, else the number of a list component; ``items`` is the shape
    of one observation's values (``()`` for one value)."""
    params = set(graph.params)
    expr = strip(expr)
    leaves = dict(zip(data.leaves, data.names, strict=True)) if data else {}
    if expr in leaves:
        return DataRef(leaves[expr])
    above = set(ancestors([expr]))
    if above & set(leaves):
        return None  # an expression of per-observation data
    if not (above & (params | {graph.label_rv} - {None})):
        return value_of(expr)
    inverse = _is_reciprocal(expr)
    if inverse:
        expr = strip(expr.owner.inputs[0])
    op = expr.owner.op if expr.owner else None
    if isinstance(op, AdvancedSubtensor | AdvancedSubtensor1) and len(expr.owner.inputs) == 2:
        base, idx = (strip(v) for v in expr.owner.inputs)
        return _indexed(base, graph, items, inverse) if idx is graph.label_rv else None
    if isinstance(op, Subtensor) and k is not None and len(expr.owner.inputs) == 2:
        base = strip(expr.owner.inputs[0])
        if base in params and base.ndim == 1:
            j = int(constant_fold([expr.owner.inputs[1]])[0])
            return ((base, j % shape_of(base)[0]),), inverse, ("k",)
        return None
    return _direct(expr, graph, k, items, inverse) if expr in params else None


def _per_observation(value: np.ndarray, graph: MixtureGraph) -> bool:
    """A constant with the observation axis (label models put components on the label's
    index, Mixtures on the last axis)."""
    n = graph.n_rows
    if value.ndim == 0 or value.shape[0] != n or n == 1:
        return False
    return graph.kind == "label" or value.ndim >= 2


def normalise(value, graph: MixtureGraph):
    """A known parameter as a (K,) array per component, or a :class:`DataRef`; None if
    it is neither (it varies along an item axis, say)."""
    if isinstance(value, DataRef) or _per_observation(value, graph):
        return value if isinstance(value, DataRef) else DataRef(None, value)
    k = graph.n_components
    flat = np.asarray(value, dtype=float)
    if flat.size not in (1, k):
        return None
    return np.broadcast_to(flat.reshape(-1) if flat.size == k else flat.reshape(()), (k,))
