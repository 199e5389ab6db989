"""EM as pure ``init`` and ``step`` functions over a small state; the loop is separate.

In the style of blackjax: ``em_init(functions, u)`` evaluates the E-step at ``u``;
``em_step(functions, config, state)`` does one M-step from the state's
responsibilities and the E-step at the new point. ``run_em`` iterates them, records
the objective and decides convergence.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ppl_em.compile import EMFunctions
from ppl_em.errors import ConvergenceWarning, DataError, NonMonotoneWarning
from ppl_em.mstep import MStepConfig, mstep
from ppl_em.progress import Progress

# EM's ascent is exact in theory; a decrease below this (relative) is round-off or the
# tolerance of the numeric inner optimiser, not a failure of monotonicity.
MONOTONE_SLACK = 1e-9


class EMState(NamedTuple):
    u: np.ndarray
    log_resp: np.ndarray
    loglik: float
    logprior: float
    objective: float


class EMRun(NamedTuple):
    state: EMState
    history: np.ndarray
    n_iter: int
    converged: bool
    monotone: bool


def _nonfinite_message(functions: EMFunctions, log_resp: np.ndarray) -> str:
    rows = np.flatnonzero(~np.all(np.isfinite(log_resp), axis=1))
    graph = functions.graph
    where = f"observation {int(rows[0])}" if rows.size else "the log prior"
    names = ", ".join(rv.name for rv in graph.dependents)
    return (
        f"the log-likelihood is not finite at {where} of {names!r}: no component can "
        "produce that value at the current parameters. Check the data lie in the "
        "components' support and that start values are valid."
    )


def em_init(functions: EMFunctions, u: np.ndarray) -> EMState:
    """E-step at ``u``: responsibilities and objective."""
    log_resp, loglik, logprior = functions.estep(u, *functions.data)
    loglik, logprior = float(loglik), float(logprior)
    objective = loglik + logprior if functions.mode == "map" else loglik
    if not np.isfinite(objective):
        raise DataError(_nonfinite_message(functions, log_resp))
    return EMState(u, log_resp, loglik, logprior, objective)


def em_step(functions: EMFunctions, config: MStepConfig, state: EMState) -> EMState:
    """One EM iteration: M-step from ``state``'s responsibilities, then the E-step."""
    return em_init(functions, mstep(functions, config, state.u, np.exp(state.log_resp)))


def run_em(
    functions: EMFunctions,
    config: MStepConfig,
    u0: np.ndarray,
    *,
    max_iter: int = 1000,
    tol: float = 1e-8,
    progressbar: bool = False,
) -> EMRun:
    """Iterate until the objective changes by less than ``tol * |objective|``."""
    state = em_init(functions, u0)
    history, converged, monotone = [state.objective], False, True
    with Progress(max_iter, enabled=progressbar) as bar:
        for _ in range(max_iter):
            new = em_step(functions, config, state)
            delta = new.objective - state.objective
            scale = max(1.0, abs(new.objective))
            if delta < -MONOTONE_SLACK * scale:
                monotone = False
            history.append(new.objective)
            state = new
            bar.update(state.objective)
            if abs(delta) <= tol * scale:
                converged = True
                break
    n_iter = len(history) - 1
    if not monotone:
        warnings.warn(
            "the EM objective decreased between iterations by more than round-off; with a "
            "numeric M-step this means the inner optimiser stopped early. Try mstep='auto' "
            "or a smaller tol, and inspect result.history.",
            NonMonotoneWarning,
            stacklevel=3,
        )
    if not converged:
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (last change "
            f"{history[-1] - history[-2]:.3g}). Increase max_iter, loosen tol, or try "
            "other starts with n_init>1; slow convergence often means overlapping or "
            "unidentified components.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return EMRun(state, np.asarray(history), n_iter, converged, monotone)
