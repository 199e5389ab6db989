"""The observed information by Louis' (1982) identity, from EM's compiled rows.

The marginal objective is ``l(u) = sum_i log sum_k exp(L_ik(u)) + fixed(u)``, with
``L_ik`` the joint's rows (``functions.rows``) and ``fixed`` the extra log-likelihood
plus, for ``mode="map"``, the log prior (``functions.fixed``). With ``g_ik`` the
responsibilities at ``u`` and ``s_ik = dL_ik/du`` the per-observation, per-component
scores, Louis' identity reads

    -d2 l = -[sum_ik g_ik d2 L_ik + d2 fixed]                    (complete information)
            - sum_i (sum_k g_ik s_ik s_ik^T - sbar_i sbar_i^T)     (missing information)

with ``sbar_i = sum_k g_ik s_ik``. Both pieces come from finite differences of the
compiled rows and fixed terms, which EM has compiled already: nothing new is compiled.
The scores are central differences of the rows; the complete-data Hessian is made of
central second differences of ``v(u') = sum_ik g_ik (L_ik(u') - L_ik(u)) + fixed(u') -
fixed(u)`` (the responsibilities held at ``u``), each row's change taken before the sum
so that the size of the log-likelihood does not drown the change. Every piece is taken
with steps ``h`` and ``2h`` and combined by Richardson's extrapolation,
``(4 D(h) - D(2h)) / 3``, which cancels the differences' O(h^2) error.

Each variable's step is measured in its own standard error under the complete data,
``(-d2 v / du_j^2)^(-1/2)``, found by a first crude pass: a step fixed in ``u``'s units
would be far too long for a mean measured in units of 1e-8 and too short for one in
units of 1e8. The data are visited in chunks of observations (any split gives the same
sums up to rounding), so the memory is bounded by the chunk, not by N.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.steps.estep import joint, split, whole_data

# Final difference step, in standard errors under the complete data. With Richardson's
# extrapolation the truncation error is about (step / the parameter's natural scale)^4,
# and the natural scale is some sqrt(N) standard errors: negligible. The step is longer
# (up to MAX_STEP_SE) where the data are many, so that a second difference (step^2
# nats) stays ROUNDING_MARGIN times above the worst case of its rounding (random
# rounding is far smaller). Measured against the exact PyTensor Hessian: about 1e-10
# relative in complete-data units (1e-9 at worst; 1e-7 with steps of 1e-3 SE and no
# extrapolation).
STEP_SE = 1e-2
MAX_STEP_SE = 1e-1
ROUNDING_MARGIN = 1e10
# The crude pass aims at steps of this many standard errors (curvature to a few %).
CRUDE_SE = 1e-2
# A crude second difference counts only when it exceeds this many times the rounding
# of v (float64 epsilon times the summed magnitudes of the rows and fixed terms).
CLEAR_OF_ROUNDING = 1e3
# Rows x components x variables held at once for the scores of one chunk.
CHUNK_CELLS = 1 << 22


class Information(NamedTuple):
    """Louis' pieces at ``u``: ``observed = complete - missing`` (each d x d, in ``u``),
    the marginal gradient (Fisher's identity: ``sum_i sbar_i + d fixed``), the objective
    and the difference step of each variable."""

    observed: np.ndarray
    complete: np.ndarray
    missing: np.ndarray
    gradient: np.ndarray
    objective: float
    steps: np.ndarray


class _Base(NamedTuple):
    """A chunk at ``u``: the rows, the responsibilities (``gamma``; times the
    observations' weights: ``counted``), and where they are positive."""

    chunk: object
    rows: np.ndarray
    gamma: np.ndarray
    positive: np.ndarray
    counted: np.ndarray
    weights: np.ndarray


def _fixed(functions: EMFunctions, u: np.ndarray) -> float:
    extra, logprior = functions.fixed(u, *functions.fixed_data)
    return float(extra) + (float(logprior) if functions.mode == "map" else 0.0)


def _chunks(functions: EMFunctions, n_vars: int, chunk_size: int | None):
    n, k = functions.data[0].shape[0], functions.graph.n_components
    size = chunk_size or max(1, CHUNK_CELLS // (k * max(n_vars, 1)))
    if size >= n or not functions.spec.chunkable:
        return [whole_data(functions)]
    return split(functions, size)


def _base(functions: EMFunctions, u: np.ndarray, chunk) -> _Base:
    rows = joint(functions, u, chunk)
    top = np.max(rows, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        gamma = np.exp(rows - top)
        gamma /= gamma.sum(axis=1, keepdims=True)
    gamma = np.where(np.isfinite(gamma), gamma, 0.0)
    weights = np.ones(len(rows)) if chunk.weights is None else np.asarray(chunk.weights, float)
    return _Base(chunk, rows, gamma, gamma > 0, gamma * weights[:, None], weights)


class _Evaluator:
    """``v(u + delta)`` and the rows' changes, chunk by chunk, against the base at ``u``."""

    def __init__(self, functions: EMFunctions, u: np.ndarray, chunks) -> None:
        self.functions, self.u = functions, u
        self.bases = [_base(functions, u, c) for c in chunks]
        self.fixed0 = _fixed(functions, u)
        with np.errstate(invalid="ignore"):  # 0 * inf where a component cannot be
            sizes = [float(np.sum(b.counted * np.abs(b.rows), where=b.positive))
                     for b in self.bases]  # fmt: skip
        self.rounding = np.finfo(float).eps * (sum(sizes) + abs(self.fixed0))

    def change(self, base: _Base, delta: np.ndarray) -> np.ndarray:
        """The chunk's ``L(u + delta) - L(u)``, 0 where the responsibility is 0."""
        with np.errstate(invalid="ignore"):
            diff = joint(self.functions, self.u + delta, base.chunk) - base.rows
        return np.where(base.positive, diff, 0.0)

    def fixed_change(self, delta: np.ndarray) -> float:
        return _fixed(self.functions, self.u + delta) - self.fixed0

    def value(self, delta: np.ndarray) -> float:
        """``v(u + delta)``: the weighted change of the rows plus the fixed terms'."""
        rows = sum(float(np.sum(b.counted * self.change(b, delta))) for b in self.bases)
        return rows + self.fixed_change(delta)


def _unit(size: int, j: int, h: float) -> np.ndarray:
    e = np.zeros(size)
    e[j] = h
    return e


def _crude_curvature(ev: _Evaluator, j: int) -> tuple[float, float]:
    """``(|d2 v / du_j^2|, step)`` with the step about ``CRUDE_SE`` standard errors: it
    starts at ``1e-4 * max(1, |u_j|)``, grows until the second difference stands clear of
    rounding, shrinks where v is not finite, and is re-measured once at the size the
    first measurement asks for. ``(0, step)`` if v does not move along ``u_j``."""
    step, settled = 1e-4 * max(1.0, abs(ev.u[j])), False
    for _ in range(12):
        e = _unit(ev.u.size, j, step)
        second = ev.value(e) + ev.value(-e)
        if not np.isfinite(second):
            step /= 1e3
            continue
        if not abs(second) > CLEAR_OF_ROUNDING * ev.rounding:
            step *= 1e3
            continue
        curv = abs(second) / step**2
        ideal = CRUDE_SE / np.sqrt(curv)
        if settled or 0.1 * step <= ideal <= 10 * step:
            return curv, step
        step, settled = ideal, True
    return 0.0, step


def difference_steps(ev: _Evaluator) -> np.ndarray:
    """Each variable's final step: ``STEP_SE`` standard errors under the complete data,
    or up to ``MAX_STEP_SE`` for many data (see ``ROUNDING_MARGIN``); the crude pass's
    last step where v does not move along ``u_j``."""
    in_se = float(np.clip(np.sqrt(ROUNDING_MARGIN * ev.rounding), STEP_SE, MAX_STEP_SE))
    steps = np.empty(ev.u.size)
    for j in range(ev.u.size):
        curv, crude = _crude_curvature(ev, j)
        steps[j] = in_se / np.sqrt(curv) if curv > 0 else crude
    return steps


class _Pieces(NamedTuple):
    complete: np.ndarray
    missing: np.ndarray
    gradient: np.ndarray


def _moved_at_generic_point(ev: _Evaluator, base: _Base, units) -> np.ndarray:
    """``moved[j, k]``: whether component k's row changes with ``u_j`` near ``u``, at a
    point off ``u`` by a fraction of each step in a fixed pseudo-random direction: there
    a variable that enters only through a product with another that is exactly zero at
    ``u`` (whose rows do not move at ``u``) moves them too."""
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=len(units))
    off = sum(s * 0.37 * e for s, e in zip(signs, units, strict=True))
    at = ev.change(base, off)
    moved = np.empty((len(units), base.gamma.shape[1]), dtype=bool)
    for j, e in enumerate(units):
        moved[j] = np.any(ev.change(base, off + e) != at, axis=0)
    return moved


def _together(moved: np.ndarray) -> np.ndarray:
    """``together[i, j]``: whether some component's row moves with both ``u_i`` and
    ``u_j`` (``moved`` from :func:`_moved_at_generic_point` or the differences at ``u``)."""
    counts = moved.astype(np.int64)
    return counts @ counts.T > 0


def _pieces(ev: _Evaluator, steps: np.ndarray) -> _Pieces:
    """Louis' pieces by central differences with ``steps`` (error O(steps^2)): the
    scores from ``u +- h_j e_j``, the complete-data Hessian from v there and at
    ``u +- (h_i e_i + h_j e_j)`` (v(u) = 0 by construction). Where no component's row
    moves with both ``u_i`` and ``u_j`` (a latent class model's items in different
    components) the rows' mixed difference is zero and is not evaluated: with 32
    variables that left 196 of 496 pairs (benchmarks/README.md)."""
    d = ev.u.size
    units = [_unit(d, j, h) for j, h in enumerate(steps)]
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    plus, minus = np.zeros(d), np.zeros(d)  # v(u + h_j e_j), v(u - h_j e_j)
    twin = np.zeros((d, d, 2))  # v(u + h_i e_i + h_j e_j), v(u - h_i e_i - h_j e_j)
    missing, gradient = np.zeros((d, d)), np.zeros(d)
    for base in ev.bases:
        g, counted = base.gamma, base.counted
        scores = np.empty((*g.shape, d))
        parts = np.empty((d, 2))  # this chunk's share of plus and minus
        moved = np.empty((d, g.shape[1]), dtype=bool)
        for j, e in enumerate(units):
            up, down = ev.change(base, e), ev.change(base, -e)
            parts[j] = np.sum(counted * up), np.sum(counted * down)
            moved[j] = np.any((up != 0) | (down != 0), axis=0)
            scores[..., j] = (up - down) / (2 * steps[j])
        plus += parts[:, 0]
        minus += parts[:, 1]
        together = _together(moved)
        if not together.all():  # a product with a zero at u can hide a move: look off u
            together = _together(moved | _moved_at_generic_point(ev, base, units))
        for i, j in pairs:
            if not together[i, j]:
                twin[i, j] += parts[i] + parts[j]  # the mixed difference is zero
                continue
            twin[i, j, 0] += np.sum(counted * ev.change(base, units[i] + units[j]))
            twin[i, j, 1] += np.sum(counted * ev.change(base, -units[i] - units[j]))
        mean = np.einsum("nk,nkj->nj", g, scores)  # sbar_i
        centred = (np.sqrt(counted)[..., None] * (scores - mean[:, None, :])).reshape(-1, d)
        missing += centred.T @ centred
        gradient += base.weights @ mean
    for j, e in enumerate(units):
        up, down = ev.fixed_change(e), ev.fixed_change(-e)
        plus[j] += up
        minus[j] += down
        gradient[j] += (up - down) / (2 * steps[j])
    for i, j in pairs:
        twin[i, j, 0] += ev.fixed_change(units[i] + units[j])
        twin[i, j, 1] += ev.fixed_change(-units[i] - units[j])
    hessian = np.diag((plus + minus) / steps**2)
    for i, j in pairs:
        mixed = twin[i, j, 0] + twin[i, j, 1] - plus[i] - plus[j] - minus[i] - minus[j]
        hessian[i, j] = hessian[j, i] = mixed / (2 * steps[i] * steps[j])
    return _Pieces(-hessian, missing, gradient)


def _objective(ev: _Evaluator) -> float:
    """The marginal objective at ``u``: ``sum_i logsumexp_k L_ik + fixed``."""
    total = ev.fixed0
    for base in ev.bases:
        top = np.max(base.rows, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            lse = top + np.log(np.sum(np.exp(base.rows - top[:, None]), 1))
            total += float(base.weights @ lse)
    return total


def louis_information(
    functions: EMFunctions, u: np.ndarray, chunk_size: int | None = None
) -> Information:
    """The observed information of the marginal objective at ``u`` (Louis' identity,
    see the module docstring), over the data in chunks of ``chunk_size`` observations
    (default: as many as keep ``CHUNK_CELLS`` scores in memory). Richardson's
    extrapolation from the steps ``h`` and ``2h`` cancels the differences' O(h^2)
    error."""
    u = np.asarray(u, dtype=float)
    ev = _Evaluator(functions, u, _chunks(functions, u.size, chunk_size))
    steps = difference_steps(ev)
    fine, coarse = _pieces(ev, steps), _pieces(ev, 2 * steps)
    complete, missing, gradient = ((4 * f - c) / 3 for f, c in zip(fine, coarse, strict=True))
    return Information(complete - missing, complete, missing, gradient, _objective(ev), steps)
