"""Terms of the rows that depend on the data alone, computed once per chunk.

PyMC's logps carry normalising terms of the data: a Poisson's or a negative binomial's
``log y!`` (``gammaln(y + 1)``), a binomial's log coefficient, a Gamma's or a
LogNormal's ``log x``. EM evaluates the rows at every E-step on the same chunks, and
compiled code recomputes those terms at each call: on a Poisson regression at N=10^5
they were a third to a half of the E-step (benchmarks/README.md).

:func:`hoist_data_terms` makes the largest subgraphs of the rows that depend only on the
chunk's arrays (and constants) and do some arithmetic into inputs of the compiled
functions; :class:`DataTerms` computes them with one compiled function per chunk and
keeps them as long as the chunk's arrays live. Only chunks whose arrays cannot change
are kept (read-only, down to an array that owns its memory: the data ``EMFunctions``
hold and their slices); a chunk that could (an array a source may read the next chunk
into) has its terms computed at each call, so a term is never stale.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np
from pytensor.graph.basic import Constant, Variable, equal_computations
from pytensor.graph.replace import clone_replace
from pytensor.scalar import Cast, Identity, Switch
from pytensor.scalar.basic import BinaryBitOp, LogicalComparison, UnaryBitOp
from pytensor.tensor.elemwise import Elemwise

from ppl_em.compiled.rewrites import fgraph_copy

# Elementwise work too cheap to hoist alone. A data-only comparison also stays in the
# graph: hoisted, a truncated component's support test (``x > upper`` as an input)
# left its rows' gradient NaN in C.
_CHEAP = (Cast, Identity, Switch, LogicalComparison, BinaryBitOp, UnaryBitOp)


def _computes(node) -> bool:
    """An elementwise node that does arithmetic (not a cast, a copy, a test or a choice)."""
    return isinstance(node.op, Elemwise) and not isinstance(node.op.scalar_op, _CHEAP)


def _data_only(fg, data: set) -> tuple[set, set]:
    """The variables that depend on ``data`` and constants alone (``only``), and those
    of them whose graph does arithmetic (``worth``)."""
    only, static, worth = {v for v in fg.inputs if v in data}, set(), set()
    for node in fg.toposort():
        ins = node.inputs
        if all(isinstance(v, Constant) or v in static for v in ins):
            static.update(node.outputs)
        elif all(isinstance(v, Constant) or v in static or v in only for v in ins):
            only.update(node.outputs)
            if _computes(node) or any(v in worth for v in ins):
                worth.update(node.outputs)
    return only, worth


def hoist_data_terms(
    outputs: list[Variable], data_inputs: list[Variable]
) -> tuple[list[Variable], list[Variable], list[Variable]]:
    """``(outputs', term_inputs, term_graphs)``: ``outputs`` with each largest
    data-only subgraph that does arithmetic (and has at least one axis) replaced by a
    new input; ``term_graphs`` compute those inputs from ``data_inputs``. Identical
    subgraphs (the same term in each component's row) become one input. (The rest of
    the graph is left as it is: merging all its identical subgraphs before the
    gradient is taken left a truncated mixture's gradient NaN.)"""
    fg = fgraph_copy(outputs)
    only, worth = _data_only(fg, set(data_inputs))
    hoisted = []
    for node in fg.toposort():
        for var in node.inputs:
            takes = var in worth and var.ndim >= 1 and var not in hoisted
            if takes and not all(out in only for out in node.outputs):
                hoisted.append(var)
    # Copies: a term can also feed a larger term, whose graph the replacement would
    # otherwise make read the smaller one's input.
    graphs, terms, firsts = [], [], []
    for var, graph in zip(hoisted, clone_replace(hoisted, {}), strict=True):
        same = [i for i, first in enumerate(firsts) if equal_computations([var], [first])]
        if same:
            fg.replace(var, terms[same[0]], import_missing=True)
            continue
        terms.append(var.type(name=f"data_term_{len(terms)}"))
        graphs.append(graph)
        firsts.append(var)
        fg.replace(var, terms[-1], import_missing=True)
    return list(fg.outputs), terms, graphs


def _fixed(array) -> bool:
    """An array whose values cannot change: read-only down to the array owning its memory."""
    while isinstance(array, np.ndarray):
        if array.flags.writeable:
            return False
        if array.base is None:
            return True
        array = array.base
    return False


class DataTerms:
    """The hoisted terms of a chunk: ``of(arrays)`` computes them with ``compute``
    (called as ``compute(*arrays)``), once per chunk of arrays that cannot change."""

    def __init__(self, compute: Callable) -> None:
        self._compute = compute
        self._kept: dict[tuple[int, ...], tuple] = {}
        self._lock = threading.RLock()

    def _forget(self, key: tuple[int, ...]) -> Callable:
        def forget(_ref) -> None:
            with self._lock:
                self._kept.pop(key, None)

        return forget

    def _computed(self, arrays: tuple) -> tuple[np.ndarray, ...]:
        # A term that is a view of a chunk's array would keep the array alive, and with
        # it the entry that a dead array removes: copy it.
        out = []
        for value in self._compute(*arrays):
            value = np.array(value, copy=value.base is not None)
            value.flags.writeable = False
            out.append(value)
        return tuple(out)

    def of(self, arrays: tuple) -> tuple[np.ndarray, ...]:
        if not all(_fixed(a) for a in arrays):
            return self._computed(arrays)
        key = tuple(map(id, arrays))
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and all(r() is a for r, a in zip(kept[0], arrays, strict=True)):
                return kept[1]
            values = self._computed(arrays)
            refs = tuple(weakref.ref(a, self._forget(key)) for a in arrays)
            self._kept[key] = (refs, values)
            return values
