"""Symbolic graphs of the EM objective, built from the model's own logp.

The central objects are the K rows ``L[:, k] = log p(x_i, z_i = k | theta)`` of the
N x K joint, one graph per component, over a chunk of observations of any length (the
data are the inputs of :mod:`ppl_em.model.data`). For an explicit label, row k is the
model's joint logp of the label and its observed dependents with the label's value set
to k; for a ``pm.Mixture`` it is ``log w_k + log p_k(x_i)``, the summand of PyMC's
``mixture_logprob``. Every graph is written in terms of the model's value variables
(unconstrained where the variable has a transform) and the data inputs.

Each dependent is redrawn from its parameters written in value variables (so that no
free random variable is left for PyMC's logp derivation to copy), with the label's
value set to k and its data replaced by the inputs, resized to the chunk
(``change_dist_size``), and its logp taken at the data input: that keeps censored,
truncated and other derived distributions right, whose logp PyMC derives on a copy of
the graph.
"""

from __future__ import annotations

import pytensor
import pytensor.tensor as pt
from pymc.distributions.shape_utils import change_dist_size
from pymc.logprob.basic import logp as rv_logp
from pytensor.graph.replace import graph_replace
from pytensor.tensor import TensorVariable

from ppl_em.errors import ModelStructureError
from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph
from ppl_em.model.masked import masked_logp


def _sum_after(term: TensorVariable, keep: int) -> TensorVariable:
    """Sum every axis after the first ``keep``: several values per observation share
    one label."""
    if term.ndim > keep:
        term = term.sum(axis=tuple(range(keep, term.ndim)))
    return term


def _in_values(graph: MixtureGraph, rv: TensorVariable) -> TensorVariable:
    """``rv`` redrawn from its inputs written in the model's value variables."""
    node = rv.owner
    inputs = graph.model.replace_rvs_by_values(list(node.inputs))
    return node.clone_with_new_inputs(inputs).outputs[node.outputs.index(rv)]


def _logp_at(rv: TensorVariable, value: TensorVariable) -> TensorVariable:
    """The logp of a random variable whose inputs are value variables and data."""
    return rv_logp(rv, value, warn_rvs=False)


def _resized(rv: TensorVariable, value: TensorVariable, k: int | None = None):
    """``rv`` with the batch shape of ``value`` (any length; with ``k``, the last batch
    axis has length k: a batched Mixture component); as it is if PyMC cannot resize
    it (the compiled graph then takes the whole data only)."""
    support = getattr(rv.owner.op, "ndim_supp", 0)
    batch = [value.shape[i] for i in range(value.ndim - support)]
    if k is not None:
        batch[-1] = k
    try:
        return change_dist_size(rv, new_size=tuple(batch), expand=False)
    except NotImplementedError:
        return rv


def _observed_logp(rv: TensorVariable, value, observed) -> TensorVariable:
    """The logp of ``rv`` at ``value`` over its observed entries (all without a mask)."""
    term = _logp_at(rv, value)
    return term if observed is None else masked_logp(rv, value, observed, term)


def _dependent_term(graph, data: DataSpec, dep, label_value) -> TensorVariable:
    """The logp of one dependent over a chunk, with the label's value ``label_value``."""
    value = data.inputs[data.names.index(dep.name)]
    replace = {graph.value_var(graph.label_rv): label_value, **data.replace}
    copy = pytensor.clone_replace(_in_values(graph, dep), replace, rebuild_strict=False)
    term = _observed_logp(_resized(copy, value), value, data.mask_input(dep.name))
    return _sum_after(term, 1)


def _shared_label_term(graph: MixtureGraph, j: int) -> TensorVariable | None:
    """``log p(z = j)`` as a scalar when the label's probabilities are shared by all
    observations (drawn with size 1, so the value has static length 1), else None."""
    rv = _in_values(graph, graph.label_rv)
    rng, _, *params = rv.owner.inputs
    batched = [
        param.type.shape[: param.ndim - core]
        for param, core in zip(params, rv.owner.op.ndims_params, strict=True)
    ]
    if any(d != 1 for shape in batched for d in shape):
        return None
    small = rv.owner.op.make_node(rng, pt.as_tensor([1]), *params).default_output()
    term = _logp_at(small, pt.full((1,), j, dtype=rv.dtype))
    # A scalar: as a length-1 vector PyTensor's rewrites of one row compiled on its own
    # dropped its static length and failed at run time ("Runtime broadcasting").
    return term[0] if term.type.shape == (1,) else None


def shared_label_terms(graph: MixtureGraph) -> TensorVariable | None:
    """The K terms ``log p(z = k)`` as a vector of the value variables, where the
    label's probabilities are shared by all observations (the rows' term that does not
    depend on the observation), else None."""
    k = graph.n_components
    if graph.kind == "label":
        terms = [_shared_label_term(graph, j) for j in range(k)]
        return None if any(t is None for t in terms) else pt.stack(terms)
    weights = _mixture_weights(graph)
    return pt.log(weights) if weights.type.shape == (k,) else None


def _mixture_weights(graph: MixtureGraph) -> TensorVariable:
    """A ``pm.Mixture``'s weights as a graph of the value variables."""
    (mix,) = graph.dependents
    return graph.model.replace_rvs_by_values([mix.owner.inputs[1]])[0]


def _label_term(graph: MixtureGraph, data: DataSpec, j: int) -> TensorVariable:
    shared = _shared_label_term(graph, j)
    if shared is not None:
        return shared
    # Per-observation label probabilities (a gate on covariates): over the chunk.
    label = _in_values(graph, graph.label_rv)
    rv = pytensor.clone_replace(label, data.replace, rebuild_strict=False)
    value = pt.full((data.n,), j, dtype=rv.dtype)
    return _logp_at(_resized(rv, value), value)


def _label_row(graph, data: DataSpec, j: int, broadcast: bool) -> TensorVariable:
    """Row j. With ``broadcast`` the label's value is the length-1 vector ``[j]``, so
    per-component parameters ``theta[z]`` have length 1 and broadcast over the chunk
    (faster than gathering N of them); otherwise the chunk-long ``[j, ..., j]``."""
    dtype = graph.label_rv.dtype
    label = pt.full((1,), j, dtype=dtype) if broadcast else pt.full((data.n,), j, dtype=dtype)
    terms = [_dependent_term(graph, data, dep, label) for dep in graph.dependents]
    row = _label_term(graph, data, j) + sum(terms)
    if row.ndim != 1:
        raise ValueError(f"row {j} has {row.ndim} dimensions")
    return pt.broadcast_to(row, (data.n,))


def label_rows(graph: MixtureGraph, data: DataSpec, broadcast: bool = True) -> list:
    """The K rows of an explicit-label model; ``broadcast=False`` builds every row over
    a chunk-long label value (also the fallback when some Op insists on the label's
    length)."""
    k = graph.n_components
    if broadcast:
        try:
            return [_label_row(graph, data, j, True) for j in range(k)]
        except Exception:  # an Op that insists on the label's own shape
            pass
    return [_label_row(graph, data, j, False) for j in range(k)]


def _split_component(component: TensorVariable, k: int) -> list[TensorVariable] | None:
    """The K components of a batched ``pm.Mixture`` component, each drawn on its own
    (size None: its shape follows the data), or None if a parameter's component axis
    cannot be found or the component is not a plain random variable."""
    op = component.owner.op
    if not hasattr(op, "ndims_params"):
        return None
    rng, _, *params = component.owner.inputs
    per_k = [[] for _ in range(k)]
    for param, core in zip(params, op.ndims_params, strict=True):
        axis = param.ndim - core - 1
        length = param.type.shape[axis] if axis >= 0 else 1
        if length not in (k, 1):
            return None
        for j in range(k):
            index = (slice(None),) * axis + (j if length == k else 0,)
            per_k[j].append(param[index] if axis >= 0 else param)
    return [op.make_node(rng, None, *ps).default_output() for ps in per_k]


def _component_logp(data: DataSpec, component, value, k=None, observed=None):
    copy = pytensor.clone_replace(component, data.replace, rebuild_strict=False)
    return _observed_logp(_resized(copy, value, k), value, observed)


def mixture_rows(graph: MixtureGraph, data: DataSpec) -> list[TensorVariable]:
    """``log w_k + log p_k(x_i)`` for a ``pm.Mixture``, one row per component: one
    contiguous pass over the observations per component is faster than one broadcast
    (N, K) pass (benchmarks/README.md). A Mixture over (N, J) data mixes each element
    on its own: its rows run over the N x J elements, row-major."""
    (mix,) = graph.dependents
    value = data.inputs[data.names.index(mix.name)]
    batch = [value.shape[i] for i in range(value.ndim - mix.owner.op.ndim_supp)]
    components = [_in_values(graph, c) for c in mix.owner.inputs[2:]]
    k = graph.n_components
    if len(components) == 1:
        components = _split_component(components[0], k) or components
    log_w = pt.log(graph_replace(_mixture_weights(graph), data.replace, strict=False))
    observed = data.mask_input(mix.name)
    if len(components) == k:
        rows = [log_w[..., j] + _component_logp(data, c, value, observed=observed)
                for j, c in enumerate(components)]  # fmt: skip
        return [pt.broadcast_to(row, batch).reshape((-1,)) for row in rows]
    if observed is not None:
        raise ModelStructureError(
            f"the components of {mix.name!r} could not be split one per component, which "
            "ppl_em needs to integrate out its missing entries; drop or fill them."
        )
    (component,) = components
    mix_axis = -getattr(component.owner.op, "ndim_supp", 0) - 1
    batched = pt.expand_dims(value, mix_axis)
    joint = (log_w + _component_logp(data, component, batched, k)).reshape((-1, k))
    return [joint[:, j] for j in range(k)]


def joint_rows(graph: MixtureGraph, data: DataSpec, broadcast: bool = True) -> list:
    """The K rows of the joint, each a vector over a chunk, as float64."""
    rows = (
        label_rows(graph, data, broadcast) if graph.kind == "label" else mixture_rows(graph, data)
    )
    return [pt.cast(row, "float64") for row in rows]


def _total(terms: list[TensorVariable]) -> TensorVariable:
    return pt.sum([pt.sum(t) for t in terms]) if terms else pt.constant(0.0)


def fixed_terms(graph: MixtureGraph, data: DataSpec) -> tuple[TensorVariable, TensorVariable]:
    """``(extra, logprior)``: the logp of observed variables that do not depend on the
    label (over the fixed data inputs), and the log density of the free parameters and
    potentials without Jacobian terms (the find_MAP convention)."""
    model = graph.model
    extra = list(graph.other_observed)
    extra_terms = model.logp(vars=extra, sum=False, jacobian=False) if extra else []
    prior_terms = model.logp(vars=list(graph.params), sum=False, jacobian=False)
    prior_terms += model.replace_rvs_by_values(list(model.potentials))
    extra_total = graph_replace(_total(extra_terms), data.fixed_replace, strict=False)
    return pt.cast(extra_total, "float64"), pt.cast(_total(prior_terms), "float64")
