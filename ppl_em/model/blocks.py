"""A closed-form block and the reading of one family parameter into it.

A *block* is one component family (an observed dependent, the Mixture's components,
or the label's weights) whose parameters are plain elements of free variables
(:mod:`ppl_em.model.slots`); :mod:`ppl_em.model.recognise` finds them,
:mod:`ppl_em.model.linear` the regression ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.model.graph import MixtureGraph
from ppl_em.model.slots import DataRef, Slot, normalise

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
