"""Which arrays of a model are data, and the symbolic inputs that stand for them.

EM's work is a sum over observations, so everything it compiles takes the arrays that
have one row per observation as inputs whose first axis has no fixed length: the
observed values of the label's dependents and every constant or ``pm.Data`` array in
their graphs (and the label's) whose first axis is the observation axis (covariates,
per-observation trials or known scales). Any run of rows of all of them together is a
*chunk*, and an E-step over a chunk is exact for those rows. The observed values of
variables that do not depend on the label are data too, but of their own length: they
are inputs that are never cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytensor.tensor as pt
from pytensor.compile.sharedvalue import SharedVariable
from pytensor.graph.basic import Variable
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorConstant, TensorType, TensorVariable
from pytensor.tensor.random.op import RandomVariable

from ppl_em.model.graph import MixtureGraph


@dataclass(frozen=True)
class DataSpec:
    """The model's data as inputs.

    ``names``/``leaves``/``inputs`` are the per-observation arrays: the dependents'
    observed values first (named after their variables), then covariates (``pm.Data``
    by their own name, plain arrays as ``<dependent>_const<i>``). ``fixed_*`` are the
    observed values of variables that do not depend on the label. ``chunkable`` is False
    when N does not tell observations from components (N <= K): then only the observed
    values are inputs and the data must be used whole.
    """

    names: tuple[str, ...]
    leaves: tuple[Variable, ...]
    inputs: tuple[TensorVariable, ...]
    observed: tuple[str, ...]
    fixed_names: tuple[str, ...]
    fixed_leaves: tuple[Variable, ...]
    fixed_inputs: tuple[TensorVariable, ...]
    chunkable: bool
    origins: tuple[str, ...] = ()
    masks: tuple[tuple[str, str], ...] = ()

    def mask_input(self, observed: str) -> TensorVariable | None:
        """The input saying which entries of ``observed`` were observed, if any are not."""
        name = dict(self.masks).get(observed)
        return None if name is None else self.inputs[self.names.index(name)]

    def describe(self, name: str) -> str:
        """How an error names the array ``name``."""
        if name in self.observed or name in self.fixed_names:
            return f"observed data {name!r}"
        owner = dict(zip(self.names, self.origins, strict=True)).get(name)
        if owner:
            return f"covariate {name!r} (an unnamed array in the parameters of {owner!r})"
        return f"covariate {name!r}"

    @property
    def n(self) -> TensorVariable:
        """The number of observations of a chunk, read off the first observed input."""
        return self.inputs[0].shape[0]

    @property
    def replace(self) -> dict:
        return dict(zip(self.leaves, self.inputs, strict=True))

    @property
    def fixed_replace(self) -> dict:
        return dict(zip(self.fixed_leaves, self.fixed_inputs, strict=True))


def leaf_value(leaf: Variable) -> np.ndarray:
    """The array behind a constant or a shared variable."""
    return np.asarray(leaf.data if isinstance(leaf, TensorConstant) else leaf.get_value())


def _is_array_leaf(var: Variable) -> bool:
    tensor = isinstance(var.type, TensorType)
    return tensor and var.ndim >= 1 and isinstance(var, TensorConstant | SharedVariable)


def _size_inputs(outputs: list, blockers: list) -> set:
    """Size arguments of the random variables between ``blockers`` and ``outputs``:
    their first entry can equal N without being data."""
    sizes = set()
    for var in ancestors(outputs, blockers=blockers):
        if var.owner is not None and isinstance(var.owner.op, RandomVariable):
            sizes.add(var.owner.inputs[1])
    return sizes


def _sources(graph: MixtureGraph) -> list[tuple[str, list]]:
    """(owner name, graphs to search for covariates) per dependent, and the label's."""
    if graph.kind == "mixture":
        (mix,) = graph.dependents
        return [(mix.name, [mix])]
    found = [(d.name, [d]) for d in graph.dependents]
    found.append((graph.label_name, list(graph.label_rv.owner.inputs[2:])))
    return found


def _covariates(graph: MixtureGraph, observed: set) -> list[tuple[str, Variable, str]]:
    """Array leaves whose first axis has length N, each with a name and (for plain
    arrays, which have none) the variable in whose parameters it was found."""
    model, n = graph.model, graph.n_rows
    blockers = [rv for rv in model.basic_RVs if rv not in graph.dependents]
    out, seen = [], set(observed)
    for owner, roots in _sources(graph):
        sizes = _size_inputs(roots, blockers)
        count = 0
        for var in ancestors(roots, blockers=blockers):
            if var in seen or var in sizes or not _is_array_leaf(var):
                continue
            if leaf_value(var).shape[0] != n:
                continue
            seen.add(var)
            name = var.name if isinstance(var, SharedVariable) and var.name else None
            out.append((name or f"{owner}_const{count}", var, "" if name else owner))
            count += name is None
    return out


def _dynamic_input(leaf: Variable, name: str) -> TensorVariable:
    """A symbolic stand-in for ``leaf`` whose first axis may have any length."""
    shape = (None, *leaf.type.shape[1:])
    return TensorType(leaf.type.dtype, shape=shape)(name=name)


def data_spec(graph: MixtureGraph) -> DataSpec:
    """Find the model's data: see the module docstring."""
    model = graph.model
    observed = [(rv.name, model.rvs_to_values[rv], "") for rv in graph.dependents]
    masks = [(name, f"{name}_observed_mask") for name, _ in graph.observed_masks]
    observed += [(mask, pt.constant(graph.observed_mask(name), name=mask), "")
                 for name, mask in masks]  # fmt: skip
    chunkable = graph.n_rows > max(1, graph.n_components)
    found = observed + (_covariates(graph, {v for _, v, _ in observed}) if chunkable else [])
    names = [name for name, _, _ in found]
    if len(set(names)) != len(names):
        raise ValueError(f"data names {names} repeat; give each pm.Data its own name.")
    fixed = [(rv.name, model.rvs_to_values[rv]) for rv in graph.other_observed]
    return DataSpec(
        names=tuple(names),
        leaves=tuple(leaf for _, leaf, _ in found),
        inputs=tuple(_dynamic_input(leaf, name) for name, leaf, _ in found),
        observed=tuple(rv.name for rv in graph.dependents),
        fixed_names=tuple(name for name, _ in fixed),
        fixed_leaves=tuple(leaf for _, leaf in fixed),
        fixed_inputs=tuple(leaf.type(name=name) for name, leaf in fixed),
        chunkable=chunkable,
        origins=tuple(origin for _, _, origin in found),
        masks=tuple(masks),
    )


def data_arrays(spec: DataSpec) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The current values of the per-observation and the fixed data."""
    return (
        tuple(leaf_value(leaf) for leaf in spec.leaves),
        tuple(leaf_value(leaf) for leaf in spec.fixed_leaves),
    )
