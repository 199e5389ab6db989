"""Input checks that need more than the graph: fit arguments, data support, reg_covar.

Every check raises before EM starts, with a message naming the variable, the offending
value or position, and the fix, so a bad input never surfaces later as a NaN or as an
error from deep inside PyTensor or SciPy.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import pymc as pm
from pytensor.graph.traversal import ancestors
from pytensor.tensor import random as ptr

from ppl_em.errors import DataError
from ppl_em.graph import observed_data
from ppl_em.init import default_start

MODES = ("map", "mle")
MSTEPS = ("auto", "closed", "numeric")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_fit_args(**args: Any) -> None:
    """Type and range of :func:`ppl_em.fit`'s arguments (keyword names as in ``fit``)."""
    model = args.get("model")
    if model is not None and not isinstance(model, pm.Model):
        raise TypeError(f"model must be a pm.Model or None, got {type(model).__name__}.")
    latent = args.get("latent")
    if latent is not None and not isinstance(latent, str):
        raise TypeError(f"latent must be a variable name (str), got {latent!r}.")
    for name, allowed in (("mode", MODES), ("mstep", MSTEPS)):
        if args.get(name) not in allowed:
            raise ValueError(f"{name}={args.get(name)!r} is not one of {allowed}.")
    for name in ("max_iter", "n_init"):
        value = args.get(name)
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    tol = args.get("tol")
    if not (isinstance(tol, Real) and not isinstance(tol, bool) and np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r} must be a positive finite number, e.g. 1e-8.")
    reg = args.get("reg_covar", 0.0)
    if not (isinstance(reg, Real) and not isinstance(reg, bool) and np.isfinite(reg) and reg >= 0):
        raise ValueError(f"reg_covar={reg!r} must be a finite number >= 0, e.g. 1e-6.")
    seed = args.get("random_seed")
    if not (seed is None or _is_int(seed) or isinstance(seed, np.random.Generator)):
        raise TypeError(
            f"random_seed must be None, an int or a numpy Generator, got {type(seed).__name__}."
        )
    if not isinstance(args.get("progressbar", True), bool | np.bool_):
        raise TypeError(f"progressbar must be True or False, got {args.get('progressbar')!r}.")
    prepared = args.get("prepared")
    if prepared is not None and not (hasattr(prepared, "functions") and len(prepared) == 2):
        raise TypeError(
            f"prepared must be the result of ppl_em.prepare(...), got {type(prepared).__name__}."
        )


def observed_columns(functions) -> np.ndarray:
    """The observed values the label explains, raw, as an (N, d) float array."""
    graph = functions.graph
    data = dict(zip(functions.data_names, functions.data, strict=True))
    cols = [
        np.asarray(
            data[rv.name] if rv.name in data else observed_data(graph.model, rv), dtype=float
        ).reshape(graph.n_obs, -1)
        for rv in graph.dependents
    ]
    return np.concatenate(cols, axis=1)


def _family_names(graph) -> str:
    ops = []
    for rv in graph.dependents:
        comps = rv.owner.inputs[2:] if graph.kind == "mixture" else [rv]
        ops += [type(c.owner.op).__name__.removesuffix("RV") for c in comps]
    return "/".join(dict.fromkeys(ops))


def check_support(functions, u: np.ndarray) -> None:
    """Raise if some observation has log-likelihood -inf (or NaN) under every component.

    Evaluated at the starting point ``u`` (by default one M-step from a partition of the
    data, so the parameters are fitted to it): an impossible row there means the value
    is outside the components' support (a negative count, heads above n, a negative
    waiting time, ...) or, with a user ``start``, that the start is far from the data.
    """
    with np.errstate(all="ignore"):
        joint = np.asarray(functions.joint(u, *functions.data))
    bad = np.flatnonzero(~np.any(np.isfinite(joint) & (joint > -np.inf), axis=1))
    if not bad.size:
        return
    i = int(bad[0])
    graph = functions.graph
    row = observed_columns(functions)[i].tolist()
    value = row[0] if len(row) == 1 else row
    names = ", ".join(repr(rv.name) for rv in graph.dependents)
    raise DataError(
        f"observation {i} of {names} has value {value!r}, which no component "
        f"({_family_names(graph)}) can produce at the starting parameters: its "
        f"log-likelihood is -inf for every component ({bad.size} such observations, "
        f"indices {bad[:10].tolist()}). Remove or correct values outside the support, "
        "choose a family whose support contains them, or give a start closer to the data."
    )


def _normal_scale_vars(graph) -> set[str]:
    """Names of free variables that enter a Normal component's sigma."""
    names = set()
    for rv in graph.dependents:
        comps = rv.owner.inputs[2:] if graph.kind == "mixture" else [rv]
        for comp in comps:
            if isinstance(comp.owner.op, ptr.basic.NormalRV):
                sigma = comp.owner.op.dist_params(comp.owner)[1]
                names |= {p.name for p in graph.params if p in ancestors([sigma])}
    return names


def apply_reg_covar(prepared, reg_covar: float):
    """Return ``prepared`` with ``reg_covar`` added to every closed-form Normal variance
    and to the diagonal of every closed-form MvNormal covariance.

    Only the closed-form updates can apply the floor exactly as scikit-learn does;
    when a Normal scale is left to the numeric M-step we refuse rather than ignore it.
    """
    if reg_covar == 0:
        return prepared
    functions, config = prepared
    scales = _normal_scale_vars(functions.graph)
    numeric = sorted(scales - config.plan.closed)
    if not (scales or config.plan.mvn) or numeric:
        what = f"{numeric} use the numeric M-step" if numeric else "the model has none"
        raise ValueError(
            f"reg_covar={reg_covar} is only supported with the closed-form Normal and "
            f"MvNormal updates of free component scales, and {what}. Use reg_covar=0.0 "
            "and a proper prior on the scale with mode='map', or a model whose Normal "
            "blocks are closed-form (mstep='auto' or 'closed', conjugate or flat priors)."
        )
    blocks = tuple(
        b._replace(consts={**b.consts, "reg_covar": float(reg_covar)})
        if b.family == "normal" and "sigma" in b.slots
        else b
        for b in config.plan.blocks
    )
    mvn = tuple(spec._replace(reg_covar=float(reg_covar)) for spec in config.plan.mvn)
    plan = config.plan._replace(blocks=blocks, mvn=mvn)
    return prepared._replace(config=config._replace(plan=plan))


def _check_array(name: str, new: Any, old: np.ndarray) -> np.ndarray:
    arr = np.asarray(new)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"data for {name!r} has dtype {arr.dtype}; give a numeric array.")
    if arr.shape != old.shape:
        raise DataError(
            f"data for {name!r} has shape {arr.shape} but the model was compiled for shape "
            f"{old.shape}; build and prepare a model with the new shape."
        )
    if not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise DataError(
            f"data for {name!r} are not finite at index {bad} (value {arr[bad].item()!r}): "
            "remove or replace NaN/inf entries."
        )
    if np.issubdtype(old.dtype, np.integer) and not np.all(arr == np.round(arr)):
        bad = tuple(int(i) for i in np.argwhere(arr != np.round(arr))[0])
        raise DataError(
            f"data for {name!r} must be integers (its distribution is discrete) but index "
            f"{bad} holds {arr[bad].item()!r}; casting would silently truncate it."
        )
    out = arr.astype(old.dtype)  # a copy: later writes to the caller's array change nothing
    out.flags.writeable = False
    return out


def with_data(prepared, **arrays: Any):
    """``prepared`` with new observed arrays of the same shapes: refit without recompiling.

    Checks names, dtype, shape, finiteness, integrality and the components' support.
    """
    functions = prepared.functions
    current = dict(zip(functions.data_names, functions.data, strict=True))
    for name in arrays:
        if name not in current:
            raise DataError(
                f"{name!r} is not an observed variable compiled as data; they are "
                f"{list(current)} (pm.Data observations are changed with pm.set_data)."
            )
    new = {n: _check_array(n, arrays[n], old) if n in arrays else old for n, old in current.items()}
    functions = functions._replace(data=tuple(new[n] for n in functions.data_names))
    check_support(functions, default_start(functions, prepared.config, None))
    return prepared._replace(functions=functions)
