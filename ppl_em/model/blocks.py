"""A closed-form block, the reading of one family parameter into it, and its prior.

A *block* is one component family (an observed dependent, the Mixture's components,
or the label's weights) whose parameters are plain elements of free variables
(:mod:`ppl_em.model.slots`); :mod:`ppl_em.model.recognise` finds them,
:mod:`ppl_em.model.linear` the regression ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.model.graph import MixtureGraph
from ppl_em.model.priors import prior_of
from ppl_em.model.slots import DataRef, Slot, normalise, param_slot, shape_of

# Which parameter of each family EM estimates; the others must be constants.
FREE_OK = {"binomial": {"p"}, "bernoulli": {"p"}, "poisson": {"mu"},
           "exponential": {"scale"}, "normal": {"mu", "sigma"},
           "negative_binomial": {"alpha"}}  # fmt: skip


class Block(NamedTuple):
    """One closed-form family: its slots (free parameters), its known parameters
    (``consts``: a (K,) array per component, or a :class:`DataRef`), the priors of its
    slots, and ``items``, the number of values one observation has."""

    family: str
    data_name: str | None
    slots: dict[str, Slot]
    consts: dict[str, np.ndarray]
    priors: dict[str, tuple]
    items: int = 1


def slot_prior(refs: tuple, read=lambda rv: prior_of(rv, "map")) -> tuple | None:
    """The prior of a slot's elements ``refs`` (``((rv, flat index), ...)``) as ``read``
    gives it, with each hyperparameter taken element by element: one value per element,
    in the slot's order. So a prior broadcast over a variable (an sd per feature of a
    (K, D) mean) and list components with a variable each are read right. None if the
    kinds differ or one is unreadable."""
    rvs = list(dict.fromkeys(rv for rv, _ in refs))
    priors = {rv: read(rv) for rv in rvs}
    first = priors[rvs[0]]
    if first is None or any(p is None or p[0] != first[0] for p in priors.values()):
        return None
    flat = {rv: [np.broadcast_to(h, shape_of(rv)).reshape(-1) for h in p[1:]]
            for rv, p in priors.items()}  # fmt: skip
    return (first[0], *(np.array([flat[rv][i][e] for rv, e in refs])
                        for i in range(len(first) - 1)))  # fmt: skip


def read_parameter(exprs: list, graph: MixtureGraph, data, name: str, family: str, items=()):
    """One family parameter from its expressions (one for batched or label-indexed
    components, else one per list component): a :class:`Slot`, a known value (a (K,)
    array or :class:`DataRef`), a reason it cannot be either, or None where it is not a
    plain element of a free variable (or mixes those with constants)."""
    batched = len(exprs) == 1
    found = [param_slot(e, graph, None if batched else k, data, items)
             for k, e in enumerate(exprs)]  # fmt: skip
    is_slot = [isinstance(f, tuple) for f in found]
    if any(f is None for f in found) or (any(is_slot) and not all(is_slot)):
        return None
    return family_slot(found, name, family) if is_slot[0] else family_const(
        found, name, graph, batched)  # fmt: skip


def family_slot(found: list, name: str, family: str) -> Slot | str:
    """One family parameter's slot from its per-component findings."""
    if name not in FREE_OK[family]:
        return f"{family} parameter {name!r} is free; only {sorted(FREE_OK[family])} may be"
    if len({f[1] for f in found}) != 1:
        return f"its parameter {name!r} mixes theta and 1/theta across components"
    refs = tuple(r for f in found for r in f[0])
    if len(found) > 1 and len(set(refs)) == 1:
        return Slot(refs=refs[:1], inverse=found[0][1], axes=())  # one scalar in every component
    return Slot(refs=refs, inverse=found[0][1], axes=found[0][2])


def family_const(found: list, name: str, graph: MixtureGraph, batched: bool):
    """A known parameter, or the reason it cannot be one."""
    if any(isinstance(f, DataRef) for f in found):
        if not batched:
            return f"its parameter {name!r} is per-observation data in list components"
        return found[0]
    value = normalise(found[0] if batched else np.stack(found, axis=-1), graph)
    return f"its known parameter {name!r} varies along an item axis" if value is None else value
