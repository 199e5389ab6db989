"""Undo label switching: permute each posterior draw's components to a reference order.

A mixture's posterior is invariant to permuting the components, so MCMC chains may
visit (or start in) different labellings and summaries that average across them mix
components. Each draw is relabelled by the optimal assignment
(``scipy.optimize.linear_sum_assignment``) between its components and the reference's
(EM's) components, with a squared distance on the component parameters scaled by the
reference's uncertainty. Component parameters are the free variables whose first axis
has length K (the convention of every model in ``models/``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment


class Relabelling(NamedTuple):
    """``perms[c, d, k]``: which component of draw (c, d) is the reference's component k."""

    perms: np.ndarray
    names: tuple[str, ...]
    report: str
    chains_disagree: bool
    fraction_permuted: float


def component_params(params: Mapping[str, np.ndarray], k: int) -> tuple[str, ...]:
    """Names of the parameters whose first axis is the K components."""
    return tuple(n for n, v in params.items() if np.ndim(v) >= 1 and np.shape(v)[0] == k)


def _features(values: Mapping[str, np.ndarray], names, scales, lead: int) -> np.ndarray:
    """Stack scaled component parameters to ``(..., K, P)``; ``lead`` leading sample axes."""
    cols = []
    for n in names:
        v = np.asarray(values[n], dtype=float)
        cols.append(v.reshape(*v.shape[: lead + 1], -1) / scales[n].reshape(-1))
    return np.concatenate(cols, axis=-1)


def _scales(reference: Mapping, names, scales: Mapping | None) -> dict[str, np.ndarray]:
    """One positive scale per within-component element (averaged over components).

    Why average: a component-specific scale would make the cost of matching draw
    component j to reference k depend on which of them is the larger one.
    """
    out = {}
    for n in names:
        ref = np.asarray(reference[n], dtype=float)
        s = None if scales is None or n not in scales else np.asarray(scales[n], dtype=float)
        if s is None or not np.all(np.isfinite(s)) or np.any(s <= 0):
            s = np.broadcast_to(np.abs(ref).mean(axis=0) * 0.1 + 1e-3, ref.shape)
        out[n] = np.broadcast_to(s, ref.shape).mean(axis=0)
    return out


def match(
    estimate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    k: int,
    scales: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """``perm`` with ``estimate[name][perm]`` in the reference's component order."""
    names = component_params(reference, k)
    sc = _scales(reference, names, scales)
    est = _features(estimate, names, sc, 0)
    ref = _features(reference, names, sc, 0)
    cost = ((ref[:, None, :] - est[None, :, :]) ** 2).sum(axis=-1)
    _, cols = linear_sum_assignment(cost)
    return cols


def permute(values: Mapping[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """Apply one permutation to the first axis of every component parameter."""
    k = len(perm)
    names = component_params(values, k)
    return {n: (np.asarray(v)[perm] if n in names else np.asarray(v)) for n, v in values.items()}


def relabel_draws(
    draws: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    k: int,
    scales: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], Relabelling]:
    """Relabel ``draws[name]`` of shape ``(chain, draw, K, ...)`` to the reference order.

    Returns the relabelled arrays (every name in ``draws``; non-component ones unchanged)
    and a :class:`Relabelling` recording the permutations and whether chains disagreed.
    """
    names = component_params(reference, k)
    sc = _scales(reference, names, scales)
    feats = _features(draws, names, sc, 2)  # (C, D, K, P)
    ref = _features(reference, names, sc, 0)  # (K, P)
    n_chain, n_draw = feats.shape[:2]
    cost = ((ref[None, None, :, None, :] - feats[:, :, None, :, :]) ** 2).sum(axis=-1)
    perms = np.empty((n_chain, n_draw, k), dtype=int)
    for c in range(n_chain):
        for d in range(n_draw):
            perms[c, d] = linear_sum_assignment(cost[c, d])[1]
    out = {}
    for n, v in draws.items():
        v = np.asarray(v)
        if n in names:
            idx = perms.reshape(n_chain, n_draw, k, *([1] * (v.ndim - 3)))
            v = np.take_along_axis(v, idx, axis=2)
        out[n] = v
    return out, _summarise(perms, names)


def permute_last_axis(values: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Relabel per-draw arrays whose last axis is the component (e.g. ``lp_z``)."""
    idx = perms.reshape(perms.shape[0], perms.shape[1], *([1] * (values.ndim - 3)), -1)
    return np.take_along_axis(values, np.broadcast_to(idx, values.shape), axis=-1)


def _summarise(perms: np.ndarray, names: tuple[str, ...]) -> Relabelling:
    n_chain, n_draw, k = perms.shape
    identity = np.arange(k)
    moved = ~np.all(perms == identity, axis=-1)
    modal = []
    for c in range(n_chain):
        counts = Counter(map(tuple, perms[c]))
        perm, count = counts.most_common(1)[0]
        modal.append((perm, count / n_draw))
    disagree = len({m[0] for m in modal}) > 1
    parts = [
        f"chain {c}: {frac:.0%} of draws in labelling {[int(j) for j in perm]}"
        for c, (perm, frac) in enumerate(modal)
    ]
    within = [c for c in range(n_chain) if modal[c][1] < 0.99]
    text = (
        f"relabelled {moved.mean():.1%} of draws to EM's component order on {list(names)}; "
        + "; ".join(parts)
        + (". Chains disagreed on labelling (started in different labellings)" if disagree else "")
        + (f". Labels switched within chains {within}" if within else "")
    )
    return Relabelling(perms, names, text, disagree, float(moved.mean()))
