"""The closed-form MvNormal M-step's targets: responsibility-weighted means and covariances.

From the fused E-step's sums where they keep their accuracy, from two passes over the
responsibilities where those sums would cancel, Little and Rubin's moments where
coordinates are missing, and the pooled covariance for a tied one.
:mod:`ppl_em.steps.mvn_solve` maps them back to the free variables.
"""

from __future__ import annotations

import numpy as np

from ppl_em.steps.columns import CANCELLATION_LIMIT
from ppl_em.steps.stats import TINY


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
    index = request.index
    first = [index[("mvn", i, "x", a)] for a in range(d)]
    second = [[index[("mvn", i, "xx", min(a, b), max(a, b))] for b in range(d)]
              for a in range(d)]  # fmt: skip
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
