"""Damped Newton ascent on Q for small numeric blocks, with a finite-difference Hessian.

Newton's method is invariant to affine changes of the variables, so the units of the
data (a mean in units of 1e8 beside a log-scale) do not matter to it, and near Q's
maximum it converges quadratically: an exact M-step costs a handful of Hessians. The
Hessian comes from forward differences of Q's compiled gradient (one gradient per
variable), which is affordable for the small blocks a mixture's numeric M-step has.

Everything is measured in coordinates scaled by the Hessian's diagonal, where Q's
curvature is 1 along each variable: the Newton decrement ``sqrt(g' (-H)^-1 g)`` is then
about the number of standard errors (under Q) between the point and Q's maximum, and
the eigenvalue floor that keeps a non-concave Hessian usable is unit-free.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Eigenvalues of the scaled, negated Hessian below this are raised to it: a direction
# along which Q is flat or convex gets a bounded step instead of an infinite one.
EIGEN_FLOOR = 1e-8
# The line search halves the Newton step at most this many times, and doubles a full
# step that raises Q at most this many times.
HALVINGS = 60
DOUBLINGS = 30
# Longest step, in standard errors (scaled coordinates): where Q is nearly linear
# (far from its maximum, in a log-scale's direction) the floored eigenvalue would
# otherwise ask for an astronomically long one.
MAX_STEP = 1e4
# Within this many standard errors of Q's maximum the full Newton step is taken unless
# Q falls by more than its rounding (``ROUNDING`` relative to Q): Q's rise there (half
# the squared decrement) can be below its rounding, and a search that waits for Q to
# rise then accepts a step by the luck of the rounding.
NEAR = 1e-3
ROUNDING = 1e-13
# Within this many standard errors of Q's maximum a stalled decrement is taken to be
# rounding (the acceptance threshold of :mod:`ppl_em.steps.stats_newton`).
NOISE = 1e-6
STALL = 3
# Q's maximiser, by default: Newton stops once its decrement is below this many standard
# errors under Q (the default start asks for less).
DECREMENT_TOL = 1e-12


class NewtonResult(NamedTuple):
    """Where Newton stopped; ``final`` is ``(Q, grad, decrement)`` at ``values`` where
    the last Hessian was taken there (the loop stopped before moving), else None."""

    values: np.ndarray
    moved: bool
    start_decrement: float
    final: tuple[float, np.ndarray, float] | None = None


def hessian(evaluate, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Q's Hessian at ``x``, symmetrised, from ``evaluate(x) -> (Q, grad)``: every
    variable differenced on its own (one set of all of them, :func:`grouped_hessian`)."""
    return grouped_hessian(evaluate, x, grad, [np.arange(x.size)])


def interacting(h: np.ndarray) -> list[np.ndarray]:
    """The sets of variables that a Hessian couples (connected through its nonzero
    entries), each in increasing order, ordered by their first variable."""
    linked = (h != 0) | (h.T != 0)
    seen, sets = np.zeros(h.shape[0], dtype=bool), []
    for first in range(h.shape[0]):
        if seen[first]:
            continue
        members, frontier = {first}, [first]
        while frontier:
            found = set(np.flatnonzero(linked[frontier.pop()]).tolist()) - members
            members |= found
            frontier.extend(found)
        members_arr = np.array(sorted(members))
        seen[members_arr] = True
        sets.append(members_arr)
    return sets


def grouped_hessian(evaluate, x: np.ndarray, grad: np.ndarray, sets) -> np.ndarray:
    """Q's Hessian where the variables fall into ``sets`` that do not interact
    (:func:`interacting`): the j-th variable of every set is differenced at once, each
    column read on its own set's rows, so a Hessian costs as many gradients as the
    largest set has variables (times the steps' adjustments, :func:`_columns`) instead
    of as many as there are variables."""
    h = np.zeros((x.size, x.size))
    for j in range(max(len(members) for members in sets)):
        group = [members for members in sets if len(members) > j]
        for members, column in zip(group, _columns(evaluate, x, grad, group, j), strict=True):
            h[members, members[j]] = column
    return 0.5 * (h + h.T)


def _columns(evaluate, x: np.ndarray, grad: np.ndarray, group, j: int) -> list[np.ndarray]:
    """``dgrad / dx_i`` for each set's j-th variable ``i``, read on the set's rows, by a
    forward difference of about 1e-4 standard errors of ``x_i`` (``1e-4 /
    sqrt(|d2Q/dx_i^2|)``): a step fixed in ``x``'s units would be far too long for a
    mean measured in units of 1e-8, and the cross-derivatives would be wrong. Each step
    starts at ``1e-5 * max(1, |x_i|)``, grows until the gradient's change stands clear
    of its rounding, shrinks where Q is not finite, and is then set to that size. The
    sets' gradients do not move each other's, so all variables still unsettled move at
    once (a Q that is not finite shrinks all their steps)."""
    index = np.array([members[j] for members in group])
    step = 1e-5 * np.maximum(1.0, np.abs(x[index]))
    settled = np.zeros(index.size, dtype=bool)
    out: list = [None] * index.size
    for _ in range(10):
        todo = [m for m in range(index.size) if out[m] is None]
        if not todo:
            break
        moved = x.copy()
        moved[index[todo]] += step[todo]
        q, grad_moved = evaluate(moved)
        if not np.isfinite(q):
            step[todo] /= 1e3
            continue
        for m in todo:
            i, change = index[m], grad_moved - grad
            if not abs(change[i]) > 1e-8 * abs(grad[i]):
                step[m] *= 1e3
                continue
            ideal = 1e-4 / np.sqrt(abs(change[i]) / step[m])
            if settled[m] or ideal >= 0.1 * step[m]:
                out[m] = change[group[m]] / step[m]
            else:
                step[m], settled[m] = ideal, True
    return [
        np.zeros(len(members)) if c is None else c for members, c in zip(group, out, strict=True)
    ]


def partial_hessian(evaluate, x, grad, known: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Q's Hessian with its entries among the variables ``known`` given (``exact``) and
    the rest from forward differences along the other variables: one gradient per
    unknown variable instead of one per variable."""
    h = np.array(exact, dtype=float)
    others = np.flatnonzero(~known)
    if others.size:
        whole = [np.arange(x.size)]
        cols = np.stack([_columns(evaluate, x, grad, whole, i)[0] for i in others], axis=1)
        h[:, others], h[others, :] = cols, cols.T
        block = cols[others]
        h[np.ix_(others, others)] = 0.5 * (block + block.T)
    return h


def newton_direction(h: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, float]:
    """The ascent direction ``(-H)^-1 g`` (with -H's eigenvalues floored in the scaled
    coordinates) and the Newton decrement. Non-finite Hessian entries (a component
    collapsing onto a point) count as 0: that direction then gets a gradient step."""
    h = np.where(np.isfinite(h), h, 0.0)
    grad = np.where(np.isfinite(grad), grad, 0.0)
    diag = np.abs(np.diag(h))
    usable = np.isfinite(diag) & (diag > 0)
    scale = np.where(usable, 1.0 / np.sqrt(np.where(usable, diag, 1.0)), 1.0)
    neg = -(scale[:, None] * h * scale[None, :])
    values, vectors = np.linalg.eigh(0.5 * (neg + neg.T))
    values = np.maximum(values, EIGEN_FLOOR)
    g = scale * grad
    step = vectors @ ((vectors.T @ g) / values)
    decrement = float(np.sqrt(max(g @ step, 0.0)))
    length = float(np.linalg.norm(step))
    if length > MAX_STEP:
        step *= MAX_STEP / length
    return scale * step, decrement


def newton_maximise(
    evaluate,
    probe,
    start: np.ndarray,
    grad_reduction: float,
    max_iter: int = 100,
    tol: float = DECREMENT_TOL,
    curvature=None,
) -> NewtonResult:
    """Damped Newton from ``start`` until the decrement has shrunk by ``grad_reduction``
    (0: below ``tol``, Q's maximiser); each step is halved until Q rises. ``evaluate``
    and ``probe`` both give ``(Q, grad)``; the Hessian is ``curvature(x, grad)`` where
    given, else forward differences of ``probe``'s gradient."""
    x = start
    q, grad = evaluate(x)
    seen, final = [], None
    for _ in range(max_iter):
        h = hessian(probe, x, grad) if curvature is None else curvature(x, grad)
        direction, decrement = newton_direction(h, grad)
        seen.append(decrement)
        final = (q, grad, decrement)
        if decrement <= max(grad_reduction * seen[0], tol) or _at_noise_floor(seen):
            break
        found = _line_search(evaluate, x, q, grad, direction, decrement < NEAR)
        if found is None:
            break
        x, q, grad = found
        final = None
        # A generalised step asks only that the gradient shrink by grad_reduction. Read
        # with the Hessian just used (Q's curvature barely changes over one step), that
        # needs no new Hessian, which costs a pass over the data per variable.
        if grad_reduction > 0 and newton_direction(h, grad)[1] <= grad_reduction * seen[0]:
            break
    return NewtonResult(x, x is not start, seen[0] if seen else 0.0, final)


def _at_noise_floor(seen: list[float]) -> bool:
    """Within ``NOISE`` standard errors of Q's maximum, what is left of the decrement is
    the rounding of Q's gradient (a sum over thousands of observations), which no further
    step reduces: without this stop every remaining iteration spends a Hessian and its
    line search on rounding. A Newton step there makes the decrement fall (quadratically
    with the exact Hessian, by the Hessian's relative error with a finite-difference
    one), so one that rose from below ``NOISE`` is rounding, as is one that has not
    fallen by a tenth in three steps (with that rule alone, the negative-binomial
    regression's start computed seven Hessians at 1e-10 to 3e-9, where the rise stops
    it at the second: benchmarks/README.md)."""
    if len(seen) < 2 or not seen[-1] < NOISE:
        return False
    rose = seen[-2] < NOISE and seen[-1] >= seen[-2]
    return rose or (len(seen) > STALL and seen[-1] > 0.9 * seen[-1 - STALL])


def _line_search(evaluate, x, q, grad, direction, near: bool):
    """``(x', Q', grad')`` along the Newton step: halved until Q rises (a full step
    ``near`` the maximum: unless Q falls by more than its rounding). A full step is
    doubled while Q keeps rising and its slope along the step has kept more than half
    its start (Q is less curved along it than the Hessian said: far from the maximum
    along a log-scale, Newton's step is a fixed fraction of the way, and doubling covers
    the rest in a few evaluations instead of dozens of iterations). The slope, not Q,
    says when to stop: next to the maximum the full step lands on it, where the slope is
    0, and a doubled one at its mirror image, which Q's rounding can make look higher
    (the Poisson regression's start M-step overshot so, back and forth: 149 evaluations
    of Q where 9 now do)."""
    slack = ROUNDING * max(1.0, abs(q))
    t = 1.0
    for _ in range(HALVINGS):
        q_new, grad_new = evaluate(x + t * direction)
        taken = q_new > q or (near and t == 1.0 and q_new >= q - slack)
        if np.isfinite(q_new) and taken:
            break
        t *= 0.5
    else:
        return None
    best = (x + t * direction, q_new, grad_new)
    slope = float(grad @ direction)
    for _ in range(DOUBLINGS if t == 1.0 else 0):
        if not float(best[2] @ direction) > 0.5 * slope:
            break
        t *= 2.0
        q_far, grad_far = evaluate(x + t * direction)
        if not (np.isfinite(q_far) and q_far > best[1]):
            break
        best = (x + t * direction, q_far, grad_far)
    return best
