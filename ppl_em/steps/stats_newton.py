"""The M-step of the blocks maximised from the statistics: Newton's method on their Q
(:mod:`ppl_em.compiled.stats_q`), a function of the E-step's sums alone.

A few variables each, and each evaluation of Q and its gradient costs microseconds
whatever N is, so the damped Newton of :mod:`ppl_em.steps.newton` (finite-difference
Hessian, eigenvalue floor, line search) runs to Q's maximiser. If it does not get there,
the caller takes the numeric step over the data for that block instead, so a failure
costs time, never the answer.
"""

from __future__ import annotations

import numpy as np

from ppl_em.compiled.stats_q import StatsQ
from ppl_em.model.blocks import Block
from ppl_em.steps.closed_form import (
    CANCELLATION_RSS,
    least_squares,
    linear_moments,
    role_sums,
    second_moments,
)
from ppl_em.steps.columns import StatsRequest, coefficients
from ppl_em.steps.newton import (
    grouped_hessian,
    hessian,
    interacting,
    newton_direction,
    newton_maximise,
)
from ppl_em.steps.stats import TINY, Stats

# Newton stops within 1e-12 standard errors (under Q) of Q's maximum; a result more
# than this far from it counts as a failure.
DECREMENT_TOL = 1e-6


def block_statistics(stats: Stats, request: StatsRequest, b: int, block: Block, batches=None):
    """``(nk, S, S2, T, centre)`` of block ``b`` (``plan.all_blocks`` numbering) for its
    compiled Q (``(nk, A, r, yy)`` for a Gaussian regression), or None when its sums of
    squares would cancel in float64. A Normal block whose sums about the data's centre
    would cancel (a component narrow beside its distance from it: a stick-breaking
    prior's spare component on a few points) gets its sums about each component's own
    mean instead, by one pass over ``batches``."""
    k, d = stats.nk.size, block.items
    if block.family == "weights_graph":
        return (stats.nk,)
    if block.family == "normal_linear":
        a, r, yy = linear_moments(stats, request, b, len(coefficients(block)))
        _, rss = least_squares(a, r, yy)
        return (stats.nk, a, r, yy) if np.all(rss > CANCELLATION_RSS * yy) else None
    s, s2, trials = (role_sums(stats, request, b, role, d) for role in ("x", "xx", "n"))
    centre = np.ones((k, 1)) * np.asarray(request.offsets.get(b, np.zeros(d)), dtype=float)
    if block.family == "normal":
        nk = np.maximum(stats.nk, TINY)[:, None] * np.ones((1, d))
        if second_moments(nk, s, s2, np.zeros((k, d))) is None:
            if batches is None:
                return None
            centre = centre + s / nk
            s, s2 = _centred_sums(batches, block, request.names, centre)
            if second_moments(nk, s, s2, np.zeros((k, d))) is None:
                return None
    return stats.nk, s, s2, trials, centre


def _centred_sums(batches, block: Block, names, centre: np.ndarray):
    """``sum gamma (x - c_k)`` and ``sum gamma (x - c_k)^2`` per (k, d) from the data."""
    col = names.index(block.data_name)
    s, s2 = np.zeros_like(centre), np.zeros_like(centre)
    for gamma_t, chunk in batches():
        x = np.asarray(chunk.arrays[col], dtype=float).reshape(-1, block.items)
        dev = x[None, :, :] - centre[:, None, :]
        s += np.einsum("kn,knd->kd", gamma_t, dev)
        s2 += np.einsum("kn,knd->kd", gamma_t, dev**2)
    return s, s2


class _Curvature:
    """Q's Hessian for one M-step: the first in full (:func:`hessian`), the rest with the
    variables it shows apart differenced together (:func:`grouped_hessian`; a normal
    block's K components of two variables each: two gradients instead of 2K, each
    about twice for the step's adjustment). Learnt per M-step, under that M-step's statistics: a
    normal block's components are apart at every point, and a coupling that vanished at
    the first point alone would be a coincidence of the numbers."""

    def __init__(self, evaluate) -> None:
        self.evaluate, self.sets = evaluate, None

    def __call__(self, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
        if self.sets is None:
            h = hessian(self.evaluate, x, grad)
            self.sets = interacting(h)
            return h
        return grouped_hessian(self.evaluate, x, grad, self.sets)


def statistics_update(sq: StatsQ, u: np.ndarray, arrays) -> np.ndarray | None:
    """``u`` with the block's entries at its Q's maximiser, or None if Newton did not
    get there (the decrement, in standard errors under Q, still above ``DECREMENT_TOL``)."""

    def evaluate(x):
        return sq.q(x, *arrays)

    curvature = _Curvature(evaluate)
    found = newton_maximise(evaluate, evaluate, u[sq.index], 0.0, curvature=curvature)
    # Where Newton stopped before moving, its last Hessian was taken at the result: the
    # same decrement, without the evaluations of Q a new Hessian costs.
    q, grad, decrement = found.final or (*evaluate(found.values), None)
    if not (np.isfinite(q) and np.all(np.isfinite(grad))):
        return None
    if decrement is None:
        decrement = newton_direction(curvature(found.values, grad), grad)[1]
    if decrement > DECREMENT_TOL:
        return None
    out = u.copy()
    out[sq.index] = found.values
    return out
