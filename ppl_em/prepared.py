"""Analyse and compile a model once (``prepare``), then fit it to new data without
recompiling (``with_data``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pymc as pm
from pytensor.graph.traversal import ancestors
from pytensor.tensor import random as ptr

from ppl_em.compiled.functions import EMFunctions, build_em_functions, with_arrays
from ppl_em.em.starts import check_support, default_start, initial_u
from ppl_em.errors import DataError
from ppl_em.model.data import data_spec
from ppl_em.model.graph import analyse_model
from ppl_em.model.recognise import build_plan
from ppl_em.options import MSTEPS
from ppl_em.steps.glm_rows import with_written_rows
from ppl_em.steps.mstep import MStepConfig, make_mstep_config, with_reg_covar
from ppl_em.steps.mvn_rows import with_written_mvn_rows


class PreparedEM(NamedTuple):
    """Compiled functions and M-step plan of one model; reusable across fits."""

    functions: EMFunctions
    config: MStepConfig


def prepare(
    model: pm.Model | None = None,
    *,
    latent: str | None = None,
    mode: str = "map",
    mstep: str = "auto",
    backend: str = "auto",
) -> PreparedEM:
    """Analyse and compile ``model`` once; pass the result to :func:`ppl_em.fit` as
    ``prepared``.

    ``backend`` (``"auto"``, ``"c"``, ``"numba"``, ``"python"``) picks how PyTensor runs
    the compiled functions; ``"auto"`` avoids C compilation for small closed-form
    problems and, for small data, until a fit has called Q 1000 times (a fast cold
    start); ``"c"`` is fastest per iteration once its cache is warm.
    """
    if mstep not in MSTEPS:
        raise ValueError(f"mstep={mstep!r} is not one of {MSTEPS}.")
    graph = analyse_model(model, latent)
    plan = build_plan(graph, mode, data_spec(graph))
    numeric = mstep == "numeric" or bool(set(plan.reasons) - plan.from_statistics)
    functions = build_em_functions(graph, mode, backend=backend, numeric=numeric)
    _check_finite(functions)
    config = make_mstep_config(functions, plan, mstep)
    if config.written_q:  # the E-step's rows written out too (ppl_em.steps.glm_rows)
        functions = with_written_rows(functions, config.glm, initial_u(functions))
    if config.mvn and backend != "python":  # MvNormal rows in numba (steps/mvn_rows.py)
        functions = with_written_mvn_rows(functions, config.mvn, config.plan.mvn,
                                          initial_u(functions))  # fmt: skip
    return PreparedEM(functions, config)


def _check_finite(functions: EMFunctions) -> None:
    """Every data array EM reads is finite: a NaN in a covariate would otherwise show
    up as an observation no component can produce, blaming its valid observed value."""
    spec = functions.spec
    names = spec.names + spec.fixed_names
    for name, array in zip(names, functions.data + functions.fixed_data, strict=True):
        if np.issubdtype(array.dtype, np.number) and not np.all(np.isfinite(array)):
            bad = _first_bad(~np.isfinite(array))
            raise DataError(
                f"{spec.describe(name)} is not finite at index {bad} "
                f"(value {array[bad].item()!r}): "
                "remove or replace NaN/inf entries (the observations they belong to) "
                "before building the model."
            )


def _normal_scale_vars(functions: EMFunctions) -> set[str]:
    """Names of free variables that enter a Normal component's sigma."""
    graph, names = functions.graph, set()
    for rv in graph.dependents:
        comps = rv.owner.inputs[2:] if graph.kind == "mixture" else [rv]
        for comp in comps:
            if isinstance(comp.owner.op, ptr.basic.NormalRV):
                sigma = comp.owner.op.dist_params(comp.owner)[1]
                names |= {p.name for p in graph.params if p in ancestors([sigma])}
    return names


def apply_reg_covar(prepared: PreparedEM, reg_covar: float) -> PreparedEM:
    """``prepared`` with ``reg_covar`` added to every closed-form Normal variance and to
    the diagonal of every closed-form MvNormal covariance.

    Only the closed-form updates can apply the floor exactly as scikit-learn does; when
    a Normal scale is left to the numeric M-step it is refused rather than ignored.
    """
    if reg_covar == 0:
        return prepared
    functions, config = prepared
    scales = _normal_scale_vars(functions)
    numeric = sorted(scales - config.plan.closed)
    if not (scales or config.plan.mvn) or numeric:
        what = f"{numeric} use the numeric M-step" if numeric else "the model has none"
        raise ValueError(
            f"reg_covar={reg_covar} is only supported with the closed-form Normal and "
            f"MvNormal updates of free component scales, and {what}. Use reg_covar=0.0 "
            "and a proper prior on the scale with mode='map', or a model whose Normal "
            "blocks are closed-form (mstep='auto' or 'closed', conjugate or flat priors)."
        )
    return prepared._replace(config=with_reg_covar(config, reg_covar))


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_array(name: str, new: Any, old: np.ndarray) -> np.ndarray:
    """``new`` as a read-only copy in ``old``'s dtype, or a clear error: wrong type or
    shape, masked or non-finite entries, or values the dtype would change."""
    if np.ma.isMaskedArray(new) and np.ma.getmaskarray(new).any():
        raise DataError(
            f"data for {name!r} is a masked array with masked entries at index "
            f"{_first_bad(np.ma.getmaskarray(new))}; ppl_em would fit the values under the "
            "mask. Drop those observations or fill them before fitting."
        )
    arr = np.asarray(new)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"data for {name!r} has dtype {arr.dtype}; give a numeric array.")
    if arr.shape != old.shape:
        raise DataError(
            f"data for {name!r} has shape {arr.shape} but the model was compiled for shape "
            f"{old.shape}; build and prepare a model with the new shape."
        )
    if not np.all(np.isfinite(arr)):
        bad = _first_bad(~np.isfinite(arr))
        raise DataError(
            f"data for {name!r} are not finite at index {bad} (value {arr[bad].item()!r}): "
            "remove or replace NaN/inf entries (EM integrates missing values out only "
            "in the data the model was built with)."
        )
    if np.issubdtype(old.dtype, np.integer) and not np.all(arr == np.round(arr)):
        bad = _first_bad(arr != np.round(arr))
        raise DataError(
            f"data for {name!r} must be integers (its distribution is discrete) but index "
            f"{bad} holds {arr[bad].item()!r}; casting would silently truncate it."
        )
    out = arr.astype(old.dtype)  # a copy: later writes to the caller's array change nothing
    with np.errstate(invalid="ignore"):
        changed = out != arr
    if np.any(changed):
        bad = _first_bad(changed)
        raise DataError(
            f"data for {name!r} at index {bad} holds {arr[bad].item()!r}, which the model's "
            f"dtype {old.dtype} cannot hold (it would become {out[bad].item()!r})."
        )
    return out


def with_data(prepared: PreparedEM, **arrays: Any) -> PreparedEM:
    """``prepared`` with new data arrays of the same shapes: refit without recompiling.

    Names are the observed variables' and the ``pm.Data`` covariates'. Checks names,
    dtype, shape, finiteness, integrality and the components' support.
    """
    functions = prepared.functions
    spec = functions.spec
    names = spec.names + spec.fixed_names
    current = dict(zip(names, functions.data + functions.fixed_data, strict=True))
    for name in arrays:
        if name not in current:
            raise DataError(
                f"{name!r} is not an observed variable compiled as data; they are {list(current)}."
            )
    new = {n: check_array(n, arrays[n], old) if n in arrays else old for n, old in current.items()}
    functions = with_arrays(
        functions,
        tuple(new[n] for n in spec.names),
        tuple(new[n] for n in spec.fixed_names),
    )
    check_support(functions, default_start(functions, prepared.config, None))
    return prepared._replace(functions=functions)
