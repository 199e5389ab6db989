"""The exact Hessian of Q for Poisson and Bernoulli regression components (IRLS).

For a component family whose mean is the inverse canonical link of a linear predictor
``eta_ik = x_i' b_k`` (``mu = exp(eta)``, ``p = sigmoid(eta)``), Q's Hessian in the
coefficients ``b_k`` is block-diagonal by component:

    d2Q / db_k db_k' = -sum_i gamma_ik w_ik x_i x_i',   w = mu (Poisson), p (1 - p) (Bernoulli)

minus the Normal priors' precisions ``1 / s^2`` on the diagonal (``mode="map"``). That is
one pass over the data, where finite differences of Q's gradient take one per
coefficient; with it, the numeric step's damped Newton is iteratively reweighted least
squares. Q's value and gradient still come from the model's compiled graph, so only
the curvature is written here, and a test checks it against differences of that
gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import expit

from ppl_em.compiled.functions import EMFunctions
from ppl_em.model.blocks import Block


class GlmSpec(NamedTuple):
    """One regression family: ``index[k, j]``, the entry of ``u`` of coefficient j of
    component k; each coefficient's covariate (None for an intercept, a column of the
    data by position, or a whole array); the prior precision of each coefficient."""

    family: str
    index: np.ndarray
    covariates: tuple
    precision: np.ndarray


def _precision(prior: tuple | None, size: int, mode: str) -> np.ndarray:
    if mode != "map" or prior is None or prior[0] == "flat":
        return np.zeros(size)
    sigma = np.asarray(prior[2], dtype=float).reshape(-1)
    return np.broadcast_to(1.0 / sigma**2, (size,)).copy()


def glm_spec(functions: EMFunctions, block: Block) -> GlmSpec:
    layout, names = functions.layout, functions.data_names
    index, precision, covariates = [], [], []
    for j, slot in enumerate(block.slots.values()):
        index.append([layout.slices[layout.rv_names.index(rv.name)].start + e
                      for rv, e in slot.refs])  # fmt: skip
        precision.append(_precision(block.priors[f"b{j}"], len(slot.refs), functions.mode))
        ref = block.consts.get(f"x{j}")
        covariates.append(None if ref is None else ref.array if ref.name is None else
                          names.index(ref.name))  # fmt: skip
    return GlmSpec(block.family.removesuffix("_glm"), np.array(index).T, tuple(covariates),
                   np.array(precision).T)  # fmt: skip


def _design(spec: GlmSpec, chunk) -> np.ndarray:
    """The chunk's n x J covariates (a column of ones for an intercept)."""
    n, columns = chunk.n, []
    for cov in spec.covariates:
        if cov is None:
            columns.append(np.ones(n))
        elif isinstance(cov, int):
            columns.append(np.asarray(chunk.arrays[cov], dtype=float).reshape(n))
        else:
            columns.append(np.asarray(cov, dtype=float).reshape(-1)[chunk.start : chunk.start + n])
    return np.stack(columns, axis=1)


def known(specs: tuple[GlmSpec, ...], mask: np.ndarray) -> np.ndarray | None:
    """Which of the numeric entries ``u[mask]`` are regression coefficients, or None if
    there are none or some coefficient is not among them."""
    owned = np.zeros_like(mask)
    for spec in specs:
        owned[spec.index.ravel()] = True
    if not owned.any() or np.any(owned & ~mask):
        return None
    return owned[mask]


def local(batches) -> bool:
    """Whether the responsibilities are here to read (a cluster keeps them on its
    workers, where only Q and its gradient are summed)."""
    first = next(iter(batches()), None)
    return first is not None and isinstance(first[0], np.ndarray)


def glm_hessian(specs: tuple[GlmSpec, ...], u: np.ndarray, mask: np.ndarray, batches):
    """Q's Hessian over ``u[mask]`` among the regression coefficients (0 elsewhere: Q's
    terms in the coefficients involve no other variable)."""
    position = np.cumsum(mask) - 1
    h = np.zeros((int(mask.sum()),) * 2)
    for spec in specs:
        where = position[spec.index]
        coef = u[spec.index]
        for gamma_t, chunk in batches():
            x = _design(spec, chunk)
            for k, (at, b) in enumerate(zip(where, coef, strict=True)):
                eta = x @ b
                if spec.family == "poisson":
                    w = np.exp(eta)
                else:
                    p = expit(eta)
                    w = p * (1.0 - p)
                h[np.ix_(at, at)] -= x.T @ ((gamma_t[k] * w)[:, None] * x)
        h[where, where] -= spec.precision
    return h


def glm_specs(functions: EMFunctions, blocks: tuple[Block, ...]) -> tuple[GlmSpec, ...]:
    return tuple(glm_spec(functions, block) for block in blocks)
