"""What users say about their observations besides the data: a weight per observation,
known labels for some, and parameters held at given values.

Weights are frequency or importance weights: observation i counts ``w_i`` times in the
log-likelihood and in every statistic (integer weights fit exactly like repeated
rows). Known labels make an observation's responsibilities one-hot (semi-supervised
EM). Fixed parameters use PyMC's own intervention, ``pm.do``: the model then has those
variables as known values, and EM fits the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pymc as pm

from ppl_em.compiled.functions import EMFunctions
from ppl_em.errors import DataError, StartError


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_weights(weights: Any, n: int) -> np.ndarray:
    """One finite, non-negative weight per observation, not all zero (read-only copy)."""
    w = np.asarray(weights)
    if not np.issubdtype(w.dtype, np.number) or w.dtype == bool:
        raise TypeError(f"weights has dtype {w.dtype}; give one number per observation.")
    w = w.astype(float).reshape(-1) if w.ndim == 1 else w.astype(float)
    if w.shape != (n,):
        raise DataError(f"weights has shape {w.shape}; give one weight per observation: ({n},).")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"weights[{i}] = {float(w[i])!r}: weights must be finite and >= 0 (0 leaves an "
            "observation out)."
        )
    if not w.sum() > 0:
        raise DataError("weights are all 0: at least one observation must count.")
    w = w.copy()
    w.flags.writeable = False
    return w


def check_labels(labels: Any, n: int, k: int) -> np.ndarray:
    """Known labels in 0..K-1, -1 (or a masked entry) where unknown (read-only copy)."""
    if np.ma.isMaskedArray(labels):
        labels = np.ma.filled(np.ma.asarray(labels).astype(float), -1.0)
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise DataError(
            f"labels has shape {arr.shape}; give one per observation: ({n},), -1 where unknown."
        )
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        raise TypeError(f"labels has dtype {arr.dtype}; give integers in 0..K-1, -1 where unknown.")
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < -1) | (arr >= k)
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"labels[{i}] = {arr[i].item()!r} is not a component: known labels are 0..{k - 1}, "
            "and -1 (or a masked entry) marks an unknown one."
        )
    out = arr.astype(np.int64)
    out.flags.writeable = False
    return out


def with_observations(functions: EMFunctions, weights=None, labels=None) -> EMFunctions:
    """``functions`` carrying checked weights and known labels (None leaves them out)."""
    n, k = functions.graph.n_obs, functions.graph.n_components
    return functions._replace(
        weights=None if weights is None else check_weights(weights, n),
        labels=None if labels is None else check_labels(labels, n, k),
    )


def fix_parameters(model: pm.Model, fixed: Mapping) -> pm.Model:
    """``model`` with the free variables named in ``fixed`` held at the given values
    (``pm.do``), after checking names, shapes and support."""
    if not isinstance(fixed, Mapping):
        raise StartError(
            f"fixed must be a dict of variable name -> value, got {type(fixed).__name__}."
        )
    free = {rv.name: rv for rv in model.free_RVs if not rv.dtype.startswith(("int", "uint"))}
    values = {}
    for name, value in fixed.items():
        if name in model.named_vars and model[name] in model.free_RVs and name not in free:
            raise StartError(
                f"fixed has {name!r}, the label; give known labels with labels= instead."
            )
        if name not in free:
            raise StartError(
                f"fixed has {name!r}, which is not a free variable of the model; they are "
                f"{sorted(free)}."
            )
        rv = free[name]
        arr = np.asarray(value, dtype=rv.dtype)
        if arr.shape != tuple(rv.shape.eval()):
            raise StartError(f"fixed[{name!r}] has shape {arr.shape} but {name!r} has shape "
                             f"{tuple(rv.shape.eval())}.")  # fmt: skip
        logp = pm.logp(rv, arr).eval()
        if not np.all(np.isfinite(logp)):
            raise StartError(
                f"fixed[{name!r}] = {arr.tolist()} is outside the support of {name!r}: give "
                "values its prior allows (probabilities in (0, 1), scales > 0, ...)."
            )
        values[name] = arr
    return pm.do(model, values)
