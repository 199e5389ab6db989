"""Findings about a fitted mixture: empty, identical and collapsed components.

Pure functions of the responsibilities, the joint matrix ``L[i, k] = log p(x_i, z_i=k)``
and the observed data, so they work for every family and for the building blocks as
well as for :func:`ppl_em.fit`, which stores :func:`diagnose`'s findings in
``EMResult.diagnostics`` and uses :func:`select_run` to choose among restarts.

Thresholds (module constants, documented in docs/failure-modes.md):

* empty: a component's expected count ``N_k = sum_i gamma_ik`` is below
  ``EMPTY_COUNT`` (a hundredth of one observation);
* identical: the log-likelihood ratio ``log gamma_ij - log gamma_ik`` of two non-empty
  components varies by less than ``IDENTICAL_NATS`` over all observations, so no
  observation's responsibilities tell them apart by more than about 1 %;
* collapsed: a component's density at its best observation exceeds that of one Gaussian
  fitted to all the data by more than ``COLLAPSE_NATS`` = -log(float64 eps) nats (it is
  narrower than the float64 resolution of the data's scale), or by more than
  ``POINT_NATS`` while the data it owns have no spread (weighted sd below
  ``SPREAD_RTOL`` times the data's): a point mass, where the likelihood is unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ppl_em.errors import CollapseError

EMPTY_COUNT = 1e-2
IDENTICAL_NATS = 1e-2
COLLAPSE_NATS = float(-np.log(np.finfo(np.float64).eps))
SPREAD_RTOL = 1e-12
POINT_NATS = 10.0


def component_counts(log_resp: np.ndarray) -> np.ndarray:
    """Expected number of observations per component, ``N_k``."""
    return np.exp(log_resp).sum(axis=0)


def empty_components(log_resp: np.ndarray, min_count: float = EMPTY_COUNT) -> list[int]:
    """Components whose expected count is below ``min_count``."""
    return [int(k) for k in np.flatnonzero(component_counts(log_resp) < min_count)]


def identical_components(
    log_resp: np.ndarray, tol: float = IDENTICAL_NATS, min_count: float = EMPTY_COUNT
) -> list[tuple[int, int]]:
    """Pairs ``(j, k)`` of non-empty components the data cannot tell apart.

    Two components with the same density have ``gamma_ij / gamma_ik = w_j / w_k`` for
    every observation, so the spread of the log ratio is 0 whatever the family.
    """
    empty = set(empty_components(log_resp, min_count))
    pairs = []
    k_total = log_resp.shape[1]
    for j in range(k_total):
        for k in range(j + 1, k_total):
            if j in empty or k in empty:
                continue
            ratio = log_resp[:, j] - log_resp[:, k]
            ratio = ratio[np.isfinite(ratio)]
            if ratio.size and np.ptp(ratio) < tol:
                pairs.append((j, k))
    return pairs


def identical_groups(pairs: Sequence[tuple[int, int]], n_components: int) -> list[list[int]]:
    """Merge identical pairs into groups (connected components of the pair graph)."""
    parent = list(range(n_components))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for j, k in pairs:
        parent[root(k)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n_components):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _log_scale(column: np.ndarray) -> float:
    """log of the data's standard deviation, without squaring (1e300 or 1e-300 data)."""
    centred = column - np.median(column)
    spread = np.max(np.abs(centred))
    if not np.isfinite(spread) or spread == 0:
        # One distinct value (N=1, say): fall back on its magnitude, or 1 for zeros.
        top = np.max(np.abs(column))
        return float(np.log(top)) if np.isfinite(top) and top > 0 else 0.0
    scaled = centred / spread
    return float(np.log(spread) + 0.5 * np.log(max(np.var(scaled), np.finfo(float).tiny)))


def reference_logdensity(columns: np.ndarray) -> float:
    """Peak log density of independent Gaussians fitted to each data column."""
    return float(sum(-0.5 * np.log(2 * np.pi) - _log_scale(c) for c in np.asarray(columns).T))


def _relative_spread(log_resp: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Per component, the largest column's weighted sd of its data over the data's sd."""
    gamma = np.exp(log_resp)
    nk = np.maximum(gamma.sum(axis=0), np.finfo(float).tiny)
    out = np.zeros(gamma.shape[1])
    for col in np.asarray(columns, dtype=float).T:
        top = np.max(np.abs(col))
        z = col / (top if np.isfinite(top) and top > 0 else 1.0)
        centre = gamma.T @ z / nk
        var = np.einsum("ik,ik->k", gamma, (z[:, None] - centre) ** 2) / nk
        out = np.maximum(out, np.sqrt(var) / max(np.std(z), np.finfo(float).tiny))
    return out


def collapsed_components(joint: np.ndarray, log_resp: np.ndarray, columns: np.ndarray) -> list[int]:
    """Components whose peak density marks a point mass (see module docstring).

    Either the density is beyond float64 resolution of the data's scale, or the
    component owns data without spread (one point, or copies of one value) and has a
    density far above the data's: for a continuous family that is sigma -> 0. Discrete
    components owning one repeated count have a pmf <= 1 and are not flagged.
    """
    peaks = np.where(np.isfinite(joint), joint, -np.inf).max(axis=0)
    excess = peaks - reference_logdensity(columns)
    live = component_counts(log_resp) >= EMPTY_COUNT
    pointlike = live & (_relative_spread(log_resp, columns) <= SPREAD_RTOL)
    flagged = (excess > COLLAPSE_NATS) | (pointlike & (excess > POINT_NATS))
    return [int(k) for k in np.flatnonzero(flagged)]


def diagnose(log_resp: np.ndarray, joint: np.ndarray, columns: np.ndarray) -> dict:
    """All findings as a dict; ``issues`` lists them in words (empty when the fit is clean)."""
    k_total = log_resp.shape[1]
    counts = component_counts(log_resp)
    empty = empty_components(log_resp)
    groups = identical_groups(identical_components(log_resp), k_total)
    collapsed = collapsed_components(joint, log_resp, columns)
    distinct = k_total - len(empty) - sum(len(g) - 1 for g in groups)
    issues = []
    if empty:
        issues.append(
            f"components {empty} are empty (expected counts {counts[empty].round(6).tolist()} "
            f"< {EMPTY_COUNT}): the data support fewer components."
        )
    for g in groups:
        issues.append(
            f"components {g} are identical (their likelihood ratio varies by < "
            f"{IDENTICAL_NATS} nats over the data): the data do not identify them separately."
        )
    if collapsed:
        issues.append(f"components {collapsed} collapsed onto single points.")
    return {
        "component_counts": counts,
        "empty_components": empty,
        "identical_components": groups,
        "collapsed_components": collapsed,
        "n_distinct_components": int(distinct),
        "issues": issues,
    }


def _collapse_message(joint: np.ndarray, columns: np.ndarray, k: int, names: str) -> str:
    i = int(np.argmax(np.where(np.isfinite(joint[:, k]), joint[:, k], -np.inf)))
    value = np.asarray(columns[i]).tolist()
    value = value[0] if len(value) == 1 else value
    return (
        f"component {k} collapsed onto observation {i} of {names} (value {value!r}): its "
        "scale shrank to a point, where the likelihood is unbounded, so the fit is "
        "meaningless. Remedies: mode='map' with a proper prior on the scale (e.g. "
        "pm.HalfNormal or pm.InverseGamma on sigma), the reg_covar option (e.g. "
        "reg_covar=1e-6, added to each closed-form Normal variance), fewer components, "
        "or other starts (n_init > 1)."
    )


def select_run(
    objectives: Sequence[float],
    joints: Sequence[np.ndarray],
    log_resps: Sequence[np.ndarray],
    columns: np.ndarray,
    names: str = "the data",
) -> tuple[int, dict]:
    """Index of the best restart and its diagnostics.

    Restarts whose components collapsed are never chosen (their objective is
    unboundedly high and meaningless); among the rest the highest objective wins. If
    every restart collapsed, raise :class:`CollapseError` naming the component.
    """
    collapsed = [
        collapsed_components(j, g, columns) for j, g in zip(joints, log_resps, strict=True)
    ]
    ok = [r for r, c in enumerate(collapsed) if not c]
    if not ok:
        r = int(np.nanargmax(objectives))
        raise CollapseError(_collapse_message(joints[r], columns, collapsed[r][0], names))
    best = max(ok, key=lambda r: (np.nan_to_num(objectives[r], nan=-np.inf), -r))
    found = diagnose(log_resps[best], joints[best], columns)
    found["collapsed_restarts"] = len(objectives) - len(ok)
    return best, found
