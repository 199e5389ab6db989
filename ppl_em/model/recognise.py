"""Decide, from the graph, which parameters have a closed-form M-step.

A *block* is one component family (an observed dependent, the Mixture's components,
or the label's weights) whose parameters are plain elements of free variables
(:mod:`ppl_em.model.slots`: per component, per component and item, or tied across
components). A block is closed-form when its family has expected sufficient
statistics, its parameters' priors are conjugate for the chosen mode, and its free
variables appear nowhere else in the model; otherwise the numeric M-step handles
those variables. The plan records why each variable was left to it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorVariable
from pytensor.tensor import random as ptr
from pytensor.tensor.subtensor import AdvancedSubtensor, AdvancedSubtensor1

from ppl_em.model.blocks import Block, read_parameter, slot_prior
from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph, direct_users
from ppl_em.model.linear import GLM, INVERSE_LINKS, glm_block, glm_ok, linear_block, nb_block
from ppl_em.model.mvn_spec import MvnSpec, mvn_specs
from ppl_em.model.priors import needed_support, prior_of, prior_ok, support
from ppl_em.model.slots import DataRef, Slot, param_slot, shape_of, strip
from ppl_em.model.slots import all_elements as _all

FAMILIES = {
    ptr.basic.BinomialRV: ("binomial", ("n", "p")),
    ptr.basic.BernoulliRV: ("bernoulli", ("p",)),
    ptr.basic.PoissonRV: ("poisson", ("mu",)),
    ptr.basic.ExponentialRV: ("exponential", ("scale",)),
    ptr.basic.NormalRV: ("normal", ("mu", "sigma")),
}


class ClosedFormPlan(NamedTuple):
    """Closed-form blocks, the names they cover, why the others are numeric, and the
    MvNormal blocks (:mod:`ppl_em.mvnormal`), which update the free variables behind
    each component's mean and covariance together."""

    blocks: tuple[Block, ...]
    closed: frozenset[str]
    reasons: dict[str, str]
    mvn: tuple[MvnSpec, ...] = ()
    statistics: tuple[Block, ...] = ()
    glm: tuple[Block, ...] = ()

    @property
    def all_blocks(self) -> tuple[Block, ...]:
        """The closed-form blocks, then those maximised from the statistics: the
        statistics columns follow this order."""
        return self.blocks + self.statistics

    @property
    def from_statistics(self) -> frozenset[str]:
        """Variables whose update reads only the E-step's statistics (no data pass)."""
        return frozenset(r.name for b in self.statistics for s in b.slots.values()
                         for r, _ in s.refs)  # fmt: skip


def _item_shape(graph: MixtureGraph, dists: list) -> tuple[int, ...]:
    """The shape of one observation's values in a label model's dependent."""
    if graph.kind != "label":
        return ()
    return tuple(int(d) for d in dists[0].type.shape[1:] if d is not None)


def _family_block(
    graph: MixtureGraph, dists: list, data_name: str, data: DataSpec | None = None
) -> Block | str:
    """Build the block of one observed family; ``dists`` are the K list components or one."""
    op = dists[0].owner.op
    if isinstance(op, ptr.basic.CategoricalRV) and len(dists) == 1:
        return _categorical_block(graph, dists[0])
    family, names = FAMILIES.get(type(op), (None, None))
    regression = _regression_block(graph, dists, data, data_name)
    if regression is not None:
        return regression
    if family is None or any(type(d.owner.op) is not type(op) for d in dists):
        return f"its component family {type(op).__name__} has no closed form in ppl_em"
    slots, consts = {}, {}
    items = _item_shape(graph, dists)
    for pos, name in enumerate(names):
        exprs = [d.owner.op.dist_params(d.owner)[pos] for d in dists]
        made = read_parameter(exprs, graph, data, name, family, items)
        if made is None:
            return f"its parameter {name!r} is not a plain element of a free variable"
        if isinstance(made, str):
            return made
        (slots if isinstance(made, Slot) else consts)[name] = made
    reason = _consistent(family, slots, consts)
    if reason:
        return reason
    priors = {n: slot_prior(s.refs) for n, s in slots.items()}
    return Block(family, data_name, slots, consts, priors, int(np.prod(items)))


def _regression_block(
    graph: MixtureGraph, dists: list, data: DataSpec | None, data_name: str
) -> Block | str | None:
    """A regression component (:mod:`ppl_em.model.linear`), or None. Its readers take one
    value per observation: a label model's (N,) dependent, a Mixture's batched
    components of shape (N, K), or its list components of shape (N,)."""
    op = dists[0].owner.op
    ndim = 2 if graph.kind == "mixture" and len(dists) == 1 else 1
    if any(type(d.owner.op) is not type(op) or d.ndim != ndim for d in dists):
        return None
    if isinstance(op, ptr.basic.NegBinomialRV):
        return nb_block(graph, dists, data, data_name)
    family = FAMILIES.get(type(op), (None,))[0]
    if family == "normal":
        return linear_block(graph, dists, data, data_name)
    if family in INVERSE_LINKS:
        return glm_block(graph, dists, data, family, data_name)
    return None


def _categorical_block(graph: MixtureGraph, dist) -> Block | str:
    """Categorical items (latent class analysis with answers in C categories):
    ``p[z]`` with ``p`` of shape (K, J, C), or (K, C) for one item; the update is the
    weighted share of each category, per class and item."""
    (expr,) = dist.owner.op.dist_params(dist.owner)
    expr = strip(expr)
    node = expr.owner
    indexed = node and isinstance(node.op, AdvancedSubtensor | AdvancedSubtensor1)
    base = strip(node.inputs[0]) if indexed and len(node.inputs) == 2 else None
    items = _item_shape(graph, [dist]) if graph.kind == "label" else None
    k = graph.n_components
    if (base not in set(graph.params) or strip(node.inputs[1]) is not graph.label_rv
            or items is None or shape_of(base)[:-1] != (k, *items)):  # fmt: skip
        return "its Categorical probabilities are not p[z] with p of shape (K, items, C)"
    slot = Slot(refs=_all(base), inverse=False, axes=("k", "d", "c"))
    consts = {"n_categories": np.asarray(shape_of(base)[-1])}
    prior = prior_of(base, "map")
    return Block("categorical", dist.name, {"p": slot}, consts, {"p": prior},
                 int(np.prod(items)))  # fmt: skip


def _consistent(family: str, slots: dict, consts: dict) -> str | None:
    """Why the parameters cannot be updated in closed form together, or None."""
    per_obs = [n for n, c in consts.items() if isinstance(c, DataRef)]
    if family != "binomial" and per_obs:
        # The weighted-mean updates assume every observation of a component shares it.
        return f"its known parameter {per_obs[0]!r} varies by observation (not by component)"
    mu, sigma = slots.get("mu"), slots.get("sigma")
    # A mean shared where the scales differ is a precision-weighted mean whose weights
    # are the scales being estimated: no closed form.
    if family == "normal" and mu and sigma and not set(sigma.axes) <= set(mu.axes):
        return "its mean is shared across components or items whose scales differ"
    return None


# The families of the label's weights block (:func:`_weights_block`): variables that
# enter nothing but the label's probabilities, shared by all observations.
LABEL_FAMILIES = ("weights", "weights_graph", "bernoulli_label")


def _weights_block(graph: MixtureGraph) -> Block | None:
    if graph.kind == "label":
        op = graph.label_rv.owner.op
        (expr,) = op.dist_params(graph.label_rv.owner)
        family = "bernoulli_label" if isinstance(op, ptr.basic.BernoulliRV) else "weights"
    else:
        expr, family = graph.dependents[0].owner.inputs[1], "weights"
    stripped = strip(expr)
    if family == "weights" and stripped in graph.params:
        # The weights' own last axis is the component axis, in either form.
        found = (_all(stripped), False, ("k",)) if stripped.ndim == 1 else None
    else:
        found = param_slot(expr, graph, 0 if family == "bernoulli_label" else None, None)
    if not isinstance(found, tuple):
        return _weights_graph(graph, expr, family)
    slot = Slot(refs=found[0], inverse=found[1], axes=found[2])
    name = "p" if family == "bernoulli_label" else "w"
    return Block(family, None, {name: slot}, {}, {name: slot_prior(slot.refs)})


def _weights_graph(graph: MixtureGraph, expr, family: str) -> Block | None:
    """Weights that are a function of free variables shared by all observations (say
    stick-breaking): their Q is ``sum_k N_k log w_k``, a function of the counts alone.
    Its block holds each such variable whole; ``consts["weights"]`` is the graph."""
    k = graph.n_components
    if shape_of(expr) not in ([(), (1,)] if family == "bernoulli_label" else [(k,), (1, k)]):
        return None
    rvs = [p for p in graph.params if p in set(ancestors([expr]))]
    if not rvs:
        return None
    slots = {rv.name: Slot(refs=_all(rv), inverse=False, axes=()) for rv in rvs}
    priors = {rv.name: prior_of(rv, "map") for rv in rvs}
    return Block("weights_graph", None, slots, {"weights": expr, "of": family}, priors)


MISSING = (
    "its data have missing entries: the numeric M-step maximises Q over the observed "
    "entries (a closed form's counts would differ entry by entry)"
)


def _dependent_block(graph: MixtureGraph, dists: list, dep, data) -> Block | str:
    if graph.observed_mask(dep.name) is not None:
        return MISSING
    return _family_block(graph, dists, dep.name, data)


STATISTICS = "; Newton's method maximises its Q from the E-step's statistics instead"
STATISTICS_FAMILIES = ("normal", "normal_linear", "poisson", "binomial", "bernoulli",
                       "exponential")  # fmt: skip


def _from_statistics(graph: MixtureGraph, block: Block, owners: set, mode: str) -> bool:
    """A block whose only obstacle to the closed form is a non-conjugate prior with
    constant parameters: its Q is still a function of the E-step's statistics, so it is
    maximised from them, with no pass over the data."""
    if mode != "map" or block.family not in STATISTICS_FAMILIES:
        return False
    if _check_block(graph, block, owners, "mle") is not None:
        return False
    # Per-observation trials and covariates are in the statistics; known scales or
    # means that vary by observation are not.
    data_consts = {n for n, c in block.consts.items() if isinstance(c, DataRef)}
    if any(n != "n" and not n.startswith("x") for n in data_consts):
        return False
    params = set(graph.params)
    rvs = {r for slot in block.slots.values() for r, _ in slot.refs}
    return not any(params & set(ancestors(rv.owner.inputs)) for rv in rvs)


def _weights_graph_ok(graph: MixtureGraph, block: Block, owners: set) -> bool:
    """The weights' variables enter nothing but the weights, and their priors have
    constant parameters."""
    params = set(graph.params)
    rvs = [r for slot in block.slots.values() for r, _ in slot.refs]
    if any(direct_users(graph, r) - owners - set(rvs) for r in rvs):
        return False
    return not any(params & set(ancestors(rv.owner.inputs)) for rv in rvs)


def _check_block(graph: MixtureGraph, block: Block, owners: set, mode: str) -> str | None:
    for name, slot in block.slots.items():
        rvs = {r for r, _ in slot.refs}
        if block.family in ("weights", "bernoulli_label"):
            needed = "unit" if block.family == "bernoulli_label" else "simplex"
        else:
            needed = needed_support(block.family, name)
        if slot.inverse and block.family != "exponential":
            return f"it enters {block.family} parameter {name!r} as a reciprocal"
        if any(support(r, graph) != needed for r in rvs):
            return f"its prior's support is not the {needed} domain of {name!r}"
        if any(direct_users(graph, r) - owners for r in rvs):
            return "it also enters other parts of the model (a hyperprior, potential or variable)"
        prior = block.priors[name]
        reason = prior_ok(block.family, name, prior, slot.inverse, block.consts, mode)
        if reason:
            return reason
    return None


def build_plan(graph: MixtureGraph, mode: str, data: DataSpec | None = None) -> ClosedFormPlan:
    """Find every closed-form block and, for the rest, the reason it is numeric;
    ``data`` (:func:`ppl_em.model.data.data_spec`) tells per-observation inputs apart."""
    candidates = []
    if graph.kind == "label":
        candidates += [(_dependent_block(graph, [d], d, data), {d}) for d in graph.dependents]
        candidates.append((_weights_block(graph), {graph.label_rv}))
    else:
        mix = graph.dependents[0]
        candidates.append((_dependent_block(graph, mix.owner.inputs[2:], mix, data), {mix}))
        candidates.append((_weights_block(graph), {mix}))
    reasons, blocks, statistics, glm = {}, [], [], []
    for block, owners in candidates:
        if isinstance(block, str):
            # No block at all: the reason belongs to the free variables its owners read.
            used = set(ancestors([i for o in owners for i in o.owner.inputs]))
            reasons.update({p.name: block for p in graph.params if p in used})
        elif isinstance(block, Block) and block.family == "weights_graph":
            if _weights_graph_ok(graph, block, owners):
                statistics.append(block)
        elif isinstance(block, Block) and block.family.endswith("_glm"):
            if glm_ok(graph, block, owners, mode):
                glm.append(block)
            reasons.update({r.name: GLM for s in block.slots.values() for r, _ in s.refs})
        elif isinstance(block, Block):
            reason = _check_block(graph, block, owners, mode)
            if reason is None:
                blocks.append(block)
                continue
            if _from_statistics(graph, block, owners, mode):
                statistics.append(block)
                reason += STATISTICS
            for slot in block.slots.values():
                reasons.update({r.name: reason for r, _ in slot.refs})
    kept = {id(b) for b in _exclusive(blocks + statistics, reasons)}
    blocks = [b for b in blocks if id(b) in kept]
    statistics = [b for b in statistics if id(b) in kept]
    closed = frozenset(r.name for b in blocks for s in b.slots.values() for r, _ in s.refs)
    specs, mvn_reasons = mvn_specs(graph, mode)
    closed |= {r.name for spec in specs for r in spec.rvs}
    reasons.update({n: why for n, why in mvn_reasons.items() if n not in closed})
    for rv in graph.params:
        if rv.name not in closed and rv.name not in reasons:
            reasons[rv.name] = "no closed-form family in ppl_em covers it"
    reasons = {name: why for name, why in reasons.items() if name not in closed}
    return ClosedFormPlan(tuple(blocks), closed, reasons, tuple(specs), tuple(statistics),
                          tuple(glm))  # fmt: skip


def _size(rv: TensorVariable) -> int:
    return int(np.prod(shape_of(rv))) if rv.ndim else 1


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
