"""EM whose E-step is mapped over data held elsewhere: streamed from disk, or on a cluster.

:mod:`ppl_em.em.step` runs the E-step over :class:`~ppl_em.em.step.EMData`, chunks
held in memory. Here the data are reached through a :class:`StatsMap`, which says how
to gather the three things an iteration needs, whatever the data live on:

- ``gather(u) -> Stats``: the sum of ``e_step`` over every chunk at ``u``;
- ``resp(u) -> batches``: ``(gamma_t, chunk)`` pairs at ``u`` for the rare second pass
  over the data (a variance whose statistics would cancel, MvNormal moments);
- ``q_source(u) -> (functions, batches)``: where a numeric M-step sums Q and its
  gradient (by default the same ``functions`` and ``resp(u)``; a cluster substitutes a
  ``q_and_grad`` that maps over its partitions: compiled functions are values);
- ``stream(u) -> batches`` (optional): as ``resp(u)``, recomputed at each pass and
  never kept, for a marginal ascent (a pass per evaluation, one per variable at its
  start).

:func:`local_map` streams an :class:`~ppl_em.em.sources.ArraySource` chunk by chunk
(memory bounded by the chunk, not N); ``ppl_em.distributed`` builds the Dask one.
``em_step``'s M-step is ``m_step``'s two halves (``closed_step`` then
``numeric_step``, this one on Q summed where ``q_source`` says), so a mapped fit takes
the same iterates as an in-memory one up to the order of summation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.em.sources import ArraySource
from ppl_em.em.step import EMState
from ppl_em.errors import DataError
from ppl_em.steps.closed_form import Batches
from ppl_em.steps.columns import StatsRequest
from ppl_em.steps.estep import e_step
from ppl_em.steps.mstep import Expectations
from ppl_em.steps.stats import DataChunk, Stats, total

# The numeric M-step evaluates Q over all the data many times per iteration; the
# responsibilities (K x N floats) and chunks are kept for it while they take at most
# this many bytes, and recomputed chunk by chunk (an E-step per evaluation) beyond.
RESP_BUDGET = 256 * 2**20


class StatsMap(NamedTuple):
    """How an iteration gathers its statistics (see the module docstring); it has
    :class:`~ppl_em.em.step.EMData`'s methods, so ``run_em``, ``em_init`` and
    ``em_step`` take it as their ``data``."""

    request: StatsRequest
    gather: Callable[[np.ndarray], Stats]
    resp: Callable[[np.ndarray], Batches]
    q_source: Callable[[np.ndarray], tuple[EMFunctions, Batches]] | None = None
    # responsibilities recomputed at each pass, never kept (a marginal ascent's)
    stream: Callable[[np.ndarray], Batches] | None = None

    def estep(self, functions: EMFunctions, u: np.ndarray, keep_resp: bool) -> Stats:
        # N x K log-responsibilities are never gathered: resp() recomputes them per chunk.
        return self.gather(u)

    def expectations(
        self, functions: EMFunctions, state: EMState, keep: bool = True
    ) -> tuple[Expectations, EMFunctions, Batches]:
        """As :meth:`ppl_em.em.step.EMData.expectations`; ``keep=False``: responsibilities
        are recomputed at each pass over the batches and none are kept (memory: a
        chunk)."""
        resp = (self.resp if keep or self.stream is None else self.stream)(state.u)
        q_functions, q_batches = (
            (functions, resp) if self.q_source is None else self.q_source(state.u)
        )
        return Expectations(state.stats, self.request, resp), q_functions, q_batches

    def final(self, functions: EMFunctions, state: EMState) -> EMState:
        return state


def _named(part: int, chunk: DataChunk, fn: Callable):
    """``fn()``, a :class:`DataError` prefixed with the partition it arose in."""
    try:
        return fn()
    except DataError as err:
        last = chunk.start + chunk.n - 1
        raise DataError(f"in partition {part} (rows {chunk.start}..{last}): {err}") from err


def _chunks(source: ArraySource, request: StatsRequest) -> Iterator[tuple[int, DataChunk]]:
    """``(i, chunk i)`` with its statistics columns; the next chunk is read in a thread
    while the caller works on this one (file reads and zarr decompression release the
    GIL), so reading overlaps the E-step."""

    def load(i: int) -> DataChunk:
        arrays = source.read(i)
        return DataChunk(arrays, source.bounds[i][0], request.columns(arrays))

    count = len(source.bounds)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, 0)
        for i in range(count):
            chunk = pending.result()
            if i + 1 < count:
                pending = pool.submit(load, i + 1)
            yield i, chunk


def _resp_bytes(functions: EMFunctions, source: ArraySource, request: StatsRequest) -> int:
    k = functions.graph.n_components
    cells = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in functions.data)
    per_label = 8 * (k + len(request.index)) + 8 * cells / functions.graph.labels_per_row
    return int(per_label * source.n_rows * functions.graph.labels_per_row)


def local_map(
    functions: EMFunctions,
    source: ArraySource,
    request: StatsRequest,
    resp_budget: int = RESP_BUDGET,
) -> StatsMap:
    """Stream ``source`` chunk by chunk on this machine: memory is bounded by a chunk
    (plus, for a numeric M-step, the responsibilities while they fit ``resp_budget``)."""

    def estep(u: np.ndarray) -> Stats:
        parts = (
            _named(i, c, lambda c=c: e_step(functions, u, c)) for i, c in _chunks(source, request)
        )
        return total(parts)

    fits = _resp_bytes(functions, source, request) <= resp_budget

    def resp(u: np.ndarray, keep: bool = fits) -> Batches:
        cache: list = []
        done = [False]

        def batches():
            if done[0]:
                yield from cache
                return
            cache.clear()
            for i, chunk in _chunks(source, request):
                stats = _named(i, chunk, lambda c=chunk: e_step(functions, u, c, keep_resp=True))
                pair = (np.ascontiguousarray(np.exp(stats.log_resp.T)), chunk)
                if keep:
                    cache.append(pair)
                yield pair
            done[0] = keep

        return batches

    return StatsMap(request, estep, resp, stream=lambda u: resp(u, keep=False))
