"""Q of a regression mixture written out: its value and gradient in a few NumPy passes.

Where every observed dependent is one regression family of :mod:`ppl_em.steps.glm`
over all K components and every other variable is in the label's weights, Q is

    sum_i sum_k gamma_ik l(y_i | eta_ik)  +  sum_k N_k log w_k  +  R(u),

``l`` the family's log density and ``R`` the terms that are not sums over observations
(log priors, other observed variables). The first sum is written here. The compiled Q
of the model's graph over one observation, counted ``N_k`` times in component k, is
the other two plus that observation's ``sum_k N_k l(y_1 | eta_1k)``, which is written
too and taken off. So the value and gradient are Q's for any responsibilities held,
with every term that is not an observation's from the graph. Q's compiled gradient is
one fused loop of scalar C (sigmoids, softpluses, digammas per element): at N=10^5 the
compiled Q and gradient took 8.6 ms a call for a logistic and 21 ms for a
negative-binomial regression mixture, against 5.8 and 3.7 ms here (2.1 and 2.0 ms for
the gradient alone; benchmarks/README.md, which also has how glibc's allocator moves
these).
"""

from __future__ import annotations

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.model.recognise import LABEL_FAMILIES, ClosedFormPlan
from ppl_em.steps.glm import (
    GlmSpec,
    covariates,
    expit_into,
    observed_values,
    polygamma_differences,
    predictor_into,
    spec_entries,
)
from ppl_em.steps.glm_rows import dispersion, log_density_into
from ppl_em.steps.stats import DataChunk


def scores_cover(functions: EMFunctions, plan: ClosedFormPlan, specs: tuple[GlmSpec, ...]) -> bool:
    """Whether :func:`written_q` is Q: every observed dependent is one regression family
    over all K components (nothing missing, one label per row) and every entry of ``u``
    belongs either to those families or to the label's weights (``plan``'s blocks of
    ``LABEL_FAMILIES``, whose Q is ``sum_k N_k log w_k`` whatever the data), variables
    the recognition keeps out of everything else."""
    graph, layout = functions.graph, functions.layout
    if not specs or graph.observed_masks or graph.labels_per_row != 1:
        return False
    if sorted(b.data_name for b in plan.glm) != sorted(d.name for d in graph.dependents):
        return False
    if any(spec.index.shape[0] != graph.n_components for spec in specs):
        return False
    weights = {r.name for b in plan.all_blocks if b.family in LABEL_FAMILIES
               for slot in b.slots.values() for r, _ in slot.refs}  # fmt: skip
    covered = layout.mask(weights)
    for spec in specs:
        covered[spec_entries(spec)] = True
    return bool(covered.all())


def _scores(spec: GlmSpec, eta: np.ndarray, y: np.ndarray, alpha: float, free: bool):
    """Per observation, ``dl/deta`` (in ``eta``'s memory: fresh arrays at N=10^5 made the
    logistic scores 2.7 times slower) and, for a free dispersion, ``dl/dlog alpha``:
    ``y - mu`` for the canonical links; for a negative binomial, with ``r = mu + alpha``,
    ``alpha (y - mu) / r`` and ``alpha (psi(y + alpha) - psi(alpha) - log(r / alpha)
    + (mu - y) / r)``."""
    if spec.family in ("poisson", "bernoulli"):
        mu = np.exp(eta, out=eta) if spec.family == "poisson" else expit_into(eta)
        return np.subtract(y, mu, out=mu), None
    mu = np.exp(eta, out=eta)
    r = mu + alpha
    d_t = None
    if free:
        psi = polygamma_differences(y, alpha)[0]
        d_t = alpha * (psi - np.log1p(mu / alpha) + (mu - y) / r)
    d_eta = np.subtract(y, mu, out=mu)
    d_eta *= alpha
    return np.divide(d_eta, r, out=d_eta), d_t


def observation_terms(specs: tuple[GlmSpec, ...], u: np.ndarray, gamma_t: np.ndarray, chunk,
                      value: bool = True) -> tuple[float, np.ndarray]:  # fmt: skip
    """``sum_i sum_k gamma_ik l(y_i | eta_ik)`` over ``chunk`` (0.0 without ``value``) and
    its gradient in the specs' entries of ``u`` (0 elsewhere)."""
    q, grad = 0.0, np.zeros(u.size)
    for spec in specs:
        columns, y = covariates(spec, chunk), observed_values(spec, chunk)
        for k in range(spec.index.shape[0]):
            free = spec.log_alpha is not None
            alpha = dispersion(spec, u, k)
            eta = predictor_into(columns, u[spec.index[k]], np.empty(chunk.n))
            if value:
                density = log_density_into(spec.family, eta.copy(), y, alpha, np.empty(chunk.n))
                q += float(gamma_t[k] @ density)
            d_eta, d_t = _scores(spec, eta, y, alpha, free)
            r = np.multiply(d_eta, gamma_t[k], out=d_eta)
            np.add.at(grad, spec.index[k], [r.sum() if c is None else c @ r for c in columns])
            if d_t is not None:
                grad[spec.log_alpha[k]] += gamma_t[k] @ d_t
    return q, grad


def written_q(functions: EMFunctions, specs: tuple[GlmSpec, ...], u: np.ndarray, batches,
              value: bool = True) -> tuple[float, np.ndarray]:  # fmt: skip
    """Q at ``u`` and its gradient, summed over ``(gamma_t, chunk)`` batches, where
    :func:`scores_cover` holds (the module docstring); without ``value`` the gradient
    alone (the value NaN). With the responsibilities at ``u`` the gradient is the
    marginal objective's (Fisher's identity)."""
    q, grad, nk, first = 0.0, np.zeros(u.size), 0.0, None
    # A Newton step probing far (a dispersion's exp(t) underflowing to 0) gets a Q that
    # is not finite, which its caller rejects, as it does the compiled Q's (which does
    # not warn either).
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for gamma_t, chunk in batches():
            part_q, part_grad = observation_terms(specs, u, gamma_t, chunk, value)
            q, grad = q + part_q, grad + part_grad
            nk, first = nk + gamma_t.sum(axis=1), chunk if first is None else first
        one = DataChunk(tuple(a[:1] for a in first.arrays), first.start)
        counts = np.asarray(nk, dtype=float)[:, None]
        rest_q, rest = functions.q_and_grad(u, counts, 1.0, *one.arrays, *functions.fixed_data)
        one_q, one_grad = observation_terms(specs, u, counts, one, value)
        total = float(rest_q) - one_q + q if value else np.nan
        return total, grad + np.asarray(rest, dtype=float) - one_grad
