"""The E-step's rows of a regression mixture written out in NumPy.

Where :func:`ppl_em.steps.glm_q.scores_cover` holds, the joint's row of component k is

    log p(y_i, z_i = k) = c_k + sum_d l_d(y_di | eta_dik),

``l_d`` the log density of regression family d and ``c_k`` the label's log probability,
the same for every observation. The densities are written here, in place in buffers
kept per chunk length; ``c_k`` is the compiled rows of the model's graph at a
pseudo-observation (the chunk's first covariates, a response of 0 or 1) less its
written densities, so the label's term, a parameter check that fails
(``-inf``) and anything else the graph adds once per row come from the graph. PyTensor's
C evaluates ``softplus`` and ``gammaln`` as scalar calls (some 20 ns a value), NumPy
its ``exp`` and ``log1p`` in SIMD loops: at N=10^5 the rows of a two-component logistic
regression took 3.3 ms compiled against 1.1 ms here (benchmarks/README.md).

:func:`with_written_rows` swaps them in only after checking
(:func:`ppl_em.steps.row_check.agrees_on_sample`), on a sample of the data the functions
hold, that compiled and written rows differ by one constant per component: rows with
any other term that varies by observation keep the compiled rows.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy.special import gammaln

from ppl_em.compiled.functions import EMFunctions
from ppl_em.steps.glm import (
    GlmSpec,
    covariates,
    observed_values,
    predictor_into,
    tabulable_counts,
)
from ppl_em.steps.row_check import agrees_on_sample, probe_point
from ppl_em.steps.stats import DataChunk


def log_gamma_ratio(y: np.ndarray, a: float, less: float | None = None) -> np.ndarray:
    """``g(y, a) = gammaln(y + a) - gammaln(a) - y log(a)``, or ``g(y, a) - g(y, less)``:
    for counts ``sum_{j<y} log1p(j / a)`` (less ``log1p(j / less)``), tabulated up to the
    largest count (as :func:`ppl_em.steps.glm.polygamma_differences`) with one lookup for
    both, free of the cancellation of two terms of order ``y log(a)`` for a large ``a``."""
    counts = tabulable_counts(y)
    if counts is None:
        ratio = lambda b: gammaln(y + b) - gammaln(b) - y * np.log(b)  # noqa: E731
        return ratio(a) if less is None else ratio(a) - ratio(less)
    j = np.arange(counts.max(initial=0))
    terms = np.log1p(j / a) if less is None else np.log1p(j / a) - np.log1p(j / less)
    return np.r_[0.0, np.cumsum(terms)][counts]


def log_density_into(family: str, eta: np.ndarray, y: np.ndarray, alpha: float | None,
                     out: np.ndarray) -> np.ndarray:  # fmt: skip
    """``l(y | eta)`` of ``family`` into ``out``, overwriting ``eta`` (fresh arrays of
    10^5 values each pay their page faults: benchmarks/README.md)."""
    if family == "bernoulli":  # y eta - softplus(eta) = -softplus((1 - 2y) eta)
        np.multiply(y, -2.0, out=out)
        out += 1.0
        out *= eta
        np.maximum(out, 0.0, out=out)
        tail = np.abs(eta, out=eta)
        np.negative(tail, out=tail)
        np.log1p(np.exp(tail, out=tail), out=tail)
        out += tail
        return np.negative(out, out=out)
    np.multiply(y, eta, out=out)
    if family == "poisson":  # log y! = log_gamma_ratio(y, 1)
        out -= np.exp(eta, out=eta)
        out -= log_gamma_ratio(y, 1.0)
        return out
    # log Gamma(y + alpha) / (Gamma(alpha) y!) + alpha log(alpha / r) + y log(mu / r),
    # r = mu + alpha, with the terms of order alpha log(alpha) cancelled by hand
    out += log_gamma_ratio(y, alpha, less=1.0)
    tail = np.log1p(np.divide(np.exp(eta, out=eta), alpha, out=eta), out=eta)
    out -= tail * (y + alpha)
    return out


def outside_support(family: str, y: np.ndarray) -> np.ndarray:
    """Where ``y`` is outside the family's support, as PyMC checks it (its logp is -inf)."""
    return (y < 0) | (y > 1) if family == "bernoulli" else y < 0


def dispersion(spec: GlmSpec, u: np.ndarray, k: int) -> float | None:
    if spec.log_alpha is not None:
        return float(np.exp(u[spec.log_alpha[k]]))
    return None if spec.alpha is None else float(spec.alpha[k])


class WrittenRows:
    """``rows(u, *chunk)`` of :class:`ppl_em.compiled.functions.EMFunctions`, written
    (the module docstring), with ``graph_rows`` the rows compiled from the model's graph.
    The rows are this object's buffers, overwritten by the next call on a chunk of the
    same length, as the compiled rows' are; ``lock`` guards them."""

    def __init__(self, graph_rows, specs: tuple[GlmSpec, ...], k: int) -> None:
        self.graph_rows, self.specs, self.k = graph_rows, specs, k
        self.lock = threading.RLock()
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _written(self, u: np.ndarray, chunk: DataChunk) -> np.ndarray:
        n = chunk.n
        if n not in self._buffers:
            self._buffers[n] = (np.empty((self.k, n)), np.empty(n), np.empty(n))
        out, eta, part = self._buffers[n]
        for d, spec in enumerate(self.specs):
            columns, y = covariates(spec, chunk), observed_values(spec, chunk)
            for k in range(self.k):
                predictor_into(columns, u[spec.index[k]], eta)
                target = out[k] if d == 0 else part
                log_density_into(spec.family, eta, y, dispersion(spec, u, k), target)
                if d:
                    out[k] += part
            bad = outside_support(spec.family, y)
            if bad.any():
                out[:, bad] = -np.inf
        return out

    def _constants(self, u: np.ndarray, arrays: tuple) -> np.ndarray:
        """``c_k``: the compiled rows at a pseudo-observation less its written densities,
        at responses 0 and 1 (in every family's support) so that one of them has a finite
        density wherever the predictor does (a Bernoulli's is -inf at 0 for an infinite
        predictor); ``-inf`` where the compiled row is (a parameter check failed)."""
        two = [np.repeat(a[:1], 2, axis=0) for a in arrays]
        for spec in self.specs:
            two[spec.observed].reshape(2, -1)[:] = [[0], [1]]
        compiled = np.stack([np.array(r, dtype=float) for r in self.graph_rows(u, *two)], axis=1)
        written = self._written(u, DataChunk(tuple(two))).T
        at = (np.argmax(np.isfinite(written), axis=0), np.arange(self.k))
        return np.where(np.isneginf(compiled[at]), -np.inf, compiled[at] - written[at])

    def __call__(self, u: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        if not arrays[0].shape[0]:
            return self.graph_rows(u, *arrays)
        with self.lock, np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            constants = self._constants(u, arrays)
            out = self._written(u, DataChunk(arrays))
            out += constants[:, None]
            for k in np.flatnonzero(~np.isfinite(constants)):
                out[k] = constants[k]  # a check failed: -inf, whatever the densities
            return list(out)


def with_written_rows(
    functions: EMFunctions, specs: tuple[GlmSpec, ...], u: np.ndarray
) -> EMFunctions:
    """``functions`` with :class:`WrittenRows` for ``specs`` (where
    :func:`ppl_em.steps.glm_q.scores_cover` holds), if every covariate is a data column
    and the written rows agree with the compiled ones near ``u`` (a fixed perturbation
    breaks the symmetry of a start) on up to ``row_check.CHECKED`` observations spread over the
    data held; else ``functions`` unchanged."""
    if not specs or any(isinstance(c, np.ndarray) for s in specs for c in s.covariates):
        return functions
    rows = WrittenRows(functions.rows, specs, functions.graph.n_components)
    if not agrees_on_sample(functions, rows, probe_point(u)):
        return functions
    return functions._replace(rows=rows)
