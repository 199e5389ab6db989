"""The flat parameter vector ``u``: where each free variable's unconstrained values sit,
and the graphs that map between ``u`` and the constrained values."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from pytensor.graph.replace import graph_replace
from pytensor.tensor import TensorVariable

from ppl_em.model.graph import MixtureGraph


class FlatLayout(NamedTuple):
    """Where each parameter's unconstrained values sit in the flat vector ``u``."""

    rv_names: tuple[str, ...]
    value_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[slice, ...]
    size: int

    def mask(self, names) -> np.ndarray:
        """Boolean mask of the entries of ``u`` that belong to the variables ``names``."""
        out = np.zeros(self.size, dtype=bool)
        for name, sl in zip(self.rv_names, self.slices, strict=True):
            out[sl] = name in names
        return out


def element_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """``name`` for a scalar, else ``name[i, j]`` per element in C order (ArviZ's labels)."""
    if not shape:
        return [name]
    return [f"{name}[{', '.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def flat_layout(graph: MixtureGraph) -> FlatLayout:
    values = [graph.value_var(rv) for rv in graph.params]
    # Static shapes when PyMC knows them: model.initial_point() compiles a function.
    static = all(None not in v.type.shape for v in values)
    point = None if static else graph.model.initial_point()
    value_names, shapes, slices, start = [], [], [], 0
    for value in values:
        name = value.name
        shape = tuple(value.type.shape) if static else tuple(np.shape(point[name]))
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


def flat_replacements(graph: MixtureGraph, layout: FlatLayout, flat: TensorVariable) -> dict:
    """Each value variable as its slice of the symbolic flat vector ``flat``."""
    return {
        graph.value_var(rv): flat[s].reshape(shape).astype(graph.value_var(rv).dtype)
        for rv, s, shape in zip(graph.params, layout.slices, layout.shapes, strict=True)
    }


def transform_graphs(graph: MixtureGraph, flat_replace: dict) -> tuple[list, list, list]:
    """``(constrained values of u, symbolic constrained inputs, their forward transforms)``."""
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
