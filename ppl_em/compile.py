"""Compile the E-step, the Q function and the parameter transforms, once per model.

Parameters live in one flat float64 vector ``u`` over the unconstrained value
variables (the space ``pm.find_MAP`` optimises in). Observed data are inputs of the
compiled functions, not constants baked into them, so fitting a new dataset of the
same shape reuses the compiled code; the arrays to pass are in ``EMFunctions.data``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytensor.tensor as pt
from pymc.pytensorf import compile as pymc_compile
from pytensor.graph.replace import graph_replace
from pytensor.tensor import TensorConstant, TensorVariable

from ppl_em.estep import objective_graphs
from ppl_em.graph import MixtureGraph, observed_data

MODES = ("map", "mle")


class FlatLayout(NamedTuple):
    """Where each parameter's unconstrained values sit in the flat vector ``u``."""

    rv_names: tuple[str, ...]
    value_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[slice, ...]
    size: int

    def unflatten(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """Value-variable name -> unconstrained array."""
        return {
            n: u[s].reshape(shape)
            for n, s, shape in zip(self.value_names, self.slices, self.shapes, strict=True)
        }


class EMFunctions(NamedTuple):
    """Compiled building blocks of one model's EM; every callable takes ``*data`` last.

    - ``estep(u, *data) -> (log_resp[N, K], loglik, logprior)``
    - ``joint(u, *data) -> L[N, K]`` with ``L[i, k] = log p(x_i, z_i=k | theta)``
    - ``q_and_grad(u, gamma, *data) -> (Q, dQ/du)`` for the chosen ``mode``
    - ``constrain(u) -> [param values]`` in the order of ``layout.rv_names``
    - ``unconstrain(u, *params) -> [unconstrained values]``; ``u`` supplies the values
      of parameters that other transforms depend on.
    """

    graph: MixtureGraph
    mode: str
    layout: FlatLayout
    data_names: tuple[str, ...]
    data: tuple[np.ndarray, ...]
    estep: Callable
    joint: Callable
    q_and_grad: Callable
    constrain: Callable
    unconstrain: Callable


def _layout(graph: MixtureGraph) -> FlatLayout:
    point = graph.model.initial_point()
    value_names, shapes, slices, start = [], [], [], 0
    for rv in graph.params:
        name = graph.value_var(rv).name
        shape = tuple(np.shape(point[name]))
        size = int(np.prod(shape))
        value_names.append(name)
        shapes.append(shape)
        slices.append(slice(start, start + size))
        start += size
    return FlatLayout(
        rv_names=graph.param_names,
        value_names=tuple(value_names),
        shapes=tuple(shapes),
        slices=tuple(slices),
        size=start,
    )


def _data_inputs(graph: MixtureGraph) -> tuple[dict, list, tuple[str, ...], tuple]:
    """Swap each observed constant for a symbolic input of the same static type."""
    replace, inputs, names, arrays = {}, [], [], []
    for rv in graph.model.observed_RVs:
        value = graph.model.rvs_to_values[rv]
        if isinstance(value, TensorConstant):
            sym = value.type(name=f"{rv.name}_data")
            replace[value] = sym
            inputs.append(sym)
            names.append(rv.name)
            arrays.append(observed_data(graph.model, rv))
    return replace, inputs, tuple(names), tuple(arrays)


def _flat_replacements(graph: MixtureGraph, layout: FlatLayout, flat: TensorVariable) -> dict:
    return {
        graph.value_var(rv): flat[s].reshape(shape).astype(graph.value_var(rv).dtype)
        for rv, s, shape in zip(graph.params, layout.slices, layout.shapes, strict=True)
    }


def _transform_graphs(graph: MixtureGraph, flat_replace: dict) -> tuple[list, list, list]:
    model = graph.model
    constrained = model.replace_rvs_by_values(list(graph.params))
    inputs, forward = [], []
    for rv in graph.params:
        sym = rv.type(name=f"{rv.name}_constrained")
        inputs.append(sym)
        transform = model.rvs_to_transforms.get(rv)
        if transform is None:
            forward.append(sym)
        else:
            (fwd,) = model.replace_rvs_by_values([transform.forward(sym, *rv.owner.inputs)])
            forward.append(fwd)
    constrained = graph_replace(constrained, flat_replace, strict=False)
    forward = graph_replace(forward, flat_replace, strict=False)
    return constrained, inputs, forward


def build_em_functions(graph: MixtureGraph, mode: str = "map") -> EMFunctions:
    """Compile everything one EM fit of ``graph`` needs (the slow, once-per-model part)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}: 'map' adds the log prior.")
    layout = _layout(graph)
    flat = pt.vector("u", dtype="float64")
    gamma = pt.matrix("gamma", dtype="float64")
    data_replace, data_inputs, data_names, data = _data_inputs(graph)
    replace = {**_flat_replacements(graph, layout, flat), **data_replace}

    pieces = objective_graphs(graph)
    joint, extra, logprior = graph_replace(list(pieces), replace, strict=False)
    row_ll = pt.logsumexp(joint, axis=1, keepdims=True)
    log_resp = joint - row_ll
    loglik = pt.sum(row_ll) + extra
    # 0 * -inf is NaN: a component with zero responsibility contributes nothing.
    expected = pt.sum(pt.switch(pt.gt(gamma, 0), gamma * joint, 0.0)) + extra
    q = expected + logprior if mode == "map" else expected

    constrained, param_inputs, forward = _transform_graphs(graph, replace)

    def fn(inputs, outputs):
        return pymc_compile(inputs, outputs, on_unused_input="ignore")

    return EMFunctions(
        graph=graph,
        mode=mode,
        layout=layout,
        data_names=data_names,
        data=data,
        estep=fn([flat, *data_inputs], [log_resp, loglik, logprior]),
        joint=fn([flat, *data_inputs], joint),
        q_and_grad=fn([flat, gamma, *data_inputs], [q, pt.grad(q, flat)]),
        constrain=fn([flat], constrained),
        unconstrain=fn([flat, *param_inputs], forward),
    )
