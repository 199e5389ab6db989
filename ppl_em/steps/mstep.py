"""The M-step: one entry point, ``m_step(functions, config, u, expectations) -> u``.

Closed-form blocks read only the E-step's additive statistics; MvNormal blocks map
their weighted moments back to the free variables; the remaining (numeric) variables
increase Q by L-BFGS, with Q and its gradient summed over chunks of responsibilities.
Q is additive over blocks whose variables are disjoint, so updating the closed-form
blocks exactly and maximising Q over the rest (closed-form ones held fixed) gives the
same joint maximiser as a numeric M-step over everything
(``tests/test_mstep_agreement.py`` checks that on every family).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.compiled.stats_q import StatsQ, compile_stats_q
from ppl_em.errors import ClosedFormUnavailableError
from ppl_em.model.recognise import ClosedFormPlan
from ppl_em.options import MSTEPS
from ppl_em.steps.closed_form import Batches, closed_form_update
from ppl_em.steps.columns import StatsRequest, stats_request
from ppl_em.steps.estep import whole_data
from ppl_em.steps.glm import GlmSpec, glm_hessian, glm_specs, known, local
from ppl_em.steps.glm_q import scores_cover, written_q
from ppl_em.steps.mvn_moments import (
    moments_from_stats,
    moments_missing,
    moments_two_pass,
    pooled_covariance,
)
from ppl_em.steps.mvn_solve import MvnUpdate, compile_update, solve_params
from ppl_em.steps.newton import DECREMENT_TOL
from ppl_em.steps.numeric import Stopping, compiled_q, maximise_q
from ppl_em.steps.stats import DataChunk, Stats, stats_from_resp
from ppl_em.steps.stats_newton import block_statistics, statistics_update

# A numeric M-step stops once the gradient of Q has shrunk by this factor (a
# generalised EM step: Q increases, the fixed point is the same); a relative rule, unlike
# an iteration cap, still runs to the end when Q climbs steadily. benchmarks/README.md
# has the measurements against an exact M-step.
GEM_GRAD_REDUCTION = 0.1


class MStepConfig(NamedTuple):
    """What the M-step does: the closed-form plan, the MvNormal blocks' compiled maps,
    and L-BFGS settings for the numeric variables (``grad_reduction=0``: Q's maximiser,
    which Newton's steps reach once their decrement is below ``decrement_tol``
    standard errors under Q). ``written_q``: Q is written out
    (:func:`ppl_em.steps.glm_q.scores_cover`, decided once per model)."""

    plan: ClosedFormPlan
    numeric_mask: np.ndarray
    maxiter: int = 500
    gtol: float = 1e-10
    mvn: tuple[MvnUpdate, ...] = ()
    grad_reduction: float = GEM_GRAD_REDUCTION
    statistics: tuple[StatsQ, ...] = ()
    glm: tuple[GlmSpec, ...] = ()
    decrement_tol: float = DECREMENT_TOL
    written_q: bool = False


class Expectations(NamedTuple):
    """What the M-step reads from an E-step: the additive statistics, the request that
    says what their columns are, and the responsibilities chunk by chunk (``batches()``
    yields ``(gamma_t, chunk)``) for numeric blocks and moments the statistics cannot
    give accurately."""

    stats: Stats
    request: StatsRequest
    batches: Batches


def make_mstep_config(
    functions: EMFunctions,
    plan: ClosedFormPlan,
    mstep: str = "auto",
    grad_reduction: float = GEM_GRAD_REDUCTION,
) -> MStepConfig:
    """Choose closed-form and numeric variables for ``mstep`` in ``MSTEPS``."""
    if mstep not in MSTEPS:
        raise ValueError(f"mstep={mstep!r} is not one of {MSTEPS}.")
    if mstep == "numeric":
        plan = ClosedFormPlan((), frozenset(), dict(plan.reasons))
    if mstep == "closed" and plan.reasons:
        name, why = next(iter(plan.reasons.items()))
        raise ClosedFormUnavailableError(
            f"mstep='closed' but variable {name!r} has no closed-form update: {why}. "
            "Use mstep='auto' (closed form where possible, numeric elsewhere)."
        )
    layout = functions.layout
    mask = ~layout.mask(plan.closed | plan.from_statistics)
    mvn = tuple(compile_update(functions, spec) for spec in plan.mvn)
    stats_q = tuple(compile_stats_q(functions, block) for block in plan.statistics)
    glm = glm_specs(functions, plan.glm)
    return MStepConfig(plan=plan, numeric_mask=mask, mvn=mvn, grad_reduction=grad_reduction,
                       statistics=stats_q, glm=glm,
                       written_q=scores_cover(functions, plan, glm))  # fmt: skip


def with_reg_covar(config: MStepConfig, reg_covar: float) -> MStepConfig:
    """``config`` with ``reg_covar`` added to every closed-form Normal variance and
    MvNormal covariance diagonal (scikit-learn's floor against collapse)."""
    plan = config.plan
    blocks = tuple(
        b._replace(consts={**b.consts, "reg_covar": float(reg_covar)})
        if b.family == "normal" and "sigma" in b.slots
        else b
        for b in plan.blocks
    )
    mvn = tuple(spec._replace(reg_covar=float(reg_covar)) for spec in plan.mvn)
    return config._replace(plan=plan._replace(blocks=blocks, mvn=mvn))


def restarted(config: MStepConfig) -> MStepConfig:
    """``config`` for a new fit: where its blocks' Q switch from NumPy-backed Ops to C
    is decided by this fit alone (:class:`ppl_em.compiled.functions.SwitchingFunction`)."""
    return config._replace(statistics=tuple(sq.restarted() for sq in config.statistics))


def _set_closed(functions: EMFunctions, config: MStepConfig, u, current: dict,
                values: dict) -> np.ndarray:  # fmt: skip
    """``u`` with the closed-form variables set to the constrained ``values``;
    ``current`` holds every variable's constrained value at ``u``."""
    layout = functions.layout
    current = {**current, **values}
    forward = functions.unconstrain(u, *(current[n] for n in layout.rv_names))
    u = u.copy()
    for name, sl, value in zip(layout.rv_names, layout.slices, forward, strict=True):
        if name in config.plan.closed:
            u[sl] = np.reshape(value, -1)
    return u


def _mvn_target(functions, spec, update, u: np.ndarray, ex: Expectations, i: int):
    """Block i's weighted means and covariances (None if the statistics cannot give them
    accurately); with missing coordinates, Little and Rubin's conditional moments at
    the current parameters."""
    if not spec.missing:
        return moments_from_stats(ex.stats.nk, ex.stats, ex.request, i, spec.reg_covar)
    k, d = functions.graph.n_components, int(spec.mu.type.shape[1])
    current = update.params(u)
    mu, cov = current[: k * d].reshape(k, d), current[k * d :].reshape(k, d, d)
    mask = dict(functions.spec.masks)[spec.data_name]
    return moments_missing(ex.batches, spec.data_name, mask, ex.request.names, mu, cov,
                           spec.reg_covar)  # fmt: skip


def _mvn_blocks(functions, config: MStepConfig, u: np.ndarray, ex: Expectations):
    """Each MvNormal block: weighted moments mapped back to its free variables; a block
    whose map cannot reach them gets L-BFGS on Q for this step instead."""
    for i, (spec, update) in enumerate(zip(config.plan.mvn, config.mvn, strict=True)):
        target = _mvn_target(functions, spec, update, u, ex, i)
        if target is None:
            target = moments_two_pass(ex.batches, spec.data_name, ex.request.names, spec.reg_covar)
        if spec.tied:
            target = (target[0], pooled_covariance(ex.stats.nk, target[1]))
        new = solve_params(update, u, *target)
        if new is None:
            new = numeric_step(functions, config._replace(numeric_mask=update.mask), u, ex.batches)
        u = new
    return u


def _statistics_blocks(functions, config: MStepConfig, u: np.ndarray, ex: Expectations):
    """Each block maximised from the statistics by Newton's method; one Newton cannot
    finish gets the numeric step over the data instead."""
    first = len(config.plan.blocks)
    for i, (block, sq) in enumerate(zip(config.plan.statistics, config.statistics, strict=True)):
        arrays = block_statistics(ex.stats, ex.request, first + i, block, ex.batches)
        new = None if arrays is None else statistics_update(sq, u, arrays)
        if new is None:
            mask = np.zeros_like(config.numeric_mask)
            mask[sq.index] = True
            new = numeric_step(functions, config._replace(numeric_mask=mask), u, ex.batches)
        u = new
    return u


def closed_step(functions, config: MStepConfig, u: np.ndarray, ex: Expectations):
    """Replace the closed-form variables' entries of ``u`` by their exact update, and
    those of the blocks maximised from the statistics by theirs."""
    plan = config.plan
    if plan.blocks:
        current = dict(zip(functions.layout.rv_names, functions.constrain(u), strict=True))
        new = closed_form_update(plan, ex.stats, ex.request, current, functions.mode, ex.batches)
        u = _set_closed(functions, config, u, current, new)
    u = _statistics_blocks(functions, config, u, ex)
    return _mvn_blocks(functions, config, u, ex)


def numeric_step(functions: EMFunctions, config: MStepConfig, u: np.ndarray, batches: Batches):
    """Increase Q over the numeric variables (:func:`ppl_em.steps.numeric.maximise_q`),
    warm-started at ``u``; ``config.grad_reduction`` 0 gives Q's maximiser."""
    mask = config.numeric_mask
    if not mask.any():
        return u
    exact, coefficients = None, _written_rows(config, batches)
    if coefficients is not None:
        full = u.copy()

        def exact(sub):
            full[mask] = sub
            return coefficients, glm_hessian(config.glm, full, mask, batches)

    q = _q_over(functions, config, batches) or compiled_q(functions, batches)
    stopping = Stopping(config.grad_reduction, config.maxiter, config.gtol, config.decrement_tol)
    found = maximise_q(q, u, mask, stopping, exact)
    out = u.copy()
    out[mask] = found.values
    return out


def _q_over(functions: EMFunctions, config: MStepConfig, batches: Batches):
    """Q over ``batches`` written out (:mod:`ppl_em.steps.glm_q`) where the model allows
    and the responsibilities are here to read, else None (the compiled Q)."""
    if not (config.written_q and local(batches)):
        return None
    return lambda full: written_q(functions, config.glm, full, batches)


def _written_rows(config: MStepConfig, batches: Batches) -> np.ndarray | None:
    """Which numeric entries have Hessian rows written out (:func:`known`), or None where
    none do or the responsibilities are not here to read them (a cluster's workers)."""
    coefficients = known(config.glm, config.numeric_mask)
    return coefficients if coefficients is not None and local(batches) else None


def written_curvature(config: MStepConfig, u: np.ndarray, batches: Batches) -> np.ndarray | None:
    """``d2Q/du_i^2`` at ``u`` for the entries whose Hessian rows are written out
    (:mod:`ppl_em.steps.glm`: one pass over the data for all of them), NaN for the
    rest; None where there are none or the responsibilities are not here to read."""
    mask = config.numeric_mask
    coefficients = _written_rows(config, batches)
    if coefficients is None:
        return None
    diagonal = np.diag(glm_hessian(config.glm, u, mask, batches))
    out = np.full(u.size, np.nan)
    out[np.flatnonzero(mask)[coefficients]] = diagonal[coefficients]
    return out


def m_step(functions: EMFunctions, config: MStepConfig, u: np.ndarray, ex: Expectations):
    """One full M-step from an E-step's :class:`Expectations`; returns the new flat ``u``."""
    return numeric_step(functions, config, closed_step(functions, config, u, ex), ex.batches)


def expectations_from_resp(
    functions: EMFunctions, config: MStepConfig, gamma: np.ndarray, chunk: DataChunk | None = None
) -> Expectations:
    """:class:`Expectations` of given n x K responsibilities of ``chunk`` (default: all
    the data ``functions`` hold), e.g. a soft partition for a starting point; they count
    as many times as the chunk's observation weights say."""
    request = stats_request(
        config.plan, functions.data_names, functions.data, functions.graph.labels_per_row
    )
    if chunk is None:
        chunk = whole_data(functions, request)
    elif chunk.columns is None:
        chunk = chunk._replace(columns=request.columns(chunk.arrays))
    gamma_t = np.ascontiguousarray(np.asarray(gamma, dtype=float).T)
    if chunk.weights is not None:
        gamma_t = gamma_t * chunk.weights[None, :]
    stats = stats_from_resp(gamma_t.T, chunk.columns)
    return Expectations(stats, request, lambda: [(gamma_t, chunk)])


def m_step_from_resp(functions, config: MStepConfig, u: np.ndarray, gamma: np.ndarray):
    """One M-step from n x K responsibilities ``gamma`` of all the data."""
    return m_step(functions, config, u, expectations_from_resp(functions, config, gamma))
