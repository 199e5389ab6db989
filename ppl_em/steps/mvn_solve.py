"""Map closed-form MvNormal moments back to the free variables, and the moments themselves.

The closed-form ``(mu_k, Sigma_k)`` (weighted means and covariances, from the E-step's
statistics or, where those would cancel, from the responsibilities) are mapped back to
the free variables by solving ``params(u) = target`` on the model's own compiled
parameter map (:mod:`ppl_em.compiled.mvn_map`): Gauss-Newton from the previous solution
(2-3 steps near convergence), Levenberg-Marquardt if that stalls, with a
forward-difference Jacobian grouped by sparsity. That solve has ``K (D + D(D+1)/2)``
unknowns and nothing in it grows with N. If a solve misses the target, the M-step
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


class MvnUpdate(NamedTuple):
    """Compiled pieces of one MvNormal block.

    ``mask`` marks its entries of the flat ``u``; ``params(u)`` returns
    ``concat(mu.ravel(), cov.ravel())``; ``pattern[r, c]`` says whether block entry ``c``
    moves output ``r``, and ``groups`` partitions the entries into sets that move disjoint
    outputs, so one forward difference per group gives the whole Jacobian (components
    are independent, so that is about ``1/K`` of the entries).
    """

    mask: np.ndarray
    params: Callable
    pattern: np.ndarray
    groups: tuple[np.ndarray, ...]


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
    shift = np.stack([stats.s[col[("x", a)]] for a in range(d)], axis=1) / nk
    with np.errstate(over="ignore", invalid="ignore"):
        var = np.stack([stats.s[col[("xx", a, a)]] for a in range(d)], axis=1) / nk - shift**2
    if not (np.all(np.isfinite(var)) and np.all(shift**2 <= CANCELLATION_LIMIT * var)):
        return None
    cov = np.empty((nk.shape[0], d, d))
    for a in range(d):
        cov[:, a, a] = var[:, a] + reg_covar
        for b in range(a + 1, d):
            cross = stats.s[col[("xx", a, b)]] / nk[:, 0] - shift[:, a] * shift[:, b]
            cov[:, a, b] = cov[:, b, a] = cross
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


def _whitened(winv: np.ndarray, mu_err: np.ndarray, cov_err: np.ndarray) -> np.ndarray:
    """Errors in the target's own scale, ``W (mu - mu*)`` and ``W (Sigma - Sigma*) W^T``
    with ``W = chol(Sigma*)^-1``, so one tolerance fits every unit and correlation.
    Trailing axes (the Jacobian's columns) are carried through."""
    r_mu = np.einsum("kij,kj...->ki...", winv, mu_err)
    r_cov = np.einsum("kia,kab...,kjb->kij...", winv, cov_err, winv)
    tail = mu_err.shape[2:]
    return np.concatenate([r_mu.reshape(-1, *tail), r_cov.reshape(-1, *tail)])


def _fd_jacobian(params, full, cols, sub, base, pattern, groups) -> np.ndarray:
    """Forward differences of ``params`` in the block entries, one call per group."""
    jac = np.zeros((base.shape[0], cols.shape[0]))
    for group in groups:
        h = 1.5e-8 * (1.0 + np.abs(sub[group]))
        full[cols] = sub
        full[cols[group]] += h
        diff = params(full) - base
        for c, hc in zip(group, h, strict=True):
            rows = pattern[:, c]
            jac[rows, c] = diff[rows] / hc
    full[cols] = sub
    return jac


def solve_params(
    update: MvnUpdate, u: np.ndarray, mu_t: np.ndarray, cov_t: np.ndarray
) -> np.ndarray | None:
    """``u`` with the block's entries set so that ``params(u) == (mu_t, cov_t)``, or None
    if the target is not positive definite or Levenberg-Marquardt cannot reach it."""
    try:
        winv = np.linalg.inv(np.linalg.cholesky(cov_t))
    except np.linalg.LinAlgError:
        return None
    full, cols = u.copy(), np.flatnonzero(update.mask)
    k, d = mu_t.shape
    target = np.concatenate([mu_t.ravel(), cov_t.ravel()])

    def whiten(values):
        tail = values.shape[1:]
        mu, cov = values[: k * d].reshape(k, d, *tail), values[k * d :].reshape(k, d, d, *tail)
        return _whitened(winv, mu, cov)

    def residual(sub):
        full[cols] = sub
        return whiten(update.params(full) - target)

    def jacobian(sub):
        full[cols] = sub
        base = update.params(full)
        jac = _fd_jacobian(update.params, full, cols, sub, base, update.pattern, update.groups)
        return whiten(jac)

    with np.errstate(all="ignore"):
        x = _gauss_newton(residual, jacobian, u[cols])
        if x is None:
            x = _levenberg_marquardt(residual, jacobian, u[cols])
    if x is None:
        return None
    out = u.copy()
    out[cols] = x
    return out


def _gauss_newton(residual, jacobian, x: np.ndarray, max_iter: int = 8) -> np.ndarray | None:
    """Plain Gauss-Newton: from the previous M-step's solution the target is close and
    this converges quadratically in 2-3 steps; None as soon as a step does not halve
    the residual (then Levenberg-Marquardt takes over from the start)."""
    r = residual(x)
    for _ in range(max_iter):
        if not np.all(np.isfinite(r)):
            return None
        if np.max(np.abs(r)) <= SOLVE_TOL:
            return x
        step = np.linalg.lstsq(jacobian(x), r, rcond=None)[0]
        x_new = x - step
        r_new = residual(x_new)
        if not np.linalg.norm(r_new) <= 0.5 * np.linalg.norm(r):
            return None
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
    singles = tuple(np.array([c]) for c in range(cols.shape[0]))
    rng = np.random.default_rng(0)
    pattern = None
    for scale in (0.0, 0.3):
        full = np.zeros(mask.shape[0])
        full[cols] = scale * rng.standard_normal(cols.shape[0])
        base = params(full)
        dense = np.ones((base.shape[0], cols.shape[0]), dtype=bool)
        found = _fd_jacobian(params, full, cols, full[cols], base, dense, singles) != 0
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


def compile_update(functions: EMFunctions, spec: MvnSpec) -> MvnUpdate:
    """The compiled parameter map of ``spec`` and its sparsity."""
    mask, params = compile_param_map(functions, spec)
    return MvnUpdate(mask, params, *_sparsity(params, mask))
