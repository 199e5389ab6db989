"""Closed-form M-step for multivariate normal components with a full covariance each.

Q's MvNormal part depends on the free variables only through each component's mean
``mu_k`` and covariance ``Sigma_k``; with constant-density priors (or ``mode="mle"``)
it is maximised by the responsibility-weighted mean and covariance, the update of
scikit-learn's ``covariance_type="full"``. Users write covariances in many ways
(``pm.LKJCholeskyCov`` factors, standard deviations and correlations, free Cholesky
entries), so rather than recognise each, ppl_em maps the closed-form ``(mu_k, Sigma_k)``
back to the free variables by solving ``params(u) = target`` on the model's own compiled
parameter map: Gauss-Newton from the previous solution (2-3 steps near convergence),
Levenberg-Marquardt if that stalls, with a forward-difference Jacobian grouped by
sparsity. That solve has ``K (D + D(D+1)/2)`` unknowns and nothing in it grows with N.
It is exact when the parameterisation is one-to-one, which the plan checks by counting;
if a solve still misses the target, the M-step maximises Q numerically over those
variables instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytensor
import pytensor.tensor as pt
from pymc.distributions.continuous import FlatRV, HalfFlatRV
from pymc.pytensorf import compile as pymc_compile
from pytensor.graph.replace import graph_replace
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorVariable
from pytensor.tensor.random.basic import MvNormalRV, UniformRV
from scipy.optimize import least_squares

from ppl_em.compile import EMFunctions, backend_mode, flat_replacements
from ppl_em.graph import MixtureGraph, direct_users

# Largest whitened residual accepted as "params(u) reproduces the target": parameters
# within 1e-9 relative of the weighted moments change Q by far less than EM's tol.
SOLVE_TOL = 1e-9
_TINY = float(np.finfo(np.float64).tiny)


class MvnSpec(NamedTuple):
    """An MvNormal block: ``mu`` (K, D) and ``cov`` (K, D, D) as graphs of the value
    variables of ``rvs``."""

    data_name: str
    rvs: tuple[TensorVariable, ...]
    mu: TensorVariable
    cov: TensorVariable
    reg_covar: float = 0.0


def _label_params(graph: MixtureGraph, dist: TensorVariable):
    """The dependent's (mu, cov) with the label replaced by its domain 0..K-1."""
    (mu, cov) = graph.model.replace_rvs_by_values(dist.owner.op.dist_params(dist.owner))
    label = graph.value_var(graph.label_rv)
    domain = pt.arange(graph.n_components, dtype=label.dtype)
    # Not graph_replace: the label has static shape (N,), its domain (K,). The value
    # variables are graph inputs, so the rebuilt graph still refers to the same ones.
    return pytensor.clone_replace([mu, cov], {label: domain}, rebuild_strict=False)


def _drop_unit_batch(var: TensorVariable, core_ndim: int) -> TensorVariable:
    """Drop batch axes of static length 1 (``pm.Mixture`` aligns components that way)."""
    batch = var.type.shape[: var.ndim - core_ndim]
    keep = [i for i, n in enumerate(batch) if n != 1] + list(range(len(batch), var.ndim))
    return (
        var.squeeze(axis=[i for i in range(var.ndim) if i not in keep])
        if len(keep) < var.ndim
        else var
    )


def _mixture_params(comps: list[TensorVariable]):
    params = [
        (_drop_unit_batch(m, 1), _drop_unit_batch(c, 2))
        for m, c in (comp.owner.op.dist_params(comp.owner) for comp in comps)
    ]
    if len(params) == 1:
        return params[0]
    return pt.stack([m for m, _ in params]), pt.stack([c for _, c in params])


def _in_terms_of_values(graph: MixtureGraph, mu, cov):
    return tuple(graph.model.replace_rvs_by_values([mu, cov]))


def _block_params(graph: MixtureGraph, dist: TensorVariable | None):
    """``(mu, cov, data_name)`` per component, ``(rvs, reason)`` if the parameters are not
    one per component, or None if the family is not MvNormal."""
    if graph.kind == "label":
        dists, name = [dist], dist.name
    else:
        mix = graph.dependents[0]
        dists, name = list(mix.owner.inputs[2:]), mix.name
    if not all(isinstance(d.owner.op, MvNormalRV) for d in dists):
        return None
    rvs = [p for p in graph.params if p in ancestors([i for d in dists for i in d.owner.inputs])]
    try:
        if graph.kind == "label":
            mu, cov = _label_params(graph, dist)
        else:
            mu, cov = _in_terms_of_values(graph, *_mixture_params(dists))
    except Exception as err:  # a graph that does not rebuild over the domain
        return rvs, f"its MvNormal parameters are not one per component ({err})"
    k, d = graph.n_components, mu.type.shape[-1]
    if mu.type.shape != (k, d) or cov.type.shape != (k, d, d):
        return rvs, (
            f"its MvNormal mean and covariance have shapes {mu.type.shape} and "
            f"{cov.type.shape}, not one ({d},) mean and ({d}, {d}) covariance per component"
        )
    return mu, cov, name


def _constant_density(rv: TensorVariable) -> bool:
    return isinstance(rv.owner.op, FlatRV | HalfFlatRV | UniformRV)


def _owned_reason(graph, rvs, owners, weights, mode, k, d) -> str | None:
    size = sum(int(np.prod(r.type.shape)) if r.ndim else 1 for r in rvs)
    needed = k * (d + d * (d + 1) // 2)
    if size != needed:
        return (
            f"its {size} free values do not map one-to-one onto {k} means and full "
            f"covariances ({needed} values)"
        )
    if set(rvs) & set(ancestors([weights])):
        return "it also enters the mixture weights"
    # In mode="mle" the priors and potentials are not part of Q; other observed
    # variables always are.
    allowed = set(owners) | ({"potential", *graph.params} if mode == "mle" else set())
    if any(direct_users(graph, r) - allowed for r in rvs):
        return "it also enters other parts of the model (a hyperprior, potential or variable)"
    if mode == "map" and not all(_constant_density(r) for r in rvs):
        return (
            "its prior is not flat, so the MvNormal mean and covariance have no closed "
            "form in mode='map' (use pm.Flat/HalfFlat/Uniform priors or mode='mle')"
        )
    return None


def mvn_specs(graph: MixtureGraph, mode: str) -> tuple[list[MvnSpec], dict[str, str]]:
    """The MvNormal blocks of ``graph`` and, for rejected ones, why (by variable)."""
    if graph.kind == "label":
        candidates = [(d, {d}) for d in graph.dependents]
        (weights,) = graph.label_rv.owner.op.dist_params(graph.label_rv.owner)
    else:
        candidates = [(None, {graph.dependents[0]})]
        weights = graph.dependents[0].owner.inputs[1]
    specs, reasons = [], {}
    for dist, owners in candidates:
        found = _block_params(graph, dist)
        if found is None:
            continue
        if len(found) == 2:
            rvs, why = found
            reasons.update({r.name: why for r in rvs if r is not weights})
            continue
        mu, cov, name = found
        used = set(ancestors([mu, cov]))
        rvs = tuple(p for p in graph.params if graph.value_var(p) in used)
        k, d = mu.type.shape
        reason = _owned_reason(graph, rvs, owners, weights, mode, k, d)
        if reason is None:
            specs.append(MvnSpec(name, rvs, mu, cov))
        else:
            reasons.update({r.name: reason for r in rvs})
    return specs, reasons


class MvnUpdate(NamedTuple):
    """Compiled pieces of one MvNormal block.

    ``mask`` marks its entries of the flat ``u``; ``params(u)`` returns
    ``concat(mu.ravel(), cov.ravel())``; ``pattern[r, c]`` says whether block entry ``c``
    moves output ``r``, and ``groups`` partitions the entries into sets that move disjoint
    outputs, so one forward difference per group gives the whole Jacobian (components
    are independent, so that is about ``1/K`` of the entries).
    """

    mask: np.ndarray
    params: Callable
    pattern: np.ndarray
    groups: tuple[np.ndarray, ...]


def weighted_moments(gamma: np.ndarray, x: np.ndarray, reg_covar: float = 0.0):
    """Responsibility-weighted means (K, D) and covariances (K, D, D), as scikit-learn's
    ``_estimate_gaussian_parameters`` computes them (``reg_covar`` on the diagonal)."""
    nk = np.maximum(gamma.sum(axis=0), _TINY)
    mu = (gamma.T @ x) / nk[:, None]
    k, d = mu.shape
    cov = np.empty((k, d, d))
    for j in range(k):
        dev = x - mu[j]
        cov[j] = (gamma[:, j, None] * dev).T @ dev / nk[j]
        cov[j].flat[:: d + 1] += reg_covar
    return mu, cov


# Second moments about the data mean lose ``eps * (shift^2 / var + 1)`` of a variance to
# cancellation, ``shift`` being the component's offset from that mean: with this limit
# on ``shift^2 / var`` at most 2e-12 relative, so the statistics path and the two-pass
# update agree to the 1e-12 the tests ask; beyond it the caller uses the two passes.
CANCELLATION_LIMIT = 1e4


def mvn_columns(x: np.ndarray) -> tuple[np.ndarray, list]:
    """Per-observation columns whose weighted sums give the MvNormal update in the fused
    E-step: the data centred on their mean ``m`` and the products of centred pairs.
    Centring keeps ``E[x x^T] - mu mu^T`` accurate unless a component sits far outside
    its own spread (checked in :func:`moments_from_stats`). Squares are products with
    ``a == b``."""
    mean = x.mean(axis=0)
    xc = x - mean
    d = x.shape[1]
    named = [(("x", a), np.ascontiguousarray(xc[:, a])) for a in range(d)]
    named += [(("xx", a, b), xc[:, a] * xc[:, b]) for a in range(d) for b in range(a, d)]
    return mean, named


def moments_from_stats(nk: np.ndarray, stats, request, i: int, reg_covar: float = 0.0):
    """Weighted means and covariances of MvNormal block ``i`` from the fused E-step's
    sums over :func:`mvn_columns`; None if cancellation would cost accuracy (a
    component whose offset from the data mean exceeds 100 of its standard deviations),
    and then the caller computes them from the responsibilities in two passes."""
    nk = np.maximum(nk, _TINY)[:, None]
    mean = request.mvn_means[i]
    d = mean.shape[0]
    col = {key[2:]: c for key, c in request.index.items() if key[:2] == ("mvn", i)}
    shift = np.stack([stats.s[col[("x", a)]] for a in range(d)], axis=1) / nk
    with np.errstate(over="ignore", invalid="ignore"):
        var = np.stack([stats.s[col[("xx", a, a)]] for a in range(d)], axis=1) / nk - shift**2
    if not (np.all(np.isfinite(var)) and np.all(shift**2 <= CANCELLATION_LIMIT * var)):
        return None
    cov = np.empty((nk.shape[0], d, d))
    for a in range(d):
        cov[:, a, a] = var[:, a] + reg_covar
        for b in range(a + 1, d):
            cross = stats.s[col[("xx", a, b)]] / nk[:, 0] - shift[:, a] * shift[:, b]
            cov[:, a, b] = cov[:, b, a] = cross
    return mean + shift, cov


def _whitened(winv: np.ndarray, mu_err: np.ndarray, cov_err: np.ndarray) -> np.ndarray:
    """Errors in the target's own scale, ``W (mu - mu*)`` and ``W (Sigma - Sigma*) W^T``
    with ``W = chol(Sigma*)^-1``, so one tolerance fits every unit and correlation.
    Trailing axes (the Jacobian's columns) are carried through."""
    r_mu = np.einsum("kij,kj...->ki...", winv, mu_err)
    r_cov = np.einsum("kia,kab...,kjb->kij...", winv, cov_err, winv)
    tail = mu_err.shape[2:]
    return np.concatenate([r_mu.reshape(-1, *tail), r_cov.reshape(-1, *tail)])


def _fd_jacobian(params, full, cols, sub, base, pattern, groups) -> np.ndarray:
    """Forward differences of ``params`` in the block entries, one call per group."""
    jac = np.zeros((base.shape[0], cols.shape[0]))
    for group in groups:
        h = 1.5e-8 * (1.0 + np.abs(sub[group]))
        full[cols] = sub
        full[cols[group]] += h
        diff = params(full) - base
        for c, hc in zip(group, h, strict=True):
            rows = pattern[:, c]
            jac[rows, c] = diff[rows] / hc
    full[cols] = sub
    return jac


def solve_params(
    update: MvnUpdate, u: np.ndarray, mu_t: np.ndarray, cov_t: np.ndarray
) -> np.ndarray | None:
    """``u`` with the block's entries set so that ``params(u) == (mu_t, cov_t)``, or None
    if the target is not positive definite or Levenberg-Marquardt cannot reach it."""
    try:
        winv = np.linalg.inv(np.linalg.cholesky(cov_t))
    except np.linalg.LinAlgError:
        return None
    full, cols = u.copy(), np.flatnonzero(update.mask)
    k, d = mu_t.shape
    target = np.concatenate([mu_t.ravel(), cov_t.ravel()])

    def whiten(values):
        tail = values.shape[1:]
        mu, cov = values[: k * d].reshape(k, d, *tail), values[k * d :].reshape(k, d, d, *tail)
        return _whitened(winv, mu, cov)

    def residual(sub):
        full[cols] = sub
        return whiten(update.params(full) - target)

    def jacobian(sub):
        full[cols] = sub
        base = update.params(full)
        jac = _fd_jacobian(update.params, full, cols, sub, base, update.pattern, update.groups)
        return whiten(jac)

    with np.errstate(all="ignore"):
        x = _gauss_newton(residual, jacobian, u[cols])
        if x is None:
            x = _levenberg_marquardt(residual, jacobian, u[cols])
    if x is None:
        return None
    out = u.copy()
    out[cols] = x
    return out


def _gauss_newton(residual, jacobian, x: np.ndarray, max_iter: int = 8) -> np.ndarray | None:
    """Plain Gauss-Newton: from the previous M-step's solution the target is close and
    this converges quadratically in 2-3 steps; None as soon as a step does not halve
    the residual (then Levenberg-Marquardt takes over from the start)."""
    r = residual(x)
    for _ in range(max_iter):
        if not np.all(np.isfinite(r)):
            return None
        if np.max(np.abs(r)) <= SOLVE_TOL:
            return x
        step = np.linalg.lstsq(jacobian(x), r, rcond=None)[0]
        x_new = x - step
        r_new = residual(x_new)
        if not np.linalg.norm(r_new) <= 0.5 * np.linalg.norm(r):
            return None
        x, r = x_new, r_new
    return x if np.max(np.abs(r)) <= SOLVE_TOL else None


def _levenberg_marquardt(residual, jacobian, x: np.ndarray) -> np.ndarray | None:
    try:
        res = least_squares(
            residual, x, jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not (np.all(np.isfinite(res.fun)) and np.max(np.abs(res.fun)) <= SOLVE_TOL):
        return None
    return res.x


def _sparsity(params, mask: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Which outputs each block entry moves, from forward differences at two points
    (the second, random one, so that a derivative that happens to vanish at the first
    is not taken for a structural zero), and a greedy grouping of disjoint entries."""
    cols = np.flatnonzero(mask)
    singles = tuple(np.array([c]) for c in range(cols.shape[0]))
    rng = np.random.default_rng(0)
    pattern = None
    for scale in (0.0, 0.3):
        full = np.zeros(mask.shape[0])
        full[cols] = scale * rng.standard_normal(cols.shape[0])
        base = params(full)
        dense = np.ones((base.shape[0], cols.shape[0]), dtype=bool)
        found = _fd_jacobian(params, full, cols, full[cols], base, dense, singles) != 0
        pattern = found if pattern is None else pattern | found
    groups, touched = [], []
    for c in range(cols.shape[0]):
        for g, rows in enumerate(touched):
            if not np.any(rows & pattern[:, c]):
                groups[g].append(c)
                rows |= pattern[:, c]
                break
        else:
            groups.append([c])
            touched.append(pattern[:, c].copy())
    return pattern, tuple(np.array(g) for g in groups)


def compile_update(functions: EMFunctions, spec: MvnSpec) -> MvnUpdate:
    """Compile ``spec``'s parameter map over the flat vector and find its sparsity.

    C code: the map is called a few dozen times per M-step, and a C call costs a fifth
    of a NumPy-backed one (0.02 vs 0.12 ms measured, D=4, K=3).
    """
    graph, layout = functions.graph, functions.layout
    flat = pt.vector("u", dtype="float64")
    replace = flat_replacements(graph, layout, flat)
    mu, cov = graph_replace([spec.mu, spec.cov], replace, strict=False)
    out = pt.concatenate([pt.cast(mu, "float64").ravel(), pt.cast(cov, "float64").ravel()])
    params = pymc_compile([flat], out, mode=backend_mode("c"), on_unused_input="ignore")
    names = {r.name for r in spec.rvs}
    mask = np.zeros(layout.size, dtype=bool)
    for name, sl in zip(layout.rv_names, layout.slices, strict=True):
        mask[sl] = name in names
    return MvnUpdate(mask, params, *_sparsity(params, mask))
