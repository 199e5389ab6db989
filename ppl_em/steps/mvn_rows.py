"""The E-step's rows of an MvNormal mixture written out, compiled with numba.

Where the model's one observed dependent is an MvNormal block with a mean and a
covariance per component and no missing coordinates, and the label's probabilities are
shared by all observations, the joint's row of component k is

    log p(x_i, z_i = k) = log p(z = k) - D log(2 pi) / 2 - sum_j log L_k[j, j]
                          - ||P_k x_i - b_k||^2 / 2,      P_k = L_k^-1,  b_k = P_k mu_k,

``L_k`` the Cholesky factor of ``Sigma_k``. ``(mu_k, L_k)`` come from the block's
compiled parameter map (:class:`ppl_em.steps.mvn_solve.MvnUpdate`, 12-19 us a call),
which also gives ``log p(z = k)`` from the model's graph in the same C call
(:class:`ppl_em.compiled.mvn_map.ParamMap`; alone, on NumPy-backed Ops, those terms
took 41 us a call). The quadratic forms are one numba loop over blocks of
observations, vectorised along the block: at D=4, K=3, N=10^4 the rows compiled from
the graph took 0.26-0.60 ms (C or NumPy-backed Ops), this loop some 70 us
(benchmarks/README.md).

:func:`with_written_mvn_rows` swaps them in only after checking, on up to
:data:`ppl_em.steps.row_check.CHECKED` observations spread over the data held, that
they equal the compiled rows to rounding. A call where the map's covariance is not
positive definite, or its factor not lower triangular with a positive diagonal, is the
compiled rows' (PyMC's checks decide there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from numba import njit

from ppl_em.compiled.functions import EMFunctions
from ppl_em.steps.cores import halves, run_split, usable_cores
from ppl_em.steps.mvn_solve import MvnUpdate
from ppl_em.steps.row_check import agrees_on_sample, probe_point

# Observations per block: the block's D x BLOCK transpose and one row of scratch stay
# in L1/L2, and the loops along the block vectorise.
BLOCK = 512
# Two threads from this many observations (as the E-step's kernel).
PARALLEL_MIN = 100_000


@njit(cache=True, fastmath={"contract", "nsz"}, error_model="numpy", nogil=True)
def _quadratic_block(x, p, b, c, out, a, n, xt, t, acc):  # pragma: no cover - numba
    """Rows ``a:a+n``: ``out[k, i] = c[k] - ||p[k] x[i] - b[k]||^2 / 2``, ``p[k]`` lower
    triangular."""
    k_total, d = p.shape[0], p.shape[1]
    for q in range(d):
        for i in range(n):
            xt[q, i] = x[a + i, q]
    for k in range(k_total):
        for i in range(n):
            acc[i] = 0.0
        for r in range(d):
            for i in range(n):
                t[i] = -b[k, r]
            for q in range(r + 1):
                w = p[k, r, q]
                for i in range(n):
                    t[i] += w * xt[q, i]
            for i in range(n):
                acc[i] += t[i] * t[i]
        row, ck = out[k], c[k]
        for i in range(n):
            row[a + i] = ck - 0.5 * acc[i]


@njit(cache=True, nogil=True)
def _quadratic_rows(x, p, b, c, out, start, stop):  # pragma: no cover - numba
    d = p.shape[1]
    xt, t, acc = np.empty((d, BLOCK)), np.empty(BLOCK), np.empty(BLOCK)
    for a in range(start, stop, BLOCK):
        _quadratic_block(x, p, b, c, out, a, min(BLOCK, stop - a), xt, t, acc)


def quadratic_rows(x: np.ndarray, p: np.ndarray, b: np.ndarray, c: np.ndarray,
                   out: np.ndarray) -> np.ndarray:  # fmt: skip
    """``out[k, i] = c[k] - ||p[k] x[i] - b[k]||^2 / 2`` over the N x D ``x``, in two
    block-aligned halves on two threads from ``PARALLEL_MIN`` observations."""
    n = x.shape[0]
    x = np.require(x, dtype=np.float64, requirements="C")
    spans = halves(n, BLOCK, 2 if n >= PARALLEL_MIN and usable_cores() >= 2 else 1)
    run_split(lambda j: _quadratic_rows(x, p, b, c, out, *spans[j]), len(spans))
    return out


class WrittenMvnRows:
    """``rows(u, *chunk)`` of :class:`ppl_em.compiled.functions.EMFunctions`, written
    (the module docstring), with ``graph_rows`` the rows compiled from the model's graph.
    The rows are this object's buffers, overwritten by the next call on a chunk of the
    same length, as the compiled rows' are; ``lock`` guards them.

    ``kernel_pass``: the E-step's pass over these rows is the numba kernel
    (:mod:`ppl_em.steps.kernel`) whatever the backend of the graph's rows. It reads one
    K x N buffer with one numba type for every K (compiled once per machine), and at
    N=10^4, D=4, K=3 took 75 us against the NumPy pass's 179 us (benchmarks/README.md).
    """

    kernel_pass = True

    def __init__(self, graph_rows, values: Callable, update: MvnUpdate, position: int, k: int,
                 d: int) -> None:  # fmt: skip
        self.graph_rows, self.values, self.update = graph_rows, values, update
        self.position, self.k, self.d = position, k, d
        self._upper = np.triu_indices(d, 1)
        self.lock = threading.RLock()
        self._buffers: dict[int, np.ndarray] = {}

    def _whitening(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(P, b, c)`` at ``u``: the inverse factors, ``P_k mu_k`` and each row's
        constant (the module docstring); None where the written rows do not apply."""
        k, d = self.k, self.d
        factor = self.update.factor
        raw, label = self.values(u)
        if raw.shape != (k * d * (d + 1),):
            return None  # one covariance for all components (tied)
        mu, chol = raw[: k * d].reshape(k, d), raw[k * d :].reshape(k, d, d)
        if factor is None:
            try:
                chol = np.linalg.cholesky(chol)
            except np.linalg.LinAlgError:
                return None
        elif np.any(chol[:, self._upper[0], self._upper[1]]):
            return None  # not lower triangular: not Sigma's Cholesky factor
        diag = np.diagonal(chol, axis1=1, axis2=2)
        if not np.all(diag > 0):
            return None
        # LAPACK's inverse may pivot and leave round-off above the diagonal, which the
        # loop never reads: b must not read it either.
        p = np.tril(np.linalg.inv(chol))
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(mu))):
            return None
        label = np.asarray(label, dtype=float).reshape(k)
        c = label - 0.5 * d * np.log(2.0 * np.pi) - np.sum(np.log(diag), axis=1)
        return p, np.einsum("kij,kj->ki", p, mu), c

    def __call__(self, u: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        n = arrays[0].shape[0]
        with self.lock:
            with np.errstate(all="ignore"):
                whitening = self._whitening(u) if n else None
            if whitening is None:
                return self.graph_rows(u, *arrays)
            if n not in self._buffers:
                self._buffers[n] = np.empty((self.k, n))
            out = quadratic_rows(arrays[self.position], *whitening, self._buffers[n])
            return list(out)


def with_written_mvn_rows(
    functions: EMFunctions, updates: tuple[MvnUpdate, ...], specs, u: np.ndarray
) -> EMFunctions:
    """``functions`` with :class:`WrittenMvnRows` where the model's one observed
    dependent is the one MvNormal block of ``specs`` (no missing coordinates), the
    label's probabilities are shared, and the written rows equal the compiled ones near
    ``u`` (:func:`ppl_em.steps.row_check.agrees_on_sample`, with no constant allowed
    between them); else ``functions`` unchanged."""
    names, x_name = functions.spec.names, specs[0].data_name if len(specs) == 1 else None
    if x_name not in names or specs[0].missing or not functions.shared_label:
        return functions
    if len(functions.graph.dependents) != 1:
        return functions
    position = names.index(x_name)
    k, d = functions.graph.n_components, functions.data[position].shape[-1]
    # The block's map carries the label's terms where they are shared, as checked above
    # (ppl_em.compiled.mvn_map.ParamMap): one C call gives the rows both.
    mapped = (updates[0] if updates[0].factor is None else updates[0].factor).params
    rows = WrittenMvnRows(functions.rows, mapped.with_label, updates[0], position, k, d)
    probe = probe_point(u)
    # Where the written rows would hand the call to the graph's, the check proves nothing.
    if rows._whitening(probe) is None or not agrees_on_sample(functions, rows, probe, False):
        return functions
    return functions._replace(rows=rows)
