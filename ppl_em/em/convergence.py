"""When EM has converged: the objective has stopped moving, and the optimum is near.

A small last step is not enough: EM converges linearly, and where it crawls (rate r
near 1, overlapping components) a step of d leaves about ``d r / (1 - r)`` still to
gain. Aitken's extrapolation (McLachlan & Peel 2000, section 2.11) estimates that gap
from the ratio of successive increases. Near the optimum the objective is quadratic,
``gap ~ delta' I delta / 2`` for a parameter error ``delta`` and information ``I``, so a
gap below ``gap_tol`` nats puts every parameter within ``sqrt(2 gap_tol)`` of its
standard errors of the optimum, in any units: the default 5e-7 nats means 1e-3
standard errors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Changes of the objective below this (relative to it) are its rounding: ratios of such
# changes say nothing about the rate.
ROUNDING = 1e-13
# Default gap: parameters within 1e-3 standard errors of the optimum (module docstring).
GAP_TOL = 5e-7


class Stopping(NamedTuple):
    """The stopping rule's state: the last rate of convergence measured clear of
    rounding (None before there is one)."""

    rate: float | None = None


def _floor(objective: float) -> float:
    return ROUNDING * max(1.0, abs(objective))


def update(stopping: Stopping, history: list[float]) -> Stopping:
    """The rate ``r = d_k / d_{k-1}`` of the last two increases, when both stand clear
    of rounding and ``0 <= r < 1``; the previous rate otherwise."""
    if len(history) < 3:
        return stopping
    d_prev, d_last = history[-2] - history[-3], history[-1] - history[-2]
    clear = 100 * _floor(history[-1])
    if d_prev > clear and d_last > clear and 0.0 <= d_last / d_prev < 1.0:
        return Stopping(d_last / d_prev)
    return stopping


def gap(stopping: Stopping, history: list[float]) -> float:
    """Aitken's estimate of what the objective has still to gain after its last value
    (unknown, so infinite, before a step has been measured: a run cut short right
    after a marginal ascent)."""
    if len(history) < 2:
        return np.inf
    d_last = history[-1] - history[-2]
    if abs(d_last) <= _floor(history[-1]):
        # The objective no longer moves measurably: the rate, if known, says how far
        # that can still be from the optimum; a step at rounding with no rate is none.
        rate = 0.5 if stopping.rate is None else stopping.rate
        return abs(d_last) * rate / (1.0 - rate)
    if stopping.rate is None:
        return np.inf
    # |d|: a floored update (reg_covar) can lower the objective; it still has to settle.
    return abs(d_last) * stopping.rate / (1.0 - stopping.rate)


def converged(stopping: Stopping, history: list[float], tol: float, gap_tol: float) -> bool:
    """The last change is below ``tol`` relative to the objective and the estimated
    remaining gain below ``gap_tol`` nats."""
    d_last = history[-1] - history[-2]
    small = abs(d_last) <= tol * max(1.0, abs(history[-1]))
    return small and gap(stopping, history) <= gap_tol
