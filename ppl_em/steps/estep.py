"""The E-step: one entry point, ``e_step(functions, u, chunk) -> Stats``.

One call evaluates the compiled rows of the joint over a chunk of observations and
makes one pass over them: the numba kernel (:mod:`ppl_em.steps.kernel`) when the rows
are compiled code, the NumPy pass (:mod:`ppl_em.steps.passes`) for NumPy-backed rows.
The E-step over the whole data is the sum of the E-steps over any split of it into
chunks. Q and its gradient, which a numeric M-step needs, are sums over the same
chunks (:func:`q_and_grad`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
from threadpoolctl import ThreadpoolController

from ppl_em.compiled.functions import EMFunctions
from ppl_em.errors import DataError
from ppl_em.steps.columns import StatsRequest
from ppl_em.steps.kernel import compiled_fused_estep
from ppl_em.steps.passes import fused_estep
from ppl_em.steps.stats import DataChunk, Stats


def one_blas_thread(blas: ThreadpoolController | None):
    """One BLAS thread for an E-step's many small products (the passes' dot products,
    an MvNormal's whitening): OpenBLAS's spinning threads took the second core from
    the elementwise work (benchmarks/README.md). The user's setting is restored."""
    if blas is None:
        return nullcontext()
    return blas.limit(limits=1, user_api="blas")


def whole_data(functions: EMFunctions, request: StatsRequest | None = None) -> DataChunk:
    """All the data ``functions`` hold as one chunk, with ``request``'s columns."""
    columns = None if request is None else request.columns(functions.data)
    return DataChunk(functions.data, 0, columns, functions.weights, functions.labels)


def split(functions: EMFunctions, size: int, request: StatsRequest | None = None):
    """The data ``functions`` hold in chunks of ``size`` observations (the last shorter)."""
    n = functions.data[0].shape[0]
    per_row = functions.graph.labels_per_row
    cut = lambda v, a: None if v is None else v[a * per_row : (a + size) * per_row]  # noqa: E731
    chunks = []
    for a in range(0, n, size):
        arrays = tuple(x[a : a + size] for x in functions.data)
        columns = None if request is None else request.columns(arrays)
        chunks.append(
            DataChunk(arrays, a, columns, cut(functions.weights, a), cut(functions.labels, a))
        )
    return chunks


def _pass(functions: EMFunctions):
    """The numba kernel for compiled rows and for rows written in numba (which say so:
    ``kernel_pass``), the NumPy pass for rows on NumPy-backed Ops."""
    written = getattr(functions.rows, "kernel_pass", False)
    return compiled_fused_estep if functions.compiled_rows or written else fused_estep


def _nonfinite_message(functions: EMFunctions, chunk: DataChunk, log_resp) -> str:
    rows = np.flatnonzero(~np.all(np.isfinite(log_resp), axis=1))
    first = chunk.start * functions.graph.labels_per_row
    where = f"observation {first + int(rows[0])}" if rows.size else "some observation"
    names = ", ".join(functions.spec.observed)
    return (
        f"the log-likelihood is not finite at {where} of {names!r}: no component can "
        "produce that value at the current parameters. Check the data lie in the "
        "components' support and that start values are valid."
    )


def e_step(
    functions: EMFunctions, u: np.ndarray, chunk: DataChunk, keep_resp: bool = False
) -> Stats:
    """The E-step over ``chunk`` at the flat parameters ``u``: its log-likelihood, the
    expected counts, the weighted sums of ``chunk.columns`` and, with ``keep_resp``, its
    n x K log-responsibilities. Raises :class:`DataError` naming the first observation
    that no component can produce."""
    fused = _pass(functions)
    # The rows may be the compiled function's own buffers: read them before anyone
    # (another thread included) calls it again.
    with one_blas_thread(functions.blas), functions.rows.lock:
        rows = _labelled(functions.rows(u, *chunk.arrays), chunk.labels)
        n = len(rows[0])
        log_resp, loglik, nk, s = fused(rows, chunk.columns, keep_resp, weights=chunk.weights)
        if not np.isfinite(loglik):
            if log_resp is None:
                again = _labelled(functions.rows(u, *chunk.arrays), chunk.labels)
                log_resp = fused(again, None, True)[0]
            raise DataError(_nonfinite_message(functions, chunk, log_resp))
    return Stats(n, loglik, nk, s, log_resp)


def _labelled(rows: list, labels: np.ndarray | None) -> list:
    """The rows with the known labels imposed: an observation known to come from
    component c has ``log p(x_i, z_i = k) = -inf`` for every other k, so its
    responsibilities are one-hot and its log-likelihood is ``log p(x_i, z_i = c)``."""
    if labels is None:
        return rows
    known = labels >= 0
    # A copy (the compiled function's buffers stay whole), one K x n array: the kernel
    # reads it with one numba type for every K.
    out = np.array(rows, dtype=np.float64)
    for k, row in enumerate(out):
        row[known & (labels != k)] = -np.inf
    return list(out)


def joint(functions: EMFunctions, u: np.ndarray, chunk: DataChunk | None = None) -> np.ndarray:
    """The n x K matrix ``log p(x_i, z_i = k | theta)`` over ``chunk`` (default: all data)."""
    arrays = functions.data if chunk is None else chunk.arrays
    labels = None if chunk is None else chunk.labels
    with one_blas_thread(functions.blas), functions.rows.lock:
        return np.stack(_labelled(functions.rows(u, *arrays), labels), axis=1)


def resp_batches(functions: EMFunctions, u: np.ndarray, chunks, log_resp=None):
    """``(gamma_t, chunk)`` per chunk at ``u``: the K x n responsibilities (times the
    observations' weights), from the whole data's ``log_resp`` when given, else from an
    E-step per chunk."""
    if log_resp is not None:
        per_row = functions.graph.labels_per_row
        for chunk in chunks:
            part = log_resp[chunk.start * per_row : (chunk.start + chunk.n) * per_row]
            yield _weighted(np.exp(part.T), chunk), chunk
        return
    for chunk in chunks:
        log_resp = e_step(functions, u, chunk, keep_resp=True).log_resp
        yield _weighted(np.exp(log_resp.T), chunk), chunk


def _weighted(gamma_t: np.ndarray, chunk: DataChunk) -> np.ndarray:
    """Responsibilities as the M-step counts them: times each observation's weight."""
    return gamma_t if chunk.weights is None else gamma_t * chunk.weights[None, :]


def q_and_grad(
    functions: EMFunctions, u: np.ndarray, batches: Iterable
) -> tuple[float, np.ndarray]:
    """Q at ``u`` and its gradient, summed over ``(gamma_t, chunk)`` batches; the terms
    that are not sums over observations (the log prior, other observed variables)
    enter once."""
    q, grad, weight = 0.0, 0.0, 1.0
    for gamma_t, chunk in batches:
        part_q, part_grad = functions.q_and_grad(
            u, gamma_t, weight, *chunk.arrays, *functions.fixed_data
        )
        q, grad, weight = q + float(part_q), grad + np.asarray(part_grad), 0.0
    return q, grad
