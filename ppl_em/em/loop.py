"""The EM loop: iterate a step function, record the objective, decide convergence."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.em.progress import Progress
from ppl_em.em.squarem import stepper
from ppl_em.em.step import EMData, EMState, em_data, em_init, with_log_resp
from ppl_em.errors import ConvergenceWarning, NonMonotoneWarning
from ppl_em.steps.mstep import MStepConfig

# EM's ascent is exact in theory; a decrease below this (relative) is round-off or the
# tolerance of the numeric inner optimiser, not a failure of monotonicity.
MONOTONE_SLACK = 1e-9


class EMRun(NamedTuple):
    state: EMState
    history: np.ndarray
    n_iter: int
    converged: bool
    monotone: bool
    n_estep: int = 0


def _warn(history: list, monotone: bool, converged: bool, max_iter: int) -> None:
    if not monotone:
        warnings.warn(
            "the EM objective decreased between iterations by more than round-off. With "
            "reg_covar > 0 that is expected (the floored update is not the likelihood's "
            "M-step, as in scikit-learn); otherwise a numeric M-step's inner optimiser "
            "went astray: try mstep='auto' or a smaller tol, and inspect result.history.",
            NonMonotoneWarning,
            stacklevel=4,
        )
    if not converged:
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (last change "
            f"{history[-1] - history[-2]:.3g}). Increase max_iter, loosen tol, or try "
            "other starts with n_init>1; slow convergence often means overlapping or "
            "unidentified components.",
            ConvergenceWarning,
            stacklevel=4,
        )


def run_em(
    functions: EMFunctions,
    config: MStepConfig,
    u0: np.ndarray,
    *,
    data: EMData | None = None,
    max_iter: int = 1000,
    tol: float = 1e-8,
    progressbar: bool = False,
    accelerate: str | None = None,
) -> EMRun:
    """Iterate until the objective changes by less than ``tol * |objective|``.

    ``data`` (default: all the data ``functions`` hold, as one chunk) is built once;
    ``accelerate="squarem"`` iterates SQUAREM cycles (each up to 4 E-steps) instead of
    single EM steps; ``max_iter`` then counts cycles and ``EMRun.n_estep`` the E-steps.
    """
    step = stepper(accelerate)
    data = em_data(functions, config) if data is None else data
    state = em_init(functions, u0, config, data, keep_resp=False)
    history, converged, monotone, n_estep = [state.objective], False, True, 1
    with Progress(max_iter, enabled=progressbar) as bar:
        for _ in range(max_iter):
            cycle = step(functions, config, state, data, keep_resp=False)
            new, n_estep = cycle.state, n_estep + cycle.n_estep
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
    _warn(history, monotone, converged, max_iter)
    state = with_log_resp(functions, state, data)
    return EMRun(state, np.asarray(history), len(history) - 1, converged, monotone, n_estep)
