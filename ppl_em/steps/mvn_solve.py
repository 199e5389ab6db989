"""Map the closed-form MvNormal moments back to the free variables.

The closed-form ``(mu_k, Sigma_k)`` (:mod:`ppl_em.steps.mvn_moments`) are mapped back to
the free variables by solving ``params(u) = target`` on the model's own compiled
parameter map (:mod:`ppl_em.compiled.mvn_map`): Newton's method from the previous
solution, one forward-difference Jacobian (grouped by sparsity) serving several steps
while they converge fast, Levenberg-Marquardt if that stalls. The residual is whitened
by the target covariance and takes the lower triangle, so a one-to-one map gives a
square system of ``K (D + D(D+1)/2)`` unknowns; nothing in it grows with N.

Where the model builds each covariance as ``L @ L.mT`` (``MvNormal(chol=...)``), the
solve targets the Cholesky factor instead: the free values usually set the factor's
entries one each (free entries, ``LKJCholeskyCov``'s packed factor), so its Jacobian is
one forward difference where the covariance's takes one per row of the factor. A factor
that does not reproduce the covariance (``L`` not lower triangular) falls back to the
covariance's solve; a solve that misses the target leaves the block to the numeric
M-step.

Where each free entry of the block moves one output of its own (the factor's entries
free one each, through their transforms), the Jacobian is a permuted diagonal: one
forward difference of all entries at once gives it, and a Newton step divides each
entry's own error by its derivative, with no whitened Jacobian to build or invert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares

from ppl_em.compiled.functions import EMFunctions
from ppl_em.compiled.mvn_map import compile_param_map
from ppl_em.model.mvn_spec import MvnSpec

# Largest whitened residual accepted as "params(u) reproduces the target": parameters
# within 1e-9 relative of the weighted moments change Q by far less than EM's tol.
SOLVE_TOL = 1e-9
# Newton keeps its Jacobian while each step shrinks the residual at least this much
# (the chord method): a Jacobian costs a map evaluation per group, a step only one.
CHORD_RATE = 0.1


class MvnUpdate(NamedTuple):
    """Compiled pieces of one MvNormal block.

    ``mask`` marks its entries of the flat ``u``; ``params(u)`` returns
    ``concat(mu.ravel(), cov.ravel())``; ``pattern[r, c]`` says whether block entry ``c``
    moves output ``r``, and ``groups`` partitions the entries into sets that move disjoint
    outputs, so one forward difference per group gives the whole Jacobian (components
    are independent, so that is about ``1/K`` of the entries); ``entries`` holds per
    group ``(group, outputs, entries)``, the Jacobian's nonzeros its difference fills.
    ``factor``, where the model has one, is the same for ``concat(mu.ravel(),
    L.ravel())``. ``outputs``, where each entry moves exactly one output and no two
    entries the same one, holds each entry's output (:func:`_own_outputs`). ``lower``
    holds the flat positions of a D x D matrix's lower triangle, row by row.
    """

    mask: np.ndarray
    params: Callable
    pattern: np.ndarray
    groups: tuple[np.ndarray, ...]
    entries: tuple[tuple[np.ndarray, ...], ...]
    factor: MvnUpdate | None = None
    outputs: np.ndarray | None = None
    lower: np.ndarray | None = None


class CovarianceOf(NamedTuple):
    """``concat(mu.ravel(), cov.ravel())`` from a compiled map to ``concat(mu.ravel(),
    L.ravel())``, with ``cov = L @ L.mT``: one compiled map serves both solves."""

    factor_params: Callable
    k: int
    d: int

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return covariance_params(self.factor_params(u), self.k, self.d)


def covariance_params(raw: np.ndarray, k: int, d: int) -> np.ndarray:
    factor = raw[k * d :].reshape(k, d, d)
    return np.concatenate([raw[: k * d], np.matmul(factor, factor.mT).ravel()])


def _whitening(winv: np.ndarray) -> np.ndarray:
    """``P`` with ``(P vec(E))_t = (W E W^T)_{i_t j_t}`` over the lower triangle's
    entries ``t``, per component: the covariance part of :func:`_whitened` as one
    product, built once per solve."""
    k, d, _ = winv.shape
    rows, cols = np.tril_indices(d)
    return (winv[:, rows, :, None] * winv[:, cols, None, :]).reshape(k, len(rows), d * d)


def _factor_whitening(winv: np.ndarray) -> np.ndarray:
    """As :func:`_whitening` for a factor's error: ``(P vec(E))_t = (W E)_{i_t j_t}``.
    ``L = L* (I + W (L - L*))``, so a factor within ``e`` puts the covariance within
    about ``2 e`` in :func:`_whitening`'s scale."""
    k, d, _ = winv.shape
    rows, cols = np.tril_indices(d)
    pick = np.eye(d)[cols]
    return (winv[:, rows, :, None] * pick[None, :, None, :]).reshape(k, len(rows), d * d)


def _whitened(winv: np.ndarray, pair: np.ndarray, mu_err, cov_err) -> np.ndarray:
    """Errors in the target's own scale, ``W (mu - mu*)`` and the lower triangle of
    ``W (Sigma - Sigma*) W^T`` (``pair`` from :func:`_whitening`), with
    ``W = chol(Sigma*)^-1``, so one tolerance fits every unit and correlation; a
    symmetric error is whole in its lower triangle, which makes the system square when
    the map is one-to-one. Errors are (K*D + K*D*D, n): n columns of a Jacobian, or one."""
    k, d, _ = winv.shape
    n = mu_err.shape[1]
    r_mu = np.matmul(winv, mu_err.reshape(k, d, n)).reshape(-1, n)
    r_cov = np.matmul(pair, cov_err.reshape(k, d * d, n)).reshape(-1, n)
    return np.concatenate([r_mu, r_cov])


def _fd_jacobian(params, full, cols, sub, base, entries) -> np.ndarray:
    """Forward differences of ``params`` in the block entries, one call per group;
    ``entries`` holds each group's nonzero (output, entry) pairs."""
    jac = np.zeros((base.shape[0], cols.shape[0]))
    h = 1.5e-8 * (1.0 + np.abs(sub))
    for group, rows, at in entries:
        full[cols] = sub
        full[cols[group]] += h[group]
        diff = params(full) - base
        jac[rows, at] = diff[rows] / h[at]
    full[cols] = sub
    return jac


class _Residual:
    """The whitened residual ``params(u) - target`` of one solve, remembering the map's
    value at the last point so that a Jacobian there costs only its differences.
    ``factor`` says the target is a Cholesky factor (whitened as ``W E``), not a
    covariance (``W E W^T``)."""

    def __init__(self, update: MvnUpdate, u: np.ndarray, mu_t, second_t, winv,
                 factor: bool) -> None:  # fmt: skip
        self.update, self.winv, self.factor = update, winv, factor
        self.full, self.cols = u.copy(), np.flatnonzero(update.mask)
        self.shape = mu_t.shape
        self.target = np.concatenate([mu_t.ravel(), second_t.ravel()])
        self.at, self.raw = None, None
        self._pair = None
        d = mu_t.shape[1]
        self._lower = _lower(d) if update.lower is None else update.lower

    @property
    def pair(self) -> np.ndarray:
        """The whitening of Jacobian columns (:func:`_whitening`), built when first needed:
        a separable solve never whitens a Jacobian."""
        if self._pair is None:
            self._pair = (_factor_whitening if self.factor else _whitening)(self.winv)
        return self._pair

    def whiten(self, values: np.ndarray) -> np.ndarray:
        if values.ndim == 1:
            return self._whiten_one(values)
        k, d = self.shape
        columns = values.reshape(values.shape[0], -1)
        out = _whitened(self.winv, self.pair, columns[: k * d], columns[k * d :])
        return out.reshape(-1, *values.shape[1:])

    def _whiten_one(self, error: np.ndarray) -> np.ndarray:
        """:func:`_whitened` of one error vector, as two small products."""
        k, d = self.shape
        r_mu = np.matmul(self.winv, error[: k * d].reshape(k, d, 1)).ravel()
        scaled = np.matmul(self.winv, error[k * d :].reshape(k, d, d))
        if not self.factor:
            scaled = np.matmul(scaled, self.winv.mT)
        return np.concatenate([r_mu, scaled.reshape(k, d * d)[:, self._lower].ravel()])

    def __call__(self, sub: np.ndarray) -> np.ndarray:
        self.full[self.cols] = sub
        self.at, self.raw = sub.copy(), self.update.params(self.full)
        return self.whiten(self.raw - self.target)

    def jacobian(self, sub: np.ndarray) -> np.ndarray:
        self._evaluated_at(sub)
        jac = _fd_jacobian(
            self.update.params, self.full, self.cols, sub, self.raw, self.update.entries
        )
        return self.whiten(jac)

    def _evaluated_at(self, sub: np.ndarray) -> None:
        if self.at is None or not np.array_equal(self.at, sub):
            self(sub)

    def slopes(self, sub: np.ndarray) -> np.ndarray | None:
        """Each entry's derivative of its own output (``update.outputs``) at ``sub``: one
        forward difference of all entries at once, their outputs being distinct; None
        where one is zero or not finite."""
        self._evaluated_at(sub)
        outputs, h = self.update.outputs, 1.5e-8 * (1.0 + np.abs(sub))
        self.full[self.cols] = sub + h
        moved = self.update.params(self.full)[outputs]
        self.full[self.cols] = sub
        slope = (moved - self.raw[outputs]) / h
        return slope if np.all(np.isfinite(slope)) and np.all(slope != 0) else None


def solve_params(
    update: MvnUpdate, u: np.ndarray, mu_t: np.ndarray, cov_t: np.ndarray
) -> np.ndarray | None:
    """``u`` with the block's entries set so that ``params(u) == (mu_t, cov_t)``, or None
    if the target is not positive definite or Levenberg-Marquardt cannot reach it."""
    try:
        chol_t = np.linalg.cholesky(cov_t)
    except np.linalg.LinAlgError:
        return None
    winv = np.linalg.inv(chol_t)
    if update.factor is not None:
        residual = _Residual(update.factor, u, mu_t, chol_t, winv, factor=True)
        # a quarter of the tolerance, so that the covariance it gives is within it
        x = _solve(residual, u, SOLVE_TOL / 4)
        if x is not None and _reproduces(residual):
            return x
    return _solve(_Residual(update, u, mu_t, cov_t, winv, factor=False), u, SOLVE_TOL)


def _reproduces(residual: _Residual) -> bool:
    """Whether the factor's solve, at its last point, gives the target covariance:
    ``W L (W L)^T = I`` to the tolerance, with ``W = chol(cov_t)^-1``."""
    k, d = residual.shape
    scaled = np.matmul(residual.winv, residual.raw[k * d :].reshape(k, d, d))
    err = np.matmul(scaled, scaled.mT) - np.eye(d)
    return bool(np.max(np.abs(err)) <= SOLVE_TOL)


def _solve(residual: _Residual, u: np.ndarray, tol: float) -> np.ndarray | None:
    start = u[residual.cols]
    separable = residual.update.outputs is not None
    with np.errstate(all="ignore"):
        x = _newton(residual, _own_steps if separable else _whole_steps, start, tol)
        if x is None:
            x = _levenberg_marquardt(residual, residual.jacobian, start, tol)
    if x is None:
        return None
    out = u.copy()
    out[residual.cols] = x
    return out


def _inverse(jac: np.ndarray) -> np.ndarray | None:
    """What maps a residual to its Newton step: ``J^-1`` when the map is one-to-one (a
    square system), the pseudo-inverse (least squares) for a tied covariance's
    repeated targets; None for a singular or non-finite ``J``."""
    if not np.all(np.isfinite(jac)):
        return None
    try:
        return np.linalg.inv(jac) if jac.shape[0] == jac.shape[1] else np.linalg.pinv(jac)
    except np.linalg.LinAlgError:
        return None


def _whole_steps(residual: _Residual, x: np.ndarray) -> Callable | None:
    """The Newton step from the whitened Jacobian at ``x``, as a function of the
    whitened residual where it is taken; None where that Jacobian has no inverse."""
    inverse = _inverse(residual.jacobian(x))
    return None if inverse is None else (lambda r: inverse @ r)


def _own_steps(residual: _Residual, x: np.ndarray) -> Callable | None:
    """As :func:`_whole_steps` where each entry moves one output of its own: the step
    divides each entry's error in that output by its derivative at ``x`` (the same step
    as the whitened one, ``(W J)^-1 W e = J^-1 e``). It reads the error at the residual's
    last point, which :func:`_newton` keeps at the point the step is taken from."""
    slope, outputs = residual.slopes(x), residual.update.outputs
    if slope is None:
        return None
    return lambda r: (residual.raw[outputs] - residual.target[outputs]) / slope


def _newton(residual, linearise, x: np.ndarray, tol: float, max_iter: int = 16):
    """Newton's method from the previous M-step's solution, keeping a linearisation
    (``linearise(residual, x)``, a function from the whitened residual to the step)
    while each step still shrinks the residual by ``CHORD_RATE`` (a Jacobian costs one
    map evaluation per group, a step one): near convergence the first Jacobian serves
    the whole solve. None as soon as a step from a fresh Jacobian does not halve the
    residual (then Levenberg-Marquardt takes over from the start)."""
    r, step = residual(x), None
    for _ in range(max_iter):
        if not np.all(np.isfinite(r)):
            return None
        if np.max(np.abs(r)) <= tol:
            return x
        fresh = step is None
        step = linearise(residual, x) if fresh else step
        if step is None:
            return None
        x_new = x - step(r)
        r_new = residual(x_new)
        shrink = np.linalg.norm(r_new) / np.linalg.norm(r)
        if not shrink <= 0.5:
            if fresh:
                return None
            step = None  # a stale Jacobian: take a fresh one at x
            continue
        step = step if shrink <= CHORD_RATE else None
        x, r = x_new, r_new
    return x if np.max(np.abs(r)) <= tol else None


def _levenberg_marquardt(residual, jacobian, x: np.ndarray, tol: float) -> np.ndarray | None:
    try:
        res = least_squares(
            residual, x, jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not (np.all(np.isfinite(res.fun)) and np.max(np.abs(res.fun)) <= tol):
        return None
    residual(res.x)  # the map's value kept at the solution, as after Newton
    return res.x


def _sparsity(params, mask: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Which outputs each block entry moves, from forward differences at two points
    (the second, random one, so that a derivative that happens to vanish at the first
    is not taken for a structural zero), and a greedy grouping of disjoint entries."""
    cols = np.flatnonzero(mask)
    rng = np.random.default_rng(0)
    pattern = None
    for scale in (0.0, 0.3):
        full = np.zeros(mask.shape[0])
        full[cols] = scale * rng.standard_normal(cols.shape[0])
        base = params(full)
        dense = np.ones((base.shape[0], cols.shape[0]), dtype=bool)
        singles = _entries(dense, tuple(np.array([c]) for c in range(cols.shape[0])))
        found = _fd_jacobian(params, full, cols, full[cols], base, singles) != 0
        pattern = found if pattern is None else pattern | found
    groups, touched = [], []
    for c in range(cols.shape[0]):
        for g, rows in enumerate(touched):
            if not np.any(rows & pattern[:, c]):
                groups[g].append(c)
                rows |= pattern[:, c]
                break
        else:
            groups.append([c])
            touched.append(pattern[:, c].copy())
    return pattern, tuple(np.array(g) for g in groups)


def _entries(pattern: np.ndarray, groups) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per group: its entries, and the (output, entry) pairs its difference fills."""
    out = []
    for group in groups:
        rows, which = np.nonzero(pattern[:, group])
        out.append((group, rows, group[which]))
    return tuple(out)


def _lower(d: int) -> np.ndarray:
    rows, cols = np.tril_indices(d)
    return rows * d + cols


def _own_outputs(pattern: np.ndarray) -> np.ndarray | None:
    """Each block entry's one output, where every entry moves exactly one output and no
    output moves with two entries (the map is separable); else None."""
    if not (np.all(pattern.sum(axis=0) == 1) and np.all(pattern.sum(axis=1) <= 1)):
        return None
    return np.argmax(pattern, axis=0)


def _update(mask: np.ndarray, params: Callable) -> MvnUpdate:
    pattern, groups = _sparsity(params, mask)
    entries = _entries(pattern, groups)
    return MvnUpdate(mask, params, pattern, groups, entries, outputs=_own_outputs(pattern))


def compile_update(functions: EMFunctions, spec: MvnSpec) -> MvnUpdate:
    """The compiled parameter map of ``spec`` and its sparsity, in the covariance and,
    where the spec has one, in its factor."""
    mask, params = compile_param_map(functions, spec)
    k, d = spec.mu.type.shape
    lower = _lower(d)
    if spec.factor is None:
        return _update(mask, params)._replace(lower=lower)
    factor = _update(mask, params)._replace(lower=lower)
    return _update(mask, CovarianceOf(params, k, d))._replace(factor=factor, lower=lower)
