"""The EM loop: iterate a step function, record the objective, decide convergence."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.em import convergence
from ppl_em.em.marginal import FIRST, SPACING, ascends, crawling, marginal_ascent, statistics_cover
from ppl_em.em.progress import Progress
from ppl_em.em.squarem import SquaremCycle, stepper
from ppl_em.em.step import EMData, EMState, em_data, em_init
from ppl_em.errors import ConvergenceWarning, NonMonotoneWarning
from ppl_em.steps.estep import one_blas_thread
from ppl_em.steps.mstep import MStepConfig
from ppl_em.steps.numeric import scaled_gradient

# EM's ascent is exact in theory; a decrease below this (relative) is round-off or the
# tolerance of the numeric inner optimiser, not a failure of monotonicity.
MONOTONE_SLACK = 1e-9
# A numeric M-step that leaves u where it is, although Q's gradient there is this many
# standard errors (scaled coordinates, ppl_em.steps.numeric) from zero, has stalled.
STALL_TOL = 1e-3


class EMRun(NamedTuple):
    """A run's last state, objective history and verdict; ``stalled`` is the scaled
    gradient norm where a numeric M-step stopped moving (None if it never did)."""

    state: EMState
    history: np.ndarray
    n_iter: int
    converged: bool
    monotone: bool
    n_estep: int = 0
    stalled: float | None = None


def _stalled_step(step, functions, config, state, data) -> tuple[SquaremCycle, float | None]:
    """One cycle; if the numeric M-step left its variables unchanged (whatever the
    closed-form ones did), one more with Q's exact maximiser, and if that too leaves
    them, the scaled gradient norm when it exceeds ``STALL_TOL`` (else None: they are
    at a fixed point of EM)."""
    mask = config.numeric_mask
    cycle = step(functions, config, state, data, keep_resp=False)
    if not (mask.any() and np.array_equal(cycle.state.u[mask], state.u[mask])):
        return cycle, None
    cycle = step(functions, config._replace(grad_reduction=0.0), state, data, keep_resp=False)
    if not np.array_equal(cycle.state.u[mask], state.u[mask]):
        return cycle, None
    _, q_functions, batches = data.expectations(functions, data.final(functions, state))
    norm = scaled_gradient(q_functions, state.u, mask, batches)
    return cycle, (norm if norm > STALL_TOL else None)


def _nats(gap: float) -> str:
    return f"{gap:.3g} nats" if np.isfinite(gap) else "not yet measured"


def _warn(history: list, monotone: bool, converged: bool, max_iter: int, gap, stalled) -> None:
    if not monotone:
        warnings.warn(
            "the EM objective decreased between iterations by more than round-off. With "
            "reg_covar > 0 that is expected (the floored update is not the likelihood's "
            "M-step, as in scikit-learn); otherwise a numeric M-step's inner optimiser "
            "went astray: try mstep='auto' or a smaller tol, and inspect result.history.",
            NonMonotoneWarning,
            stacklevel=4,
        )
    if stalled is not None:
        warnings.warn(
            f"the numeric M-step stalled after {len(history) - 1} iterations: Q's "
            f"gradient is {stalled:.3g} standard errors from zero but neither the "
            "generalised nor the exact M-step raises Q. The fit is not at a stationary "
            "point (converged=False). Try other starts (n_init>1) or a prior that keeps "
            "the parameters off their support's boundary.",
            ConvergenceWarning,
            stacklevel=4,
        )
    elif not converged:
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations (last change "
            f"{history[-1] - history[-2]:.3g}, estimated gain still to come "
            f"{_nats(gap)}). Increase max_iter, try accelerate='squarem' or other "
            "starts with n_init>1; slow convergence often means overlapping or "
            "unidentified components.",
            ConvergenceWarning,
            stacklevel=4,
        )


def _ascend(functions, config, state, data, history: list, gap_tol: float):
    """A marginal ascent from ``state`` (:mod:`ppl_em.em.marginal`): ``(state, whether
    to try again, E-steps)``; its state enters ``history`` if it is higher. The rate EM
    measured stays (EM's next steps, not the ascent's jump, measure it again); one that
    gained less than ``gap_tol`` is the last."""
    ascent = marginal_ascent(functions, config, state, data)
    gain = ascent.state.objective - state.objective
    if gain > 0:
        state = ascent.state
        history.append(state.objective)
    return state, gain > gap_tol, ascent.n_estep


def run_em(
    functions: EMFunctions,
    config: MStepConfig,
    u0: np.ndarray,
    *,
    data: EMData | None = None,
    max_iter: int = 1000,
    tol: float = 1e-8,
    gap_tol: float = convergence.GAP_TOL,
    progressbar: bool = False,
    accelerate: str | None = "auto",
) -> EMRun:
    """Iterate until the objective changes by less than ``tol * |objective|`` and its
    estimated remaining gain is below ``gap_tol`` nats (:mod:`ppl_em.em.convergence`).

    ``data`` (default: all the data ``functions`` hold, as one chunk) is built once; a
    :class:`ppl_em.em.mapped.StatsMap` runs the same loop over data streamed or on a
    cluster (its last state then holds no N x K log-responsibilities);
    ``accelerate="squarem"`` iterates SQUAREM cycles (each up to 4 E-steps) instead of
    single EM steps; ``max_iter`` then counts cycles and ``EMRun.n_estep`` the E-steps.
    A numeric M-step that stops moving away from a stationary point ends the run
    unconverged (``EMRun.stalled``). With ``accelerate="auto"``, where EM's rate
    predicts a long crawl (or, with a numeric M-step, more iterations than an ascent
    costs), L-BFGS on the marginal objective takes over for a while
    (:mod:`ppl_em.em.marginal`: where the M-step is not all closed form, and not with
    ``reg_covar``); each ascent that raises the objective is one entry of ``history``
    (and of ``n_iter``), and its E-steps count in ``n_estep``. ``accelerate=None``
    takes EM steps only.
    """
    step = stepper(accelerate)
    data = em_data(functions, config) if data is None else data
    state = em_init(functions, u0, config, data, keep_resp=False)
    history, monotone, n_estep = [state.objective], True, 1
    converged, stalled, stopping = False, None, convergence.Stopping()
    since, ascend = 0, accelerate == "auto" and ascends(config)  # rate from history[since:]
    numeric = bool(config.numeric_mask.any())  # an M-step over the data: dear iterations
    # Q over the data compiled anyway, or not needed by an ascent
    q_compiled = numeric or statistics_cover(config, u0.size)
    # One BLAS thread for the whole run, not only its E-steps: the M-step's and the
    # ascent's linear algebra is small (Newton's Hessians, L-BFGS-B's updates), and
    # OpenBLAS's second thread, spinning on a busy machine, made each call milliseconds.
    with one_blas_thread(functions.blas), Progress(max_iter, enabled=progressbar) as bar:
        for count in range(1, max_iter + 1):
            cycle, stalled = _stalled_step(step, functions, config, state, data)
            new, n_estep = cycle.state, n_estep + cycle.n_estep
            if new.objective - state.objective < -MONOTONE_SLACK * max(1.0, abs(new.objective)):
                monotone = False
            history.append(new.objective)
            state = new
            bar.update(state.objective)
            stopping = convergence.update(stopping, history[since:])
            if stalled is not None:
                break
            if convergence.converged(stopping, history[since:], tol, gap_tol):
                converged = True
                break
            gap = convergence.gap(stopping, history[since:])
            cells = float(state.stats.nk.sum()) * state.stats.nk.size
            slow = crawling(
                stopping.rate, gap, gap_tol, q_compiled, cells, max_iter - count, numeric
            )
            if ascend and len(history) - since > (SPACING if since else FIRST) and slow:
                state, ascend, used = _ascend(functions, config, state, data, history, gap_tol)
                n_estep, since, q_compiled = n_estep + used, len(history) - 1, True
                bar.update(state.objective)
    gap = convergence.gap(stopping, history[since:])
    _warn(history, monotone, converged, max_iter, gap, stalled)
    state = data.final(functions, state)
    n_iter = len(history) - 1
    return EMRun(state, np.asarray(history), n_iter, converged, monotone, n_estep, stalled)
