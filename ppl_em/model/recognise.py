"""Decide, from the graph, which parameters have a closed-form M-step.

A *block* is one component family (an observed dependent, the Mixture's components,
or the label's weights) whose per-component parameters are plain elements of free
variables: ``theta[z]``, ``1 / theta[z]``, a batched ``theta``, ``theta[k]``, or one
scalar variable per component. A block is closed-form when its family has expected
sufficient statistics, its parameters' priors are conjugate for the chosen mode, and
its free variables appear nowhere else in the model; otherwise the numeric M-step
handles those variables. The plan records why each variable was left to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytensor.scalar as ps
from pymc.distributions.continuous import FlatRV, HalfFlatRV
from pymc.logprob.transforms import LogTransform
from pymc.pytensorf import constant_fold
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorVariable
from pytensor.tensor import random as ptr
from pytensor.tensor.elemwise import DimShuffle, Elemwise
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1, Subtensor

from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph, direct_users
from ppl_em.model.mvn_spec import MvnSpec, mvn_specs

FAMILIES = {
    ptr.basic.BinomialRV: ("binomial", ("n", "p")),
    ptr.basic.BernoulliRV: ("bernoulli", ("p",)),
    ptr.basic.PoissonRV: ("poisson", ("mu",)),
    ptr.basic.ExponentialRV: ("exponential", ("scale",)),
    ptr.basic.NormalRV: ("normal", ("mu", "sigma")),
}
# Which parameter of each family EM estimates; the others must be constants.
FREE_OK = {"binomial": {"p"}, "bernoulli": {"p"}, "poisson": {"mu"},
           "exponential": {"scale"}, "normal": {"mu", "sigma"}}  # fmt: skip


class Slot(NamedTuple):
    """Component k's value of one family parameter is ``refs[k] = (rv, flat index)``."""

    refs: tuple[tuple[TensorVariable, int], ...]
    inverse: bool


@dataclass(frozen=True)
class DataRef:
    """A family parameter known per observation: the data input ``name``, or (for data
    that cannot be cut into chunks) the whole ``array``. Not a tuple, so never taken for
    a slot."""

    name: str | None
    array: np.ndarray | None = None


class Block(NamedTuple):
    """One closed-form family: its slots (free per-component parameters), its known
    parameters (``consts``: a (K,) array per component, or a :class:`DataRef`), and the
    priors of its slots."""

    family: str
    data_name: str | None
    slots: dict[str, Slot]
    consts: dict[str, np.ndarray]
    priors: dict[str, tuple]


class ClosedFormPlan(NamedTuple):
    """Closed-form blocks, the names they cover, why the others are numeric, and the
    MvNormal blocks (:mod:`ppl_em.mvnormal`), which update the free variables behind
    each component's mean and covariance together."""

    blocks: tuple[Block, ...]
    closed: frozenset[str]
    reasons: dict[str, str]
    mvn: tuple[MvnSpec, ...] = ()


def _strip(var: TensorVariable) -> TensorVariable:
    while var.owner and isinstance(var.owner.op, DimShuffle) and not var.owner.op.drop:
        if var.owner.op.shuffle != sorted(var.owner.op.shuffle):
            break
        var = var.owner.inputs[0]
    return var


def _is_reciprocal(var: TensorVariable) -> bool:
    op = var.owner.op if var.owner else None
    return isinstance(op, Elemwise) and isinstance(op.scalar_op, ps.Reciprocal)


def _param_slot(expr, graph: MixtureGraph, k: int | None, data: DataSpec | None = None):
    """Return a Slot-like ``(refs, inverse)``, a constant array, a :class:`DataRef`, or
    None if unrecognised.

    ``k`` is None when components are batched along the last axis or indexed by the
    label; otherwise it is the component number of a list component.
    """
    params = set(graph.params)
    expr = _strip(expr)
    leaves = dict(zip(data.leaves, data.names, strict=True)) if data else {}
    if expr in leaves:
        return DataRef(leaves[expr])
    above = set(ancestors([expr]))
    if above & set(leaves):
        return None  # an expression of per-observation data
    if not (above & (params | {graph.label_rv} - {None})):
        return np.asarray(constant_fold([expr])[0])
    inverse = _is_reciprocal(expr)
    if inverse:
        expr = _strip(expr.owner.inputs[0])
    K = graph.n_components
    op = expr.owner.op if expr.owner else None
    if isinstance(op, AdvancedSubtensor | AdvancedSubtensor1) and len(expr.owner.inputs) == 2:
        base, idx = (_strip(v) for v in expr.owner.inputs)
        if idx is graph.label_rv and base in params and base.type.shape == (K,):
            return tuple((base, j) for j in range(K)), inverse
        if idx is graph.label_rv and not inverse and not set(ancestors([base])) & params:
            # A known per-component constant such as sigma_known[z]: shape (1, K).
            return np.asarray(constant_fold([base])[0])[None, :]
        return None
    if isinstance(op, Subtensor) and k is not None and len(expr.owner.inputs) == 2:
        base = _strip(expr.owner.inputs[0])
        if base in params and base.ndim == 1:
            j = int(constant_fold([expr.owner.inputs[1]])[0])
            return ((base, j % base.type.shape[0]),), inverse
        return None
    if expr in params:
        if k is None and expr.type.shape == (K,):
            return tuple((expr, j) for j in range(K)), inverse
        if k is not None and expr.ndim == 0:
            return ((expr, 0),), inverse
    return None


def prior_of(rv: TensorVariable, mode: str) -> tuple | None:
    """The prior as ``(kind, *hyper)`` with constant hyperparameters, or None."""
    op = rv.owner.op
    try:
        hyper = [np.asarray(h) for h in constant_fold(op.dist_params(rv.owner))]
    except Exception:
        return None
    if isinstance(op, ptr.basic.BetaRV):
        return ("beta", *hyper)
    if isinstance(op, ptr.basic.UniformRV) and np.all(hyper[0] == 0) and np.all(hyper[1] == 1):
        return ("beta", np.ones(()), np.ones(()))
    if isinstance(op, ptr.basic.DirichletRV):
        return ("dirichlet", hyper[0])
    if isinstance(op, ptr.basic.GammaRV):
        return ("gamma", hyper[0], 1.0 / hyper[1])
    if isinstance(op, ptr.basic.ExponentialRV):
        return ("gamma", np.ones(()), 1.0 / hyper[0])
    if isinstance(op, HalfFlatRV):
        return ("gamma", np.ones(()), np.zeros(()))
    if isinstance(op, ptr.basic.NormalRV):
        return ("normal", *hyper)
    if isinstance(op, FlatRV):
        return ("flat",)
    return None


def _support(rv, graph: MixtureGraph) -> str | None:
    """The support class of a parameter's prior: what an MLE update may return."""
    op = rv.owner.op
    transform = graph.model.rvs_to_transforms.get(rv)
    if isinstance(op, ptr.basic.DirichletRV):
        return "simplex"
    prior = prior_of(rv, "mle")
    if prior and prior[0] == "beta":
        return "unit"
    if isinstance(transform, LogTransform):
        return "positive"
    if transform is None and not rv.dtype.startswith("int"):
        real = (ptr.basic.NormalRV, FlatRV, ptr.basic.StudentTRV, ptr.basic.CauchyRV)
        return "real" if isinstance(op, real) else None
    return None


NEEDED_SUPPORT = {"p": "unit", "mu": "real", "sigma": "positive", "scale": "positive"}


def _needed_support(family: str, name: str) -> str:
    return "positive" if (family, name) == ("poisson", "mu") else NEEDED_SUPPORT[name]


def _prior_ok(block: Block, name: str, slot: Slot, mode: str) -> str | None:
    """None if the slot's prior admits the closed form, else the reason."""
    if mode == "mle":
        return None
    prior = block.priors[name]
    kind = prior[0] if prior else None
    family = block.family
    if kind == "beta" and name == "p" and np.all(prior[1] >= 1) and np.all(prior[2] >= 1):
        return None
    if kind == "dirichlet" and np.all(prior[1] >= 1):
        return None
    if kind == "gamma" and np.all(prior[1] >= 1):
        flat_rate = np.all(prior[2] == 0)
        if slot.inverse and family == "exponential":
            return None  # Gamma prior on the rate of 1 / rate = scale: conjugate
        if not slot.inverse and (family == "poisson" or flat_rate):
            return None
    if name == "mu" and kind == "flat":
        return None
    if name == "mu" and kind == "normal" and "sigma" in block.consts:
        return None
    return (
        f"its prior {kind or 'family'} has no conjugate closed-form update for "
        f"{family} parameter {name!r} in mode='map'"
    )


def _per_observation(value: np.ndarray, graph: MixtureGraph) -> bool:
    """A constant with the observation axis (label models put components on the label's
    index, Mixtures on the last axis)."""
    n = graph.n_rows
    if value.ndim == 0 or value.shape[0] != n or n == 1:
        return False
    return graph.kind == "label" or value.ndim >= 2


def _normalise(value, graph: MixtureGraph):
    """A known parameter as a (K,) array per component, or a :class:`DataRef`."""
    if isinstance(value, DataRef) or _per_observation(value, graph):
        return value if isinstance(value, DataRef) else DataRef(None, value)
    k = graph.n_components
    flat = np.asarray(value, dtype=float)
    return np.broadcast_to(flat.reshape(-1) if flat.size == k else flat.reshape(()), (k,))


def _family_block(
    graph: MixtureGraph, dists: list, data_name: str, data: DataSpec | None = None
) -> Block | str:
    """Build the block of one observed family; ``dists`` are the K list components or one."""
    op = dists[0].owner.op
    family, names = FAMILIES.get(type(op), (None, None))
    if family is None or any(type(d.owner.op) is not type(op) for d in dists):
        return f"its component family {type(op).__name__} has no closed form in ppl_em"
    slots, consts, batched = {}, {}, len(dists) == 1
    for pos, name in enumerate(names):
        found = [
            _param_slot(d.owner.op.dist_params(d.owner)[pos], graph, None if batched else k, data)
            for k, d in enumerate(dists)
        ]
        is_slot = [isinstance(f, tuple) for f in found]
        if any(f is None for f in found) or (any(is_slot) and not all(is_slot)):
            return f"its parameter {name!r} is not a plain element of a free variable"
        if isinstance(found[0], tuple):
            if name not in FREE_OK[family]:
                return f"{family} parameter {name!r} is free; only {sorted(FREE_OK[family])} may be"
            refs = tuple(r for f in found for r in f[0])
            if len({f[1] for f in found}) != 1:
                return f"its parameter {name!r} mixes theta and 1/theta across components"
            slots[name] = Slot(refs=refs, inverse=found[0][1])
        elif any(isinstance(f, DataRef) for f in found):
            if not batched:
                return f"its parameter {name!r} is per-observation data in list components"
            consts[name] = found[0]
        else:
            consts[name] = _normalise(found[0] if batched else np.stack(found, axis=-1), graph)
    per_obs = [n for n, c in consts.items() if isinstance(c, DataRef)]
    if family != "binomial" and per_obs:
        # The weighted-mean updates assume every observation of a component shares it.
        return f"its known parameter {per_obs[0]!r} varies by observation (not by component)"
    priors = {n: prior_of(s.refs[0][0], "map") for n, s in slots.items()}
    return Block(family, data_name, slots, consts, priors)


def _weights_block(graph: MixtureGraph) -> Block | None:
    if graph.kind == "label":
        op = graph.label_rv.owner.op
        (expr,) = op.dist_params(graph.label_rv.owner)
        family = "bernoulli_label" if isinstance(op, ptr.basic.BernoulliRV) else "weights"
    else:
        expr, family = graph.dependents[0].owner.inputs[1], "weights"
    found = _param_slot(expr, graph, 0 if family == "bernoulli_label" else None)
    if not isinstance(found, tuple):
        return None
    slot = Slot(refs=found[0], inverse=found[1])
    name = "p" if family == "bernoulli_label" else "w"
    return Block(family, None, {name: slot}, {}, {name: prior_of(slot.refs[0][0], "map")})


def _check_block(graph: MixtureGraph, block: Block, owners: set, mode: str) -> str | None:
    for name, slot in block.slots.items():
        rvs = {r for r, _ in slot.refs}
        if block.family in ("weights", "bernoulli_label"):
            needed = "unit" if block.family == "bernoulli_label" else "simplex"
        else:
            needed = _needed_support(block.family, name)
        if slot.inverse and block.family != "exponential":
            return f"it enters {block.family} parameter {name!r} as a reciprocal"
        if any(_support(r, graph) != needed for r in rvs):
            return f"its prior's support is not the {needed} domain of {name!r}"
        if any(direct_users(graph, r) - owners for r in rvs):
            return "it also enters other parts of the model (a hyperprior, potential or variable)"
        reason = _prior_ok(block, name, slot, mode)
        if reason:
            return reason
    return None


def build_plan(graph: MixtureGraph, mode: str, data: DataSpec | None = None) -> ClosedFormPlan:
    """Find every closed-form block and, for the rest, the reason it is numeric;
    ``data`` (:func:`ppl_em.model.data.data_spec`) tells per-observation inputs apart."""
    candidates = []
    if graph.kind == "label":
        owners = {graph.label_rv, *graph.dependents}
        candidates += [(_family_block(graph, [d], d.name, data), {d}) for d in graph.dependents]
        candidates.append((_weights_block(graph), {graph.label_rv}))
    else:
        mix = graph.dependents[0]
        comps = mix.owner.inputs[2:]
        candidates.append((_family_block(graph, comps, mix.name, data), {mix}))
        candidates.append((_weights_block(graph), {mix}))
    reasons, blocks = {}, []
    for block, owners in candidates:
        if isinstance(block, str):
            # No block at all: the reason belongs to the free variables its owners read.
            used = set(ancestors([i for o in owners for i in o.owner.inputs]))
            reasons.update({p.name: block for p in graph.params if p in used})
        elif isinstance(block, Block):
            reason = _check_block(graph, block, owners, mode)
            if reason is None:
                blocks.append(block)
                continue
            for slot in block.slots.values():
                reasons.update({r.name: reason for r, _ in slot.refs})
    blocks = _exclusive(blocks, reasons)
    closed = frozenset(r.name for b in blocks for s in b.slots.values() for r, _ in s.refs)
    specs, mvn_reasons = mvn_specs(graph, mode)
    closed |= {r.name for spec in specs for r in spec.rvs}
    reasons.update({n: why for n, why in mvn_reasons.items() if n not in closed})
    for rv in graph.params:
        if rv.name not in closed and rv.name not in reasons:
            reasons[rv.name] = "no closed-form family in ppl_em covers it"
    reasons = {name: why for name, why in reasons.items() if name not in closed}
    return ClosedFormPlan(tuple(blocks), closed, reasons, tuple(specs))


def _size(rv: TensorVariable) -> int:
    return int(np.prod(rv.type.shape)) if rv.ndim else 1


def _exclusive(blocks: list[Block], reasons: dict) -> list[Block]:
    """Keep blocks whose variables are written exactly once, element by element."""
    count: dict = {}
    for b in blocks:
        for s in b.slots.values():
            for r, j in s.refs:
                count.setdefault(r, []).append(j)
    bad = {r for r, idx in count.items() if sorted(idx) != list(range(_size(r)))}
    for r in bad:
        reasons[r.name] = "its elements are not each one component's parameter exactly once"
    return [b for b in blocks if not any(r in bad for s in b.slots.values() for r, _ in s.refs)]
