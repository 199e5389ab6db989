"""Quasi-Newton on the marginal objective, where EM crawls or its iterations are dear.

EM's rate of convergence is the largest fraction of the information that the labels
hide. Where it is near 1 (a logistic-regression mixture with one 0/1 answer per
observation, the superfluous weights of a stick-breaking prior) EM needs thousands of
iterations. The marginal objective ``l(u)`` and its gradient are both at hand in EM's
own pieces: ``l`` is the E-step's objective, and by Fisher's identity
``dl/du = dQ(u' | u)/du'`` at ``u' = u``, the gradient of Q with the responsibilities
at ``u`` (the compiled ``q_and_grad`` of the numeric M-step; a regression mixture's Q
written out, :mod:`ppl_em.steps.glm_q`; or, where every variable is in a block
maximised from the statistics, those blocks' compiled Q of the E-step's sums).

:func:`marginal_ascent` runs L-BFGS on ``l`` from the point EM has reached, in
coordinates scaled by Q's curvature there (one unit is about one standard error under
the complete data, whatever the data's units), each evaluation one E-step and one Q
gradient. Its result is kept only if it raises ``l``, and the loop then resumes EM
from it, so a fit still converges only by EM's own stopping rule. Where the M-step is
numeric over the data an EM iteration costs a few such evaluations, so an ascent pays
for far shorter crawls, at any rate (:func:`crawling`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

from ppl_em.compiled.functions import EMFunctions
from ppl_em.em.convergence import ROUNDING
from ppl_em.em.step import EMData, EMState, em_init
from ppl_em.errors import DataError
from ppl_em.steps.estep import q_and_grad
from ppl_em.steps.glm import local
from ppl_em.steps.glm_q import written_q
from ppl_em.steps.mstep import MStepConfig, written_curvature
from ppl_em.steps.numeric import curvature_scales
from ppl_em.steps.stats_newton import block_statistics

# Without numeric variables (blocks maximised from the statistics: an iteration is one
# pass over the data, an E-step, and an ascent's evaluation at least that), EM crawls
# when its measured rate is above SLOW_RATE and that rate predicts more than CRAWL
# further iterations before the estimated gap falls below the tolerance. The rate was
# set on a negative-binomial regression mixture (rate 0.79), before numeric M-steps had
# NUMERIC_CRAWL: at 0.9 it took 92 EM iterations (N=10^5, 7.9 s), at 0.75 an ascent
# after 11 (12 in all, 3.2 s, as high); the other regression and mixture benchmarks
# ended the same (benchmarks/README.md).
SLOW_RATE = 0.75
CRAWL = 50
# Where an ascent needs Q's gradient over the data (a variable outside the statistics
# blocks) and nothing else compiles it (no numeric variables), an ascent is worth it
# only when the crawl it saves would take longer than this many seconds (compiling
# that gradient to C takes tens of seconds on a cold cache), or would not end within
# max_iter. The crawl's seconds are estimated, not timed, so that a fit's path does
# not depend on the machine's load: an iteration of such an M-step takes about
# ITERATION_SECONDS plus CELL_SECONDS per responsibility (observation x component):
# 5.3 ms at 300 x 4 and 39 ms at 10^4 x 20 (stick-breaking weights, Newton on the
# statistics; benchmarks/README.md).
COMPILE_WORTH = 20.0
ITERATION_SECONDS = 5e-3
CELL_SECONDS = 1.7e-7
# Where the M-step is numeric over the data, an EM iteration is an E-step, two or more
# Q gradients over the data and a Hessian (exact: one more pass; else a gradient per
# variable), and an ascent's 16-19 evaluations in the benchmark fits (an E-step and one
# Q gradient each; 40 in the logistic crawl) cost about ten such iterations: the ascent
# pays wherever EM's rate, however fast, predicts more than NUMERIC_CRAWL further
# iterations. Poisson regression mixture (N=10^5, rate 0.34): 22 iterations -> 5 with
# one ascent, passes over the data 115 -> 85, 0.46 -> 0.34-0.40 s; mixture of experts
# (N=10^4): 25 -> 5, passes 415 -> 208, 1.60-1.68 -> 0.72-0.86 s; both end higher
# (benchmarks/README.md, "Ascents where the M-step is numeric").
NUMERIC_CRAWL = 10
# EM iterations between two ascents: the rate is re-measured from EM's own steps.
SPACING = 10
# EM iterations before the first ascent: its rate measured twice. A logistic-regression
# mixture (N=10^5) crawls from its start, and waiting for SPACING iterations there cost
# 0.5 s of a 1.9 s fit, with the same optimum; a Student-t contamination (N=10^4) took
# 5 iterations instead of 33 and ended higher; where the crawl shows later
# (stick-breaking weights) the first ascent comes when it did (benchmarks/README.md).
FIRST = 3
# Evaluations (each an E-step and a Q gradient) per ascent.
MAX_EVALS = 300
# L-BFGS's memory in pairs. Where EM crawls the marginal objective is ill-conditioned in
# many directions at once (overlapping stick-breaking components), and SciPy's default
# of 10 pairs took 1.3-2x the E-steps (K=20, N=10^4: 2416 ascent evaluations and 113
# iterations against 1381 and 70); a pair costs O(size) arithmetic per iteration,
# nothing beside an evaluation's E-step.
MEMORY = 60
# Evaluations in a row that raise the objective by less than its rounding end an ascent:
# L-BFGS-B's own ftol stop needs an accepted step, and at the rounding floor its line
# search can fail to accept one for dozens of evaluations, as the gradient's last bits
# decide (a Poisson regression mixture, N=600, with the written gradient and the
# compiled Q's curvature scales: 25 after the last measurable gain;
# benchmarks/README.md, "Q of regression mixtures written out").
STALE = 10
# The ascent stays within this many standard errors (complete data) of where it
# started: far enough for any crawl, and a bound on how far it can run towards a
# degenerate point (a variance -> 0), which EM too would approach.
REACH = 1e4


class _Stale(Exception):
    """An ascent's last ``STALE`` evaluations gained nothing measurable."""


class Ascent(NamedTuple):
    """An ascent's result: the best state it saw (the start if none was higher) and
    the E-steps it ran."""

    state: EMState
    n_estep: int


def crawling(
    rate: float | None,
    gap: float,
    gap_tol: float,
    q_compiled: bool = True,
    cells: float = 0.0,
    remaining: float = np.inf,
    numeric: bool = False,
) -> bool:
    """Whether EM's rate ``r`` predicts more iterations than an ascent is worth to bring
    the estimated remaining gain ``gap`` below ``gap_tol`` (the gap shrinks by ``r`` per
    iteration): with a ``numeric`` M-step over the data, more than ``NUMERIC_CRAWL``;
    else a rate of at least ``SLOW_RATE`` and more than ``CRAWL`` iterations and, unless
    Q's gradient is compiled anyway (``q_compiled``), more than the ``remaining``
    iterations or more than ``COMPILE_WORTH`` seconds of iterations over ``cells``
    responsibilities."""
    if rate is None or not 0.0 < rate < 1.0 or not gap_tol < gap < np.inf:
        return False
    left = float(np.log(gap_tol / gap) / np.log(rate))
    if numeric:
        return left > NUMERIC_CRAWL
    if rate < SLOW_RATE:
        return False
    seconds = left * (ITERATION_SECONDS + CELL_SECONDS * cells)
    return left > CRAWL and (q_compiled or left > remaining or seconds > COMPILE_WORTH)


def ascends(config: MStepConfig) -> bool:
    """Whether ascents may run: for M-steps that are not all closed form (numeric
    variables, or blocks maximised from the statistics), and with no variance floor.
    A closed-form EM iteration is cheap, and an ascent would first compile Q's
    gradient, which nothing else there needs; with a floor (``reg_covar``) EM's fixed
    point is not a maximum of ``l``, which an ascent would leave for a collapsing one
    (an unbounded likelihood with a floorless variance draws an ascent as it does EM)."""
    floor = any(b.consts.get("reg_covar", 0.0) > 0 for b in config.plan.blocks)
    floor = floor or any(spec.reg_covar > 0 for spec in config.plan.mvn)
    return (bool(config.numeric_mask.any()) or bool(config.statistics)) and not floor


def statistics_cover(config: MStepConfig, size: int) -> bool:
    """Whether every entry of ``u`` (``size`` of them) is in a block maximised from the
    statistics, so that an ascent needs no Q over the data (:func:`_q_at`)."""
    covered = np.zeros(size, dtype=bool)
    for sq in config.statistics:
        covered[sq.index] = True
    return bool(covered.all())


def _q_at(functions: EMFunctions, config: MStepConfig, state: EMState, data, expectations=None,
          value: bool = True):  # fmt: skip
    """Q with the responsibilities held at ``state``, as ``u -> (Q, dQ/du)``.

    A regression mixture's Q is written out (:mod:`ppl_em.steps.glm_q`; its value NaN
    without ``value``). Where every variable is in a block maximised from the statistics
    (a stick-breaking prior's sticks, Normal components with non-conjugate priors), Q is
    the sum of those blocks' compiled Q of the E-step's sums: microseconds a call, and
    nothing to compile, where Q over the data is a pass over it and, in such a model, a
    C compilation of its gradient for the ascent alone. Else (or where a block's sums
    would cancel even recentred) Q over the data. ``expectations``: those of
    ``data.expectations`` at ``state`` already at hand."""
    # Streamed data keep no responsibilities here: an ascent's memory stays a chunk.
    if expectations is None:
        expectations = data.expectations(functions, state, keep=False)
    ex, q_functions, batches = expectations
    if config.written_q and local(batches):
        return lambda u: written_q(q_functions, config.glm, u, batches, value)
    first, parts = len(config.plan.blocks), []
    if statistics_cover(config, state.u.size):
        blocks = zip(config.plan.statistics, config.statistics, strict=True)
        parts = [(sq, block_statistics(ex.stats, ex.request, first + i, block, ex.batches))
                 for i, (block, sq) in enumerate(blocks)]  # fmt: skip
    if not parts or any(arrays is None for _, arrays in parts):
        return lambda u: q_and_grad(q_functions, u, batches())

    def from_statistics(u: np.ndarray):
        q, grad = 0.0, np.zeros_like(u)
        for sq, arrays in parts:
            value, g = sq.q(u[sq.index], *arrays)
            q, grad[sq.index] = q + float(value), g
        return q, grad

    return from_statistics


def _gradient(functions: EMFunctions, config: MStepConfig, state: EMState, data):
    """``dl/du`` at ``state.u`` by Fisher's identity (responsibilities at ``state.u``)."""
    return _q_at(functions, config, state, data, value=False)(state.u)[1]


def marginal_ascent(
    functions: EMFunctions, config: MStepConfig, state: EMState, data: EMData
) -> Ascent:
    """L-BFGS on the marginal objective from ``state`` (see the module docstring)."""
    count = [0 if state.log_resp is not None else 1]  # final's E-step
    state = data.final(functions, state)
    expectations = data.expectations(functions, state, keep=False)
    q_at = _q_at(functions, config, state, data, expectations)
    written = written_curvature(config, state.u, expectations[2])
    scales = curvature_scales(q_at, state.u, q_at(state.u)[1], written)
    best, stale = [state], [0]

    def negative(z: np.ndarray):
        count[0] += 1
        stale[0] += 1
        if stale[0] > STALE:
            raise _Stale
        try:
            new = em_init(functions, state.u + scales * z, config, data, keep_resp=True)
        except DataError:
            return np.inf, np.zeros_like(z)
        if new.objective > best[0].objective:
            if new.objective - best[0].objective > ROUNDING * max(1.0, abs(new.objective)):
                stale[0] = 0
            best[0] = new
        return -new.objective, -scales * _gradient(functions, config, new, data)

    # An iteration that gains less than the objective's rounding ends the ascent: EM's
    # own steps and stopping rule take over from there (at ftol=1e-15 the logistic and
    # negative-binomial fits spent 10-15 % of their time on evaluations that gained
    # nothing measurable: benchmarks/README.md).
    options = {"maxfun": MAX_EVALS, "maxiter": MAX_EVALS, "ftol": ROUNDING, "gtol": 1e-10,
               "maxcor": MEMORY}  # fmt: skip
    bounds = [(-REACH, REACH)] * state.u.size
    try:
        minimize(negative, np.zeros_like(state.u), jac=True, method="L-BFGS-B",
                 bounds=bounds, options=options)  # fmt: skip
    except _Stale:
        count[0] -= 1  # the evaluation that raised ran no E-step
    return Ascent(best[0], count[0])
