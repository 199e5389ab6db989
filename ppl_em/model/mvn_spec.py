"""Find MvNormal components with a full covariance each (the closed-form MvNormal block).

Q's MvNormal part depends on the free variables only through each component's mean
``mu_k`` and covariance ``Sigma_k``; with constant-density priors (or ``mode="mle"``)
it is maximised by the responsibility-weighted mean and covariance, the update of
scikit-learn's ``covariance_type="full"``. Users write covariances in many ways
(``pm.LKJCholeskyCov`` factors, standard deviations and correlations, free Cholesky
entries), so rather than recognise each, this module finds ``(mu_k, Sigma_k)`` as graphs
of the free variables; :mod:`ppl_em.steps.mvn_solve` maps the weighted moments back to
those variables on the compiled map. The map is one-to-one when the free values number
exactly ``K (D + D(D+1)/2)``, which is checked here by counting.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytensor
import pytensor.tensor as pt
from pymc.distributions.continuous import FlatRV, HalfFlatRV
from pytensor.graph.basic import equal_computations
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorVariable
from pytensor.tensor.basic import Join
from pytensor.tensor.blockwise import Blockwise
from pytensor.tensor.elemwise import DimShuffle
from pytensor.tensor.math import Dot
from pytensor.tensor.random.basic import MvNormalRV, UniformRV

from ppl_em.model.graph import MixtureGraph, direct_users


class MvnSpec(NamedTuple):
    """An MvNormal block: ``mu`` (K, D) and ``cov`` (K, D, D) as graphs of the value
    variables of ``rvs``; ``tied`` when one covariance is shared by the components
    (then the M-step's target is the pooled covariance); ``missing`` when its data have
    missing coordinates (then the target is Little and Rubin's, from conditional
    moments); ``factor`` (K, D, D) when the model builds each covariance as
    ``L @ L.mT`` (PyMC's ``MvNormal(chol=...)``), as a graph of the same variables."""

    data_name: str
    rvs: tuple[TensorVariable, ...]
    mu: TensorVariable
    cov: TensorVariable
    reg_covar: float = 0.0
    tied: bool = False
    missing: bool = False
    factor: TensorVariable | None = None


def _label_params(graph: MixtureGraph, dist: TensorVariable):
    """The dependent's (mu, cov) with the label replaced by its domain 0..K-1."""
    (mu, cov) = graph.model.replace_rvs_by_values(dist.owner.op.dist_params(dist.owner))
    label = graph.value_var(graph.label_rv)
    domain = pt.arange(graph.n_components, dtype=label.dtype)
    # Not graph_replace: the label has static shape (N,), its domain (K,). The value
    # variables are graph inputs, so the rebuilt graph still refers to the same ones.
    return pytensor.clone_replace([mu, cov], {label: domain}, rebuild_strict=False)


def _drop_unit_batch(var: TensorVariable, core_ndim: int) -> TensorVariable:
    """Drop batch axes of static length 1 (``pm.Mixture`` aligns components that way)."""
    batch = var.type.shape[: var.ndim - core_ndim]
    keep = [i for i, n in enumerate(batch) if n != 1] + list(range(len(batch), var.ndim))
    return (
        var.squeeze(axis=[i for i in range(var.ndim) if i not in keep])
        if len(keep) < var.ndim
        else var
    )


def _mixture_params(comps: list[TensorVariable]):
    params = [
        (_drop_unit_batch(m, 1), _drop_unit_batch(c, 2))
        for m, c in (comp.owner.op.dist_params(comp.owner) for comp in comps)
    ]
    if len(params) == 1:
        return params[0]
    return pt.stack([m for m, _ in params]), pt.stack([c for _, c in params])


def _in_terms_of_values(graph: MixtureGraph, mu, cov):
    return tuple(graph.model.replace_rvs_by_values([mu, cov]))


def _block_params(graph: MixtureGraph, dist: TensorVariable | None):
    """``(mu, cov, data_name)`` per component, ``(rvs, reason)`` if the parameters are not
    one per component, or None if the family is not MvNormal."""
    if graph.kind == "label":
        dists, name = [dist], dist.name
    else:
        mix = graph.dependents[0]
        dists, name = list(mix.owner.inputs[2:]), mix.name
    if not all(isinstance(d.owner.op, MvNormalRV) for d in dists):
        return None
    rvs = [p for p in graph.params if p in ancestors([i for d in dists for i in d.owner.inputs])]
    try:
        if graph.kind == "label":
            mu, cov = _label_params(graph, dist)
        else:
            mu, cov = _in_terms_of_values(graph, *_mixture_params(dists))
    except Exception as err:  # a graph that does not rebuild over the domain
        return rvs, f"its MvNormal parameters are not one per component ({err})"
    k, d = graph.n_components, mu.type.shape[-1]
    if cov.type.shape in ((d, d), (1, d, d)):  # one covariance for every component (tied)
        cov = pt.broadcast_to(cov.reshape((d, d)), (k, d, d))
    if mu.type.shape != (k, d) or cov.type.shape != (k, d, d):
        return rvs, (
            f"its MvNormal mean and covariance have shapes {mu.type.shape} and "
            f"{cov.type.shape}, not one ({d},) mean and ({d}, {d}) covariance per component"
        )
    return mu, cov, name


def _is_transpose_of(var: TensorVariable, base: TensorVariable) -> bool:
    """``var`` is ``base.mT``: a DimShuffle swapping the last two axes of ``base`` (or of
    the same graph built twice, as ``chol[j] @ chol[j].T`` does)."""
    node = var.owner
    if node is None or not isinstance(node.op, DimShuffle):
        return False
    if not equal_computations([node.inputs[0]], [base]):
        return False
    nd = base.ndim
    return tuple(node.op.new_order) == (*range(nd - 2), nd - 1, nd - 2)


def _factor(cov: TensorVariable) -> TensorVariable | None:
    """``L`` with ``cov = L @ L.mT`` read off the graph (through the stacking of
    components and axes added or dropped in front), or None. Nothing here says ``L``
    is a Cholesky factor: the M-step checks that its solve reproduces the covariance."""
    node = cov.owner
    if node is None:
        return None
    op = node.op
    if isinstance(op, Blockwise) and isinstance(op.core_op, Dot):
        a, b = node.inputs
        return a if _is_transpose_of(b, a) else None
    if isinstance(op, Join):
        parts = [_factor(p) for p in node.inputs[1:]]
        return None if any(p is None for p in parts) else pt.join(node.inputs[0], *parts)
    if isinstance(op, DimShuffle) and cov.ndim >= 2:
        nd = node.inputs[0].ndim
        keeps_core = tuple(op.new_order[-2:]) == (nd - 2, nd - 1)
        inner = _factor(node.inputs[0]) if keeps_core and nd >= 2 else None
        return None if inner is None else op(inner)
    return None


def _constant_density(rv: TensorVariable) -> bool:
    return isinstance(rv.owner.op, FlatRV | HalfFlatRV | UniformRV)


def _size(rvs) -> int:
    return sum(int(np.prod(r.type.shape)) if r.ndim else 1 for r in rvs)


def _tied(graph: MixtureGraph, cov, d: int) -> bool:
    """One covariance for all components: it reads D(D+1)/2 free values in all. (The
    means' graph may read them too: PyMC broadcasts the mean against the covariance.)"""
    cov_rvs = {p for p in graph.params if graph.value_var(p) in set(ancestors([cov]))}
    return _size(cov_rvs) == d * (d + 1) // 2


def _owned_reason(graph, rvs, owners, weights, mode, shape, tied) -> str | None:
    k, d = shape
    size = _size(rvs)
    needed = k * d + d * (d + 1) // 2 if tied else k * (d + d * (d + 1) // 2)
    if size != needed:
        what = "one tied covariance" if tied else "full covariances"
        return (
            f"its {size} free values do not map one-to-one onto {k} means and {what} "
            f"({needed} values)"
        )
    if set(rvs) & set(ancestors([weights])):
        return "it also enters the mixture weights"
    # In mode="mle" the priors and potentials are not part of Q; other observed
    # variables always are.
    allowed = set(owners) | ({"potential", *graph.params} if mode == "mle" else set())
    if any(direct_users(graph, r) - allowed for r in rvs):
        return "it also enters other parts of the model (a hyperprior, potential or variable)"
    if mode == "map" and not all(_constant_density(r) for r in rvs):
        return (
            "its prior is not flat, so the MvNormal mean and covariance have no closed "
            "form in mode='map' (use pm.Flat/HalfFlat/Uniform priors or mode='mle')"
        )
    return None


def mvn_specs(graph: MixtureGraph, mode: str) -> tuple[list[MvnSpec], dict[str, str]]:
    """The MvNormal blocks of ``graph`` and, for rejected ones, why (by variable)."""
    if graph.kind == "label":
        candidates = [(d, {d}) for d in graph.dependents]
        (weights,) = graph.label_rv.owner.op.dist_params(graph.label_rv.owner)
    else:
        candidates = [(None, {graph.dependents[0]})]
        weights = graph.dependents[0].owner.inputs[1]
    specs, reasons = [], {}
    for dist, owners in candidates:
        missing = any(graph.observed_mask(o.name) is not None for o in owners)
        found = _block_params(graph, dist)
        if found is None:
            continue
        if len(found) == 2:
            rvs, why = found
            reasons.update({r.name: why for r in rvs if r is not weights})
            continue
        mu, cov, name = found
        used = set(ancestors([mu, cov]))
        rvs = tuple(p for p in graph.params if graph.value_var(p) in used)
        tied = _tied(graph, cov, mu.type.shape[1])
        reason = _owned_reason(graph, rvs, owners, weights, mode, mu.type.shape, tied)
        if reason is None:
            factor = None if tied else _factor(cov)
            specs.append(MvnSpec(name, rvs, mu, cov, tied=tied, missing=missing, factor=factor))
        else:
            reasons.update({r.name: reason for r in rvs})
    return specs, reasons
