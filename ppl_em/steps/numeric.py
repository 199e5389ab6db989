"""The numeric part of an M-step: increase Q over the numeric variables.

L-BFGS is not invariant to the units of the variables: a mean measured in units of
1e8 has a curvature of Q some 1e16 times smaller than a log-scale's, and an optimiser
that treats both alike stops before the mean moves. So the search runs in coordinates
scaled by each variable's curvature of Q at the start (``z_i = (u_i - u0_i) / s_i``,
``s_i = (-d2Q/du_i^2)^(-1/2)``, forward differences of Q's gradient): one unit of ``z``
is about one standard error of that variable under Q, whatever the data's units, and
both stopping rules (the gradient shrunk by ``grad_reduction``, or ``gtol``) are read in
those units.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

from ppl_em.compiled.functions import EMFunctions
from ppl_em.steps.estep import q_and_grad
from ppl_em.steps.newton import DECREMENT_TOL, newton_maximise, partial_hessian


class NumericResult(NamedTuple):
    """The new numeric entries; whether Q rose (False: they came back unchanged); the
    norm of Q's gradient at the start in the scaled coordinates (about the standard
    errors by which the start is off Q's maximum)."""

    values: np.ndarray
    moved: bool
    start_grad_norm: float


def _curvature(evaluate, start: np.ndarray, grad0: np.ndarray, i: int) -> float:
    """``-d2Q/du_i^2`` by a forward difference of the gradient, the step grown until the
    gradient's change stands clear of its rounding (a mean in units of 1e8 needs a step
    of hundreds) and shrunk if Q is not finite there."""
    step = 1e-4 * max(1.0, abs(start[i]))
    for _ in range(6):
        x = start.copy()
        x[i] += step
        q, grad = evaluate(x)
        if not np.isfinite(q):
            step /= 1e3
            continue
        change = grad[i] - grad0[i]
        if abs(change) > 1e-8 * abs(grad0[i]):
            return -change / step
        step *= 1e3
    return 0.0


def curvature_scales(
    evaluate, start: np.ndarray, grad0: np.ndarray, known: np.ndarray | None = None
) -> np.ndarray:
    """``s_i = (-d2Q/du_i^2)^(-1/2)`` from ``evaluate(x) -> (Q, grad)``, using
    ``|d2Q/du_i^2|`` where Q is not concave along ``u_i``; at most ``1 / |dQ/du_i|``,
    so that far from Q's maximum, where Q is nearly linear and its curvature says
    little, one unit moves Q by about one nat; 1 where neither is finite and positive
    (the variable does not move Q). ``known`` gives ``d2Q/du_i^2`` where it is written
    out (NaN elsewhere): a difference costs a gradient of Q over the data."""
    # No floor relative to the other variables: their units differ (a mean in units of
    # 1e8 has a curvature 1e16 times a log-scale's), so only the variable's own says.
    known = np.full(start.size, np.nan) if known is None else known
    curv = np.abs([known[i] if np.isfinite(known[i]) else _curvature(evaluate, start, grad0, i)
                   for i in range(start.size)])  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.minimum(1.0 / np.sqrt(curv), 1.0 / np.abs(grad0))
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)


# Numeric blocks up to this size take Newton steps: a finite-difference Hessian costs
# one gradient of Q per variable, cheap beside the L-BFGS iterations it saves.
NEWTON_MAX = 32
# An exact M-step re-measures the curvature where the last L-BFGS run ended, at most
# this many times: Q's curvature can change by orders of magnitude on the way (a mean's
# curvature is N/sigma^2, and sigma may fall from 1 to 1e-8 within one M-step).
ROUNDS = 6


class _Tracked:
    """Q over the numeric entries, remembering the best point L-BFGS has seen: when Q
    is unbounded (a collapsing component) L-BFGS can end on a non-finite point after
    finite progress. ``probe`` evaluates without remembering (the curvature's
    finite-difference points are not steps)."""

    def __init__(self, q, u: np.ndarray, mask: np.ndarray):
        self._args = (q, u.copy(), mask)
        self.best_q, self.best_x = -np.inf, None

    def probe(self, sub: np.ndarray):
        q_of, full, mask = self._args
        full[mask] = sub
        q, grad = q_of(full)
        if not np.isfinite(q):
            return -np.inf, np.zeros_like(sub)
        return float(q), grad[mask]

    def __call__(self, sub: np.ndarray):
        q, grad = self.probe(sub)
        if q > self.best_q:
            self.best_q, self.best_x = q, sub.copy()
        return q, grad


def _lbfgs_round(evaluate, start, grad0, grad_reduction, maxiter, gtol) -> float:
    """One L-BFGS run from ``start`` in coordinates scaled by the curvature there;
    returns the scaled gradient norm at ``start``."""
    scales = curvature_scales(evaluate.probe, start, grad0)
    seen = {"grad": scales * grad0}
    start_norm = float(np.linalg.norm(seen["grad"]))
    enough = grad_reduction * start_norm

    def negative_q(z: np.ndarray):
        q, grad = evaluate(start + scales * z)
        seen["grad"] = scales * grad
        return (np.inf, np.zeros_like(z)) if not np.isfinite(q) else (-q, -seen["grad"])

    def callback(intermediate_result):
        # L-BFGS-B's line search ends by evaluating the accepted point.
        if np.linalg.norm(seen["grad"]) <= enough:
            raise StopIteration

    options = {"maxiter": maxiter, "gtol": gtol, "ftol": 1e-15}
    minimize(negative_q, np.zeros_like(start), jac=True, method="L-BFGS-B",
             callback=callback, options=options)  # fmt: skip
    return start_norm


class Stopping(NamedTuple):
    """When the numeric M-step stops (:func:`maximise_q`)."""

    grad_reduction: float
    maxiter: int = 500
    gtol: float = 1e-10
    decrement_tol: float = DECREMENT_TOL


def compiled_q(functions: EMFunctions, batches):
    """``q(u) -> (Q, dQ/du)``: the compiled Q summed over ``batches()``."""

    def q(full: np.ndarray):
        return q_and_grad(functions, full, batches())

    return q


def maximise_q(q, u: np.ndarray, mask: np.ndarray, stopping: Stopping,
               exact=None) -> NumericResult:  # fmt: skip
    """Increase ``q(u) -> (Q, dQ/du)`` over ``u[mask]`` from ``u``: stop once the scaled
    gradient has shrunk by ``stopping.grad_reduction`` (a generalised step) or, for 0,
    at Q's maximiser.

    Blocks of at most ``NEWTON_MAX`` variables take damped Newton steps
    (:mod:`ppl_em.steps.newton`; for 0, until the decrement is below
    ``stopping.decrement_tol`` standard errors), with the Hessian's entries among the
    variables ``exact(sub) -> (known, entries)`` knows exact and the rest from
    differences; larger ones L-BFGS runs, each in coordinates scaled by the curvature
    where the last one ended, while Q still rises.
    """
    grad_reduction, maxiter, gtol, decrement_tol = stopping
    evaluate = _Tracked(q, u, mask)
    start = u[mask]
    if start.size <= NEWTON_MAX:
        curvature = None
        if exact is not None:

            def curvature(x, grad):
                return partial_hessian(evaluate.probe, x, grad, *exact(x))

        found = newton_maximise(evaluate, evaluate.probe, start, grad_reduction, maxiter,
                                decrement_tol, curvature)  # fmt: skip
        return NumericResult(found.values, found.moved, found.start_decrement)
    q0, grad = evaluate(start)
    start_norm = None
    x, best = start, q0
    for _ in range(1 if grad_reduction > 0 else ROUNDS):
        norm = _lbfgs_round(evaluate, x, grad, grad_reduction, maxiter, gtol)
        start_norm = norm if start_norm is None else start_norm
        if evaluate.best_x is None or evaluate.best_q <= best:
            break
        x, best = evaluate.best_x, evaluate.best_q
        _, grad = evaluate(x)
    moved = best > q0
    return NumericResult(x if moved else start, moved, start_norm)


def scaled_gradient(functions: EMFunctions, u: np.ndarray, mask: np.ndarray, batches) -> float:
    """The norm of Q's gradient over ``u[mask]`` in the curvature-scaled coordinates: about
    how many standard errors ``u`` is off Q's maximum (0 at a fixed point of EM)."""

    q = compiled_q(functions, batches)

    def evaluate(sub: np.ndarray):
        full = u.copy()
        full[mask] = sub
        value, grad = q(full)
        return float(value), grad[mask]

    _, grad = evaluate(u[mask])
    return float(np.linalg.norm(curvature_scales(evaluate, u[mask], grad) * grad))
