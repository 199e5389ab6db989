"""Choosing the number of components: fit each K and tabulate BIC, AIC and ICL."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pymc as pm

from ppl_em.fit import fit


def _fit_one(build_model: Callable[..., pm.Model], k: int, data, fit_kwargs: dict) -> dict:
    model = build_model(k=k) if data is None else build_model(data, k=k)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, **fit_kwargs)
    return {
        "k": k,
        "n_params": result.n_parameters,
        "loglik": result.loglik,
        "log_posterior": result.log_posterior,
        "bic": result.bic(),
        "aic": result.aic(),
        "icl": result.icl(),
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
