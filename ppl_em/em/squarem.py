"""SQUAREM acceleration of EM (Varadhan & Roland 2008, scheme SqS3), as pure functions.

One cycle from ``theta0`` takes two EM steps, ``theta1 = F(theta0)`` and
``theta2 = F(theta1)``, and extrapolates along the squared-iteration direction::

    r = theta1 - theta0,  v = theta2 - 2 theta1 + theta0,  alpha = -|r| / |v|
    theta' = theta0 - 2 alpha r + alpha^2 v

with ``alpha <= -1`` (``alpha = -1`` gives ``theta' = theta2``). A final EM step from
``theta'`` stabilises the extrapolation, as in the paper's algorithm. Safeguard: when
the extrapolated point's objective is below that of the plain EM point ``theta2`` (or
not finite) the cycle returns ``theta2``, so the objective never decreases.

The extrapolation runs on the flat unconstrained vector ``u``, where every point is a
valid parameter (simplex, positivity and bounds are handled by the transforms).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.em.step import EMData, EMState, em_init, em_step
from ppl_em.errors import DataError
from ppl_em.options import ACCELERATORS
from ppl_em.steps.mstep import MStepConfig


class SquaremCycle(NamedTuple):
    """Result of one SQUAREM cycle: the new state and what it cost."""

    state: EMState
    n_estep: int
    extrapolated: bool
    alpha: float


def squarem_alpha(r: np.ndarray, v: np.ndarray) -> float:
    """SqS3 step length ``-|r| / |v|``, capped at -1 (plain EM) from above."""
    vv = float(v @ v)
    if not np.isfinite(vv) or vv == 0.0:
        return -1.0
    return min(-np.sqrt(float(r @ r) / vv), -1.0)


def extrapolate(u0: np.ndarray, u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, float]:
    """The SqS3 point from three successive EM iterates, and its ``alpha``."""
    r = u1 - u0
    v = (u2 - u1) - r
    alpha = squarem_alpha(r, v)
    return u0 - 2.0 * alpha * r + alpha**2 * v, alpha


def squarem_step(
    functions: EMFunctions,
    config: MStepConfig,
    state: EMState,
    data: EMData | None = None,
    keep_resp: bool = True,
) -> SquaremCycle:
    """One SQUAREM cycle from ``state``: 2 EM steps, then extrapolation + 1 EM step, or
    the plain second EM step when extrapolation would lower the objective
    (``data`` and ``keep_resp`` as in :func:`ppl_em.em.step.em_step`)."""
    s1 = em_step(functions, config, state, data, keep_resp)
    s2 = em_step(functions, config, s1, data, keep_resp)
    u_x, alpha = extrapolate(state.u, s1.u, s2.u)
    if alpha == -1.0 or not np.all(np.isfinite(u_x)):
        return SquaremCycle(s2, 2, False, alpha)
    try:
        s_x = em_init(functions, u_x, config, data, keep_resp)
    except DataError:
        # An extrapolated point can leave the data's support (e.g. a rate -> inf).
        return SquaremCycle(s2, 3, False, alpha)
    if not s_x.objective >= s2.objective:
        return SquaremCycle(s2, 3, False, alpha)
    s_new = em_step(functions, config, s_x, data, keep_resp)
    # EM never decreases the objective; the max guards against round-off in the M-step.
    best = s_new if s_new.objective >= s_x.objective else s_x
    return SquaremCycle(best, 4, True, alpha)


def plain_step(
    functions: EMFunctions,
    config: MStepConfig,
    state: EMState,
    data: EMData | None = None,
    keep_resp: bool = True,
) -> SquaremCycle:
    """One plain EM iteration in the same return type as :func:`squarem_step`."""
    return SquaremCycle(em_step(functions, config, state, data, keep_resp), 1, False, -1.0)


def stepper(accelerate: str | None):
    """The cycle function for ``accelerate`` in ``ACCELERATORS`` (``"auto"`` takes plain
    EM steps; the loop adds its marginal ascents)."""
    if accelerate not in ACCELERATORS:
        raise ValueError(
            f"accelerate={accelerate!r} is not one of {ACCELERATORS}: None is plain EM."
        )
    return squarem_step if accelerate == "squarem" else plain_step
