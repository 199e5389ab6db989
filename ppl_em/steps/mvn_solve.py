"""Map closed-form MvNormal moments back to the free variables, and the moments themselves.

The closed-form ``(mu_k, Sigma_k)`` (weighted means and covariances, from the E-step's
statistics or, where those would cancel, from the responsibilities) are mapped back to
the free variables by solving ``params(u) = target`` on the model's own compiled
parameter map (:mod:`ppl_em.compiled.mvn_map`): Newton's method from the previous
solution, one forward-difference Jacobian (grouped by sparsity) serving several steps
while they converge fast (near convergence: one Jacobian, two steps, nine evaluations
of the map), Levenberg-Marquardt if that stalls. The residual is whitened by the target
covariance and takes the lower triangle of the covariance, so a one-to-one map gives a
square system. That solve has ``K (D + D(D+1)/2)`` unknowns and nothing in it grows
with N. If a solve misses the target, the M-step
maximises Q numerically over those variables instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares

from ppl_em.compiled.functions import EMFunctions
from ppl_em.compiled.mvn_map import compile_param_map
from ppl_em.model.mvn_spec import MvnSpec
from ppl_em.steps.columns import CANCELLATION_LIMIT
from ppl_em.steps.stats import TINY

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
    """

    mask: np.ndarray
    params: Callable
    pattern: np.ndarray
    groups: tuple[np.ndarray, ...]
    entries: tuple[tuple[np.ndarray, ...], ...]


def weighted_moments(gamma: np.ndarray, x: np.ndarray, reg_covar: float = 0.0):
    """Responsibility-weighted means (K, D) and covariances (K, D, D), as scikit-learn's
    ``_estimate_gaussian_parameters`` computes them (``reg_covar`` on the diagonal)."""
    nk = np.maximum(gamma.sum(axis=0), TINY)
    mu = (gamma.T @ x) / nk[:, None]
    k, d = mu.shape
    cov = np.empty((k, d, d))
    for j in range(k):
        dev = x - mu[j]
        cov[j] = (gamma[:, j, None] * dev).T @ dev / nk[j]
        cov[j].flat[:: d + 1] += reg_covar
    return mu, cov


def moments_from_stats(nk: np.ndarray, stats, request, i: int, reg_covar: float = 0.0):
    """Weighted means and covariances of MvNormal block ``i`` from the fused E-step's
    sums (:mod:`ppl_em.steps.columns`); None if cancellation would cost accuracy (a
    component whose offset from the data mean exceeds 100 of its standard deviations),
    and then :func:`moments_two_pass` gives them."""
    nk = np.maximum(nk, TINY)[:, None]
    mean = request.mvn_means[i]
    d = mean.shape[0]
    col = {key[2:]: c for key, c in request.index.items() if key[:2] == ("mvn", i)}
    first = [col[("x", a)] for a in range(d)]
    second = [[col[("xx", min(a, b), max(a, b))] for b in range(d)] for a in range(d)]
    shift = stats.s[first].T / nk
    with np.errstate(over="ignore", invalid="ignore"):
        cov = np.moveaxis(stats.s[second], 2, 0) / nk[:, :, None]
        cov -= shift[:, :, None] * shift[:, None, :]
    var = np.diagonal(cov, axis1=1, axis2=2)
    if not (np.all(np.isfinite(var)) and np.all(shift**2 <= CANCELLATION_LIMIT * var)):
        return None
    cov[:, np.arange(d), np.arange(d)] += reg_covar
    return mean + shift, cov


def moments_two_pass(batches, name: str, names, reg_covar: float = 0.0):
    """:func:`weighted_moments` chunk by chunk: the means in one pass over the
    responsibilities (``batches()`` yields ``(gamma_t, chunk)``), the covariances about
    them in a second."""
    col = names.index(name)
    nk, sx = 0.0, 0.0
    for gamma_t, chunk in batches():
        x = np.asarray(chunk.arrays[col], dtype=float).reshape(gamma_t.shape[1], -1)
        nk, sx = nk + gamma_t.sum(axis=1), sx + gamma_t @ x
    nk = np.maximum(nk, TINY)
    mu = sx / nk[:, None]
    k, d = mu.shape
    cov = np.zeros((k, d, d))
    for gamma_t, chunk in batches():
        x = np.asarray(chunk.arrays[col], dtype=float).reshape(gamma_t.shape[1], -1)
        for j in range(k):
            dev = x - mu[j]
            cov[j] += (gamma_t[j, :, None] * dev).T @ dev
    cov /= nk[:, None, None]
    for j in range(k):
        cov[j].flat[:: d + 1] += reg_covar
    return mu, cov


def _conditional_sums(x, seen, gamma_t, mu, cov, centre):
    """One chunk's ``(sum gamma xhat, sum gamma (xhat xhat' + C))`` per component about
    ``centre``: ``xhat`` fills each row's missing coordinates with their conditional
    mean given its observed ones, ``C`` is their conditional covariance (zero
    elsewhere). Rows are grouped by which coordinates they miss."""
    k, d = mu.shape
    s1, s2 = np.zeros((k, d)), np.zeros((k, d, d))
    patterns, which = np.unique(seen, axis=0, return_inverse=True)
    for p, o in enumerate(patterns):
        rows, m = np.flatnonzero(which.ravel() == p), ~o
        for j in range(k):
            g = gamma_t[j, rows]
            xhat = x[rows] - centre[j]
            if m.any():
                gain = np.linalg.solve(cov[j][np.ix_(o, o)], cov[j][np.ix_(o, m)]).T
                shift = (x[rows][:, o] - mu[j, o]) @ gain.T
                xhat[:, m] = mu[j, m] + shift - centre[j, m]
                s2[j][np.ix_(m, m)] += g.sum() * (
                    cov[j][np.ix_(m, m)] - gain @ cov[j][np.ix_(o, m)]
                )
            s1[j] += g @ xhat
            s2[j] += (g[:, None] * xhat).T @ xhat
    return s1, s2


def moments_missing(batches, name: str, mask: str, names, mu, cov, reg_covar: float = 0.0):
    """Little and Rubin's M-step targets for MvNormal data with missing coordinates:
    the weighted moments of the rows completed by their conditional means under each
    component's current ``(mu, cov)``, plus the conditional covariances of what is
    missing. Summed about the current means, so nothing cancels near convergence."""
    col, mcol = names.index(name), names.index(mask)
    k, d = mu.shape
    nk, s1, s2 = np.zeros(k), np.zeros((k, d)), np.zeros((k, d, d))
    for gamma_t, chunk in batches():
        n = gamma_t.shape[1]
        x = np.asarray(chunk.arrays[col], dtype=float).reshape(n, d)
        seen = np.asarray(chunk.arrays[mcol], dtype=bool).reshape(n, d)
        a, b = _conditional_sums(x, seen, gamma_t, mu, cov, mu)
        nk, s1, s2 = nk + gamma_t.sum(axis=1), s1 + a, s2 + b
    nk = np.maximum(nk, TINY)
    shift = s1 / nk[:, None]
    new_cov = s2 / nk[:, None, None] - np.einsum("ki,kj->kij", shift, shift)
    for j in range(k):
        new_cov[j].flat[:: d + 1] += reg_covar
    return mu + shift, new_cov


def pooled_covariance(nk: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """The tied covariance's update, ``sum_k N_k Sigma_k / N`` (each ``Sigma_k`` about its
    component's mean), for every component."""
    weights = np.maximum(nk, TINY) / np.maximum(nk, TINY).sum()
    return np.broadcast_to(np.einsum("k,kij->ij", weights, cov), cov.shape).copy()


def _whitening(winv: np.ndarray) -> np.ndarray:
    """``P`` with ``(P vec(E))_t = (W E W^T)_{i_t j_t}`` over the lower triangle's
    entries ``t``, per component: the covariance part of :func:`_whitened` as one
    product, built once per solve."""
    k, d, _ = winv.shape
    rows, cols = np.tril_indices(d)
    return (winv[:, rows, :, None] * winv[:, cols, None, :]).reshape(k, len(rows), d * d)


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
    value at the last point so that a Jacobian there costs only its differences."""

    def __init__(self, update: MvnUpdate, u: np.ndarray, mu_t, cov_t, winv) -> None:
        self.update, self.winv, self.pair = update, winv, _whitening(winv)
        self.full, self.cols = u.copy(), np.flatnonzero(update.mask)
        self.shape = mu_t.shape
        self.target = np.concatenate([mu_t.ravel(), cov_t.ravel()])
        self.at, self.raw = None, None

    def whiten(self, values: np.ndarray) -> np.ndarray:
        k, d = self.shape
        columns = values.reshape(values.shape[0], -1)
        out = _whitened(self.winv, self.pair, columns[: k * d], columns[k * d :])
        return out.reshape(-1, *values.shape[1:])

    def __call__(self, sub: np.ndarray) -> np.ndarray:
        self.full[self.cols] = sub
        self.at, self.raw = sub.copy(), self.update.params(self.full)
        return self.whiten(self.raw - self.target)

    def jacobian(self, sub: np.ndarray) -> np.ndarray:
        if self.at is None or not np.array_equal(self.at, sub):
            self(sub)
        jac = _fd_jacobian(
            self.update.params, self.full, self.cols, sub, self.raw, self.update.entries
        )
        return self.whiten(jac)


def solve_params(
    update: MvnUpdate, u: np.ndarray, mu_t: np.ndarray, cov_t: np.ndarray
) -> np.ndarray | None:
    """``u`` with the block's entries set so that ``params(u) == (mu_t, cov_t)``, or None
    if the target is not positive definite or Levenberg-Marquardt cannot reach it."""
    try:
        winv = np.linalg.inv(np.linalg.cholesky(cov_t))
    except np.linalg.LinAlgError:
        return None
    residual = _Residual(update, u, mu_t, cov_t, winv)
    start = u[residual.cols]
    with np.errstate(all="ignore"):
        x = _newton(residual, residual.jacobian, start)
        if x is None:
            x = _levenberg_marquardt(residual, residual.jacobian, start)
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


def _newton(residual, jacobian, x: np.ndarray, max_iter: int = 16) -> np.ndarray | None:
    """Newton's method from the previous M-step's solution, keeping a Jacobian while
    each step still shrinks the residual by ``CHORD_RATE`` (a Jacobian costs one map
    evaluation per group, a step one): near convergence the first Jacobian serves
    the whole solve. None as soon as a step from a fresh Jacobian does not halve the
    residual (then Levenberg-Marquardt takes over from the start)."""
    r, inverse = residual(x), None
    for _ in range(max_iter):
        if not np.all(np.isfinite(r)):
            return None
        if np.max(np.abs(r)) <= SOLVE_TOL:
            return x
        fresh = inverse is None
        inverse = _inverse(jacobian(x)) if fresh else inverse
        if inverse is None:
            return None
        x_new = x - inverse @ r
        r_new = residual(x_new)
        shrink = np.linalg.norm(r_new) / np.linalg.norm(r)
        if not shrink <= 0.5:
            if fresh:
                return None
            inverse = None  # a stale Jacobian: take a fresh one at x
            continue
        inverse = inverse if shrink <= CHORD_RATE else None
        x, r = x_new, r_new
    return x if np.max(np.abs(r)) <= SOLVE_TOL else None


def _levenberg_marquardt(residual, jacobian, x: np.ndarray) -> np.ndarray | None:
    try:
        res = least_squares(
            residual, x, jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not (np.all(np.isfinite(res.fun)) and np.max(np.abs(res.fun)) <= SOLVE_TOL):
        return None
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


def compile_update(functions: EMFunctions, spec: MvnSpec) -> MvnUpdate:
    """The compiled parameter map of ``spec`` and its sparsity."""
    mask, params = compile_param_map(functions, spec)
    pattern, groups = _sparsity(params, mask)
    return MvnUpdate(mask, params, pattern, groups, _entries(pattern, groups))
