"""Observed variables with missing entries, as EM sees them.

PyMC turns NaN (or masked) entries of observed data into an imputation sub-model: a
free ``<x>_unobserved`` holding the missing entries, an observed ``<x>_observed`` over
the flattened observed entries, and a Deterministic ``<x>`` joining the two. That loses
the observation axis EM sums over, and it makes every missing entry a parameter. EM
integrates the missing entries out instead. Here the model is rebuilt with ``<x>``
observed whole: its missing entries are filled with an observed value of the same
column, so that every logp term is finite, and a mask records which entries were
observed. :mod:`ppl_em.model.joint` then drops the missing entries' factors, or for an
MvNormal takes the marginal over the observed coordinates.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pymc.distributions.distribution import PartialObservedRV
from pymc.model.fgraph import fgraph_from_model, model_from_fgraph, model_observed_rv
from pytensor.tensor import TensorConstant, TensorVariable
from pytensor.tensor.random.op import RandomVariable
from pytensor.tensor.subtensor import AdvancedIncSubtensor, AdvancedSubtensor

from ppl_em.errors import DataError, ModelStructureError

SUFFIX = "_unobserved"


def imputed_names(model: pm.Model) -> list[str]:
    """The variables PyMC split into an observed and an imputed part."""
    names = []
    for rv in model.free_RVs:
        base = rv.name[: -len(SUFFIX)] if rv.name.endswith(SUFFIX) else None
        if base and f"{base}_observed" in model.named_vars and base in model.named_vars:
            names.append(base)
    return names


def _observed_mask(joined: TensorVariable, name: str) -> np.ndarray:
    """True where ``name`` was observed: the index of the last ``set_subtensor`` of the
    Deterministic PyMC built, which writes the observed values."""
    node = joined.owner
    index = node.inputs[2] if node and isinstance(node.op, AdvancedIncSubtensor) else None
    if not isinstance(index, TensorConstant) or index.dtype != "bool":
        raise ModelStructureError(
            f"the missing entries of {name!r} are laid out in a way ppl_em cannot read "
            "back from PyMC's imputation graph; drop or fill them before building the model."
        )
    return np.asarray(index.data)


def _whole_rv(observed: TensorVariable, antimask: np.ndarray, shape, name: str):
    """The random variable of all of ``name``'s entries, before PyMC split it."""
    node = observed.owner
    if isinstance(node.op, PartialObservedRV):
        return node.inputs[0]
    if not isinstance(node.op, RandomVariable):
        raise ModelStructureError(f"cannot read back the distribution of {name!r}")
    rng, _, *params = node.inputs
    whole = []
    for param in params:
        # PyMC lifted ``x[observed]`` into each parameter as ``param[observed]``.
        inner = param.owner
        index = inner.inputs[1] if inner and isinstance(inner.op, AdvancedSubtensor) else None
        if isinstance(index, TensorConstant) and np.array_equal(index.data, antimask):
            whole.append(inner.inputs[0])
        elif all(length == 1 for length in param.type.shape):
            whole.append(param)  # shared by every entry: PyMC left it as it was
        else:
            raise ModelStructureError(
                f"cannot read back the parameters of {name!r} from PyMC's imputation "
                "graph; drop or fill its missing entries before building the model."
            )
    return node.op.make_node(rng, pt.as_tensor(np.asarray(shape, "int64")), *whole).default_output()


def _filled(values: np.ndarray, observed: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """The data with each missing entry set to a middle observed value of its column
    (same trailing index): inside the support, so its ignored logp stays finite."""
    full = np.zeros(observed.shape, dtype=dtype)
    full[observed] = values
    columns = full.reshape(len(full), -1)
    seen = observed.reshape(len(full), -1)
    for j in range(columns.shape[1]):
        kept = np.sort(columns[seen[:, j], j])
        if kept.size == 0:
            where = np.unravel_index(j, observed.shape[1:]) if observed.ndim > 1 else ()
            raise DataError(
                f"observed data of {name!r} are missing at every observation in column "
                f"{tuple(int(i) for i in where)}: nothing informs that column's parameters; "
                "drop the column from the data and the model."
            )
        columns[~seen[:, j], j] = kept[kept.size // 2]
    return full


def observed_whole(model: pm.Model) -> tuple[pm.Model, dict[str, np.ndarray]]:
    """``model`` with each imputed variable observed whole, and for each such variable
    the mask of its observed entries (True where observed). Without imputed variables,
    ``model`` itself and no masks."""
    names = imputed_names(model)
    if not names:
        return model, {}
    # PyMC's conversion refuses initial values; a shallow copy without them converts,
    # and the values are set again on the rebuilt model (the user's model is untouched).
    bare = object.__new__(type(model))  # copy.copy(model) would clone it through fgraph
    bare.__dict__.update(model.__dict__)
    bare.rvs_to_initial_values = dict.fromkeys(model.rvs_to_initial_values)
    fgraph, _ = fgraph_from_model(bare)
    by_name = {out.name: out for out in fgraph.outputs}
    masks, drop = {}, []
    for name in names:
        det = by_name[name]
        joined, *dims = det.owner.inputs
        antimask = _observed_mask(joined, name)
        observed, value = by_name[f"{name}_observed"].owner.inputs[:2]
        shape = tuple(int(s) for s in joined.type.shape)
        if antimask.shape != shape:
            raise DataError(
                f"observed data of {name!r} miss whole multivariate values; give each "
                "observation at least one observed coordinate, or drop those observations."
            )
        rv = _whole_rv(observed, antimask, shape, name)
        data = _filled(np.asarray(value.data), antimask, rv.dtype, name)
        whole = model_observed_rv(rv, pt.constant(data, name=name), *dims)
        whole.name = name
        fgraph.replace(det, whole, import_missing=True)
        masks[name] = antimask
        drop += [by_name[f"{name}_observed"], by_name[f"{name}{SUFFIX}"]]
    for out in drop:
        fgraph.remove_output(fgraph.outputs.index(out))
    whole = model_from_fgraph(fgraph, mutate_fgraph=True)
    order = {rv.name: i for i, rv in enumerate(model.free_RVs)}
    whole.free_RVs.sort(key=lambda rv: order[rv.name])
    for rv, value in model.rvs_to_initial_values.items():
        if value is not None and rv.name in whole.named_vars:
            whole.set_initval(whole[rv.name], value)
    return whole, masks
