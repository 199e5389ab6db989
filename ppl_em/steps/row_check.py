"""Whether rows written out may stand in for the rows compiled from the model's graph.

:mod:`ppl_em.steps.glm_rows` and :mod:`ppl_em.steps.mvn_rows` each swap written rows in
at ``prepare`` only after this check, at one point near the start, on a sample of the
data the functions hold.
"""

from __future__ import annotations

import numpy as np

from ppl_em.compiled.functions import EMFunctions

# Written and compiled rows agree to rounding (some 1e-13 relative, the negative
# binomial's cancellations included); a label term that varies by observation differs
# by far more than this.
AGREE = 1e-9
# Observations the check reads: both sets of rows over all of N=10^7 would hold some
# 1 GB at once for a check that a few thousand rows make as well.
CHECKED = 4096


def _agree(compiled: list, written: list, shifted: bool = True) -> bool:
    """Whether the two sets of rows differ by one constant per component (by nothing,
    to rounding, with ``shifted=False``)."""
    for a, b in zip(compiled, written, strict=True):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if not np.array_equal(np.isneginf(a), np.isneginf(b)):
            return False
        ok = np.isfinite(a)
        if not np.all(np.isfinite(b[ok])):
            return False
        diff = a[ok] - b[ok]
        if not diff.size:
            continue
        spread = np.abs(diff - diff[0]) if shifted else np.abs(diff)
        if np.max(spread) > AGREE * (1.0 + np.max(np.abs(a[ok]))):
            return False
    return True


def probe_point(u: np.ndarray) -> np.ndarray:
    """``u`` moved by a fixed perturbation, which breaks the symmetry of a start."""
    return u + 0.1 * np.random.default_rng(0).standard_normal(u.size)


def agrees_on_sample(functions: EMFunctions, rows, probe: np.ndarray,
                     shifted: bool = True) -> bool:  # fmt: skip
    """Whether ``rows`` and ``functions.rows`` at ``probe`` differ by one constant per
    component (by nothing, to rounding, with ``shifted=False``) on up to ``CHECKED``
    observations spread over the data ``functions`` hold."""
    n = functions.data[0].shape[0]
    some = np.unique(np.linspace(0, n - 1, min(n, CHECKED)).astype(np.intp))
    arrays = tuple(a[some] for a in functions.data)
    with functions.rows.lock, np.errstate(all="ignore"):
        compiled = [np.array(r) for r in functions.rows(probe, *arrays)]
        written = [np.array(r) for r in rows(probe, *arrays)]
    return _agree(compiled, written, shifted)
