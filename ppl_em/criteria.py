"""Information criteria of a fitted mixture, in scikit-learn's "lower is better" form.

``-2 * loglik + penalty`` with ``loglik`` the marginal log-likelihood at the estimate
(without the log prior even for ``mode="map"``: the criteria are defined on the
likelihood, and with flat or weak priors the MAP sits close to the MLE) and ``p`` the
number of free unconstrained dimensions: a K-simplex counts K - 1, a positive scale 1,
a K x K covariance K(K+1)/2 through its Cholesky factor.
"""

from __future__ import annotations

import numpy as np


def bic(loglik: float, n_params: int, n_obs: float) -> float:
    """Bayesian information criterion ``-2 loglik + p log N``."""
    return float(-2.0 * loglik + n_params * np.log(n_obs))


def aic(loglik: float, n_params: int) -> float:
    """Akaike information criterion ``-2 loglik + 2 p``."""
    return float(-2.0 * loglik + 2.0 * n_params)


def classification_entropy(log_resp: np.ndarray, weights: np.ndarray | None = None) -> float:
    """``-sum_i w_i sum_k r_ik log r_ik`` over the responsibilities r (0 log 0 = 0,
    w_i = 1 without weights); >= 0."""
    log_r = np.asarray(log_resp, dtype=float)
    r = np.exp(log_r)
    # Where r underflows to 0 its log is -inf; r * log r -> 0 there, not NaN.
    terms = np.where(r > 0, r * np.where(np.isfinite(log_r), log_r, 0.0), 0.0)
    per_row = terms.sum(axis=1)
    return float(-(per_row.sum() if weights is None else per_row @ weights))


def icl(
    loglik: float,
    n_params: int,
    n_obs: float,
    log_resp: np.ndarray,
    weights: np.ndarray | None = None,
) -> float:
    """Integrated completed likelihood (Biernacki et al. 2000) in the BIC convention:
    ``BIC + 2 * entropy(responsibilities)``. It penalises components whose memberships
    overlap, so it prefers well-separated clusters where BIC may add a component to
    fit a skewed shape."""
    return bic(loglik, n_params, n_obs) + 2.0 * classification_entropy(log_resp, weights)
