"""Standard errors of an EM estimate from the observed information.

The observed information is minus the Hessian of the marginal log posterior
(``mode="map"``; the marginal log-likelihood for ``"mle"``) with respect to the
unconstrained parameter vector ``u`` that ``pm.find_MAP`` and ppl_em optimise over,
taken at the EM estimate. Its inverse is the asymptotic covariance of ``u``; the delta
method maps it to the constrained space with the Jacobian ``J = d theta / d u`` of the
backward transforms: ``Cov(theta) = J Cov(u) J^T``. Because the gradient vanishes at the
mode, this equals inverting the Hessian in any full-rank parameterisation, and it gives
every element of a simplex (K weights from K - 1 free coordinates) its own SE.

Three ways to the Hessian (``method``): ``"louis"`` (the default) is Louis' identity
on finite differences of EM's compiled rows (:mod:`ppl_em.inference.information`),
with each variable's step in its own standard error, so it holds in any units and
compiles nothing; ``"gradient"`` takes central differences of the exact marginal
gradient (Fisher's identity on Q's compiled gradient, which it compiles to C on first
use); ``"exact"`` compiles the full PyTensor Hessian. The last two are the independent
checks of the first.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.compiled.curvature import compile_curvature
from ppl_em.compiled.layout import FlatLayout, element_names
from ppl_em.errors import NotIdentifiedError
from ppl_em.inference.information import louis_information
from ppl_em.result import EMResult
from ppl_em.steps.estep import e_step, q_and_grad, whole_data

# Relative size below which an eigenvalue of the observed information counts as zero:
# well above float64 round-off of a Hessian built from O(N) terms.
EIG_RTOL = 1e-9
# For method="louis", the same in coordinates scaled to unit complete-data information
# (unit-free; the scaled observed information has a diagonal of at most 1): an
# eigenvalue below this keeps under 1e-7 of the complete data's information along its
# direction. Well above the method's error there (about 1e-10, 1e-9 at worst).
LOUIS_FLAT = 1e-7


class Curvature(NamedTuple):
    """Objective, gradient, Hessian (in ``u``) and Jacobian of the constrained values;
    for ``method="louis"`` also each coordinate's complete-data standard deviation
    scale (``sqrt`` of the complete information's diagonal), the units the definiteness
    check and the inversion work in."""

    objective: float
    gradient: np.ndarray
    hessian: np.ndarray
    jacobian: np.ndarray
    scale: np.ndarray | None = None


def _marginal_gradient(result: EMResult, u: np.ndarray) -> np.ndarray:
    """Exact gradient of the marginal objective at ``u`` from EM's compiled Q gradient.

    Fisher's identity: d/du log p(x | u) = dQ(u'; gamma(u)) / du' at u' = u, where gamma(u)
    are the responsibilities at u. EM has compiled both pieces already, so this costs no
    new compilation.
    """
    functions = result.prepared.functions
    chunk = whole_data(functions)
    log_resp = e_step(functions, u, chunk, keep_resp=True).log_resp
    _, gradient = q_and_grad(functions, u, [(np.exp(log_resp.T), chunk)])
    return np.asarray(gradient, dtype=float)


def _central_jacobian(fn, u: np.ndarray, rel: float = 1e-5) -> np.ndarray:
    """Central differences of a vector function; error O(step^2), ~1e-9 relative here."""
    steps = rel * np.maximum(1.0, np.abs(u))
    cols = []
    for j, h in enumerate(steps):
        e = np.zeros_like(u)
        e[j] = h
        cols.append((fn(u + e) - fn(u - e)) / (2 * h))
    return np.stack(cols, axis=-1)


def _constrained_flat(result: EMResult, u: np.ndarray) -> np.ndarray:
    constrain = result.prepared.functions.constrain
    return np.concatenate([np.ravel(v) for v in constrain(u)]).astype(float)


def curvature(result: EMResult, method: str = "louis", chunk_size: int | None = None) -> Curvature:
    """The objective's derivatives at the EM estimate ``result.unconstrained``.

    ``method="louis"`` uses Louis' identity on finite differences of EM's compiled rows
    (no compilation; over the data in chunks of ``chunk_size`` observations, default
    bounded by memory); ``"exact"`` builds the PyTensor Hessian graph and evaluates it
    once on NumPy-backed Ops (seconds: graph rewrites, no C compilation); ``"gradient"``
    takes central differences of the exact PyTensor gradient (Fisher's identity on EM's
    compiled Q gradient, compiled on first use), which agrees with the exact Hessian to
    about 1e-7 relative.
    """
    u = np.asarray(result.unconstrained, dtype=float)
    scale = None
    if method == "louis":
        info = louis_information(result.prepared.functions, u, chunk_size)
        obj, gradient, hess = info.objective, info.gradient, -info.observed
        scale = np.sqrt(np.abs(np.diag(info.complete)))
    elif method == "exact":
        functions = result.prepared.functions
        curvature_fn = compile_curvature(functions)
        obj, gradient, hess, jac = curvature_fn(u, *functions.data, *functions.fixed_data)
    elif method == "gradient":
        gradient = _marginal_gradient(result, u)
        hess = _central_jacobian(lambda v: _marginal_gradient(result, v), u)
        obj = result.history[-1]
    else:
        raise ValueError(
            f"method={method!r} is not 'louis' (Louis' identity on EM's rows), 'gradient' "
            "(differences of the PyTensor gradient) or 'exact' (PyTensor Hessian)."
        )
    if method != "exact":
        jac = _central_jacobian(lambda v: _constrained_flat(result, v), u)
    hess = 0.5 * (hess + hess.T)  # symmetrise away round-off of the two derivative passes
    return Curvature(float(obj), np.asarray(gradient), np.asarray(hess), np.asarray(jac), scale)


def _element_names(layout: FlatLayout) -> list[str]:
    """``"<value var>[i]"`` for each entry of ``u`` (unconstrained coordinates)."""
    names = []
    for value_name, sl in zip(layout.value_names, layout.slices, strict=True):
        size = sl.stop - sl.start
        names += element_names(value_name, () if size == 1 else (size,))
    return names


def _check_definite(info: np.ndarray, layout: FlatLayout, scale=None) -> None:
    """Raise NotIdentifiedError naming the coordinates of the flat directions: relative
    to the largest eigenvalue (``EIG_RTOL``), or, given each coordinate's ``scale``, in
    coordinates scaled by it (``LOUIS_FLAT``), which makes the test unit-free."""
    if scale is None:
        eigval, eigvec = np.linalg.eigh(info)
        limit = EIG_RTOL * max(1.0, float(np.max(np.abs(eigval))))
    else:
        eigval, eigvec = np.linalg.eigh(info / np.outer(scale, scale))
        limit = LOUIS_FLAT
    flat = eigval <= limit
    if not flat.any():
        return
    names = _element_names(layout)
    involved = np.abs(eigvec[:, flat]).max(axis=1) > 0.3
    culprits = [names[i] for i in np.flatnonzero(involved)] or names
    raise NotIdentifiedError(
        "the Hessian of the marginal log posterior at the EM estimate is not negative "
        f"definite (smallest eigenvalue of the observed information {eigval.min():.3g}, "
        f"largest {eigval.max():.3g}{'' if scale is None else ', in complete-data units'}); "
        f"the data do not identify the unconstrained "
        f"coordinates {culprits} at this estimate (typically two components are equal or "
        "one is empty, or EM stopped at a saddle). Refit with other starts (n_init > 1), "
        "fewer components, or more informative priors before asking for standard errors."
    )


def _unit_scale(scale: np.ndarray) -> np.ndarray:
    """``scale`` with 1 where it is not positive and finite (a coordinate that moves
    nothing: the definiteness check names it)."""
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)


def covariance(
    result: EMResult, method: str = "louis", chunk_size: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Asymptotic covariance of the flattened constrained parameters (delta method).

    Returns the element names (``"w[0]"``, ``"mu[1, 0]"``, ArviZ's convention) and the
    matrix ``J (-H)^{-1} J^T``.
    """
    layout = result.prepared.functions.layout
    curv = curvature(result, method, chunk_size)
    info = -curv.hessian
    if not np.all(np.isfinite(info)):
        raise NotIdentifiedError(
            "the Hessian of the marginal log posterior at the EM estimate is not finite; "
            "a parameter sits on the boundary of its support (e.g. a weight of 0): refit "
            "with fewer components or a prior that keeps it inside."
        )
    if curv.scale is None:
        _check_definite(info, layout)
        cov_u = np.linalg.inv(info)
    else:  # in coordinates of unit complete-data information: any units invert alike
        scale = _unit_scale(curv.scale)
        _check_definite(info, layout, scale)
        cov_u = np.linalg.inv(info / np.outer(scale, scale)) / np.outer(scale, scale)
    cov = curv.jacobian @ cov_u @ curv.jacobian.T
    names = []
    for name in layout.rv_names:
        names += element_names(name, np.shape(result.params[name]))
    return names, 0.5 * (cov + cov.T)


def standard_errors(
    result: EMResult, method: str = "louis", chunk_size: int | None = None
) -> dict[str, np.ndarray]:
    """EM standard errors in the constrained space, by free-variable name.

    Observed information: minus the Hessian of the marginal log posterior
    (log-likelihood for ``mode="mle"``) in the unconstrained space at the estimate,
    inverted and mapped to the constrained space by the delta method. Raises
    :class:`NotIdentifiedError` if the Hessian is not negative definite. ``method`` is
    ``"louis"`` (default: Louis' identity on EM's compiled rows, no compilation),
    ``"gradient"`` or ``"exact"`` (see :func:`curvature`); ``chunk_size`` bounds the
    observations ``"louis"`` holds at once.
    """
    _, cov = covariance(result, method, chunk_size)
    se_flat = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    out, start = {}, 0
    for name in result.prepared.functions.layout.rv_names:
        shape = np.shape(result.params[name])
        size = int(np.prod(shape))
        out[name] = se_flat[start : start + size].reshape(shape)
        start += size
    return out
