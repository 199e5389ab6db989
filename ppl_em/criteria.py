"""Information criteria for a fitted mixture, and choosing the number of components.

All three criteria use the "lower is better" convention of scikit-learn's
``GaussianMixture.bic``/``aic``: ``-2 * loglik + penalty``. ``loglik`` is the marginal
log-likelihood at the EM estimate (``result.loglik``), without the log prior even when
the fit was ``mode="map"``; the criteria are defined on the likelihood, and with flat or
weak priors the MAP sits close to the MLE. The number of parameters is the count of free
unconstrained dimensions (``result.functions.layout.size``): a K-simplex counts K - 1,
a positive scale 1, a K x K covariance K(K+1)/2 through its Cholesky factor.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pymc as pm

from ppl_em.result import EMResult


def n_parameters(result: EMResult) -> int:
    """Free unconstrained dimensions of the fitted model (label excluded)."""
    return int(result.functions.layout.size)


def n_observations(result: EMResult) -> int:
    """Number of observations N that the label ranges over."""
    return int(result.functions.graph.n_obs)


def bic(result: EMResult) -> float:
    """Bayesian information criterion ``-2 loglik + p log N``; lower is better."""
    return float(-2.0 * result.loglik + n_parameters(result) * np.log(n_observations(result)))


def aic(result: EMResult) -> float:
    """Akaike information criterion ``-2 loglik + 2 p``; lower is better."""
    return float(-2.0 * result.loglik + 2.0 * n_parameters(result))


def classification_entropy(result: EMResult) -> float:
    """``-sum_i sum_k r_ik log r_ik`` over the responsibilities r (0 log 0 = 0); >= 0."""
    log_r = np.asarray(result.log_resp, dtype=float)
    r = np.exp(log_r)
    # Where r underflows to 0 its log is -inf; r * log r -> 0 there, not NaN.
    terms = np.where(r > 0, r * np.where(np.isfinite(log_r), log_r, 0.0), 0.0)
    return float(-terms.sum())


def icl(result: EMResult) -> float:
    """Integrated completed likelihood (Biernacki et al. 2000) in the BIC convention.

    ``ICL = BIC + 2 * entropy(responsibilities)``; lower is better. It penalises
    components whose memberships overlap, so it prefers well-separated clusters where
    BIC may add a component to fit a skewed shape.
    """
    return bic(result) + 2.0 * classification_entropy(result)


def _fit_one(build_model: Callable[..., pm.Model], k: int, data, fit_kwargs: dict) -> dict:
    from ppl_em.fit import fit

    model = build_model(k=k) if data is None else build_model(data, k=k)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, **fit_kwargs)
    return {
        "k": k,
        "n_params": n_parameters(result),
        "loglik": result.loglik,
        "log_posterior": result.log_posterior,
        "bic": bic(result),
        "aic": aic(result),
        "icl": icl(result),
        "converged": result.converged,
        "n_iter": result.n_iter,
        "seconds": time.perf_counter() - t0,
        # Kept so a user can see why a K is doubtful (non-convergence, empty component).
        "warnings": "; ".join(sorted({str(w.message).split("\n")[0] for w in caught})),
    }


def select_k(
    build_model: Callable[..., pm.Model],
    ks: Iterable[int],
    *,
    data=None,
    **fit_kwargs,
) -> pd.DataFrame:
    """Fit ``build_model(k=k)`` (or ``build_model(data, k=k)``) by EM for each K in ``ks``.

    ``fit_kwargs`` go to :func:`ppl_em.fit` (``progressbar`` defaults to False here).
    Returns one row per K, indexed by ``k``, with columns ``n_params``, ``loglik``,
    ``log_posterior``, ``bic``, ``aic``, ``icl`` (lower is better), ``converged``,
    ``n_iter``, ``seconds`` and ``warnings``, plus boolean ``best_bic``, ``best_aic``
    and ``best_icl`` marking the minimum of each criterion.
    """
    ks = list(ks)
    bad = [k for k in ks if not (isinstance(k, int | np.integer) and k >= 1)]
    if not ks or bad:
        raise ValueError(
            f"ks={ks!r} must be a non-empty list of integers >= 1 (offending: {bad}); "
            "e.g. ks=range(1, 7)."
        )
    fit_kwargs.setdefault("progressbar", False)
    rows = [_fit_one(build_model, int(k), data, fit_kwargs) for k in ks]
    table = pd.DataFrame(rows).set_index("k")
    for name in ("bic", "aic", "icl"):
        table[f"best_{name}"] = table[name] == table[name].min()
    return table
