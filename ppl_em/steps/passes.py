"""The NumPy pass over the joint's rows: the reference implementation of the fused
E-step, and the pass of ``backend="python"`` (no compilation at all).

Contract, shared with :func:`ppl_em.steps.kernel.compiled_fused_estep`: from the K rows
of the joint over a chunk and the M x n statistics columns, return
``(log_resp, loglik, nk, s)``: the n x K log-responsibilities (None unless kept), the
log-likelihood, ``nk[k] = sum_i gamma_ik`` and ``s[m, k] = sum_i gamma_ik v_mi``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ppl_em.steps.cores import usable_cores

# Columns per chunk: K x CHUNK float64 stay in cache across the dozen NumPy calls a chunk
# needs, while the per-call overhead stays small (benchmarks/README.md).
CHUNK = 32768
# Threads share the pass from this many observations: in cache the chunks are short
# NumPy calls that contend for the GIL, out of cache they overlap memory waits.
PARALLEL_MIN = 2_000_000
MAX_WORKERS = 4


def _chunk_stats(block, cols, wts, out, scratch) -> float:
    """E-step on one K x n block of the transposed joint, in place; returns its loglik.

    Row-wise ``maximum``/``add`` over the K rows and one ``dot`` per (component, column)
    beat the axis reductions and matrix products NumPy would pick for a K x n block with
    small K and M."""
    nk, s = out
    n = block.shape[1]
    mx, tot, lse, e = (a[..., :n] for a in scratch)
    k = block.shape[0]
    np.copyto(mx, block[0])
    for j in range(1, k):
        np.maximum(mx, block[j], out=mx)
    np.subtract(block, mx, out=e)
    np.exp(e, out=e)
    np.copyto(tot, e[0])
    for j in range(1, k):
        np.add(tot, e[j], out=tot)
    np.log(tot, out=lse)
    lse += mx
    np.subtract(block, lse, out=block)
    np.reciprocal(tot, out=tot)
    if wts is not None:  # each observation counts wts[i] times; its responsibilities stay
        tot *= wts
    _accumulate(e, tot, cols, nk, s, k)
    return float(lse.sum() if wts is None else wts @ lse)


def _accumulate(e, tot, cols, nk, s, k) -> None:
    for j in range(k):
        gamma = np.multiply(e[j], tot, out=e[j])
        nk[j] += gamma.sum()
        for m, v in enumerate(cols):
            s[m, j] += np.dot(gamma, v)


def _run_chunks(joint_t, columns, weights, starts, width) -> tuple[float, tuple]:
    """The chunks beginning at ``starts``, with their own scratch and accumulators."""
    k = joint_t.shape[0]
    out = (np.zeros(k), np.zeros((columns.shape[0], k)))
    scratch = (np.empty(width), np.empty(width), np.empty(width), np.empty((k, width)))
    loglik = 0.0
    # A row no component explains has max -inf and yields NaN responsibilities; the
    # caller reports it by position, so the arithmetic warnings carry no information.
    with np.errstate(invalid="ignore", divide="ignore"):
        for a in starts:
            part = columns[:, a : a + width]
            wts = None if weights is None else weights[a : a + width]
            loglik += _chunk_stats(joint_t[:, a : a + width], part, wts, out, scratch)
    return loglik, out


def fused_estep(
    joint_t, columns: np.ndarray | None = None, keep: bool = True, *,
    chunk: int = CHUNK, workers: int | None = None, weights: np.ndarray | None = None,
) -> tuple[np.ndarray | None, float, np.ndarray, np.ndarray]:  # fmt: skip
    """One pass over the K x n transposed joint (or a sequence of its rows, stacked
    here); see the module docstring for what it returns.

    ``joint_t`` is overwritten with the log-responsibilities and returned transposed,
    as the n x K view, so an E-step allocates no n x K array besides the graph's output.
    The K x n layout makes every step a contiguous SIMD loop; cache-sized chunks of
    ``chunk`` observations make the dozen passes cost little more than one; large n is
    split into one contiguous run of chunks per core (``workers`` of them; by default
    one below ``PARALLEL_MIN`` observations, else every usable core up to
    ``MAX_WORKERS``), a fixed split, so results do not depend on thread timing. With
    ``weights`` each observation's log-likelihood and statistics count that many times.
    """
    joint_t = np.require(joint_t, dtype=np.float64, requirements=("C", "W"))
    n = joint_t.shape[1]
    columns = np.zeros((0, n)) if columns is None else columns
    columns = np.require(columns, dtype=np.float64, requirements="C").reshape(-1, n)
    width = max(1, min(chunk, n))
    starts = list(range(0, n, width))
    if workers is None:
        workers = 1 if n < PARALLEL_MIN else min(MAX_WORKERS, usable_cores())
    workers = max(1, min(workers, len(starts)))
    runs = [
        starts[i * len(starts) // workers : (i + 1) * len(starts) // workers]
        for i in range(workers)
    ]
    weights = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)
    if workers == 1:
        results = [_run_chunks(joint_t, columns, weights, starts, width)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            work = lambda r: _run_chunks(joint_t, columns, weights, r, width)  # noqa: E731
            results = list(pool.map(work, runs))
    nk = sum(r[1][0] for r in results) if results else np.zeros(joint_t.shape[0])
    s = sum(r[1][1] for r in results) if results else np.zeros((columns.shape[0], joint_t.shape[0]))
    loglik = float(sum(r[0] for r in results))
    return (joint_t.T if keep else None), loglik, nk, s
