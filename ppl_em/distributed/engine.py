"""EM on a Dask cluster (``dask.distributed``): partitions persisted on the workers, the
E-step mapped over them, statistics tree-reduced, the M-step on the client.

:func:`persist_data` cuts the data into partitions and has the workers load them
(checked: an error names the partition and the observation), sum what the statistics
offsets need (the whole data's means, as in memory), and build each partition's
statistics columns once; the resulting futures stay in worker memory for the whole
fit. Each is computed by a task from the data's source (a memmap file, a zarr store, a
dask graph, or for NumPy input the slice itself), so when a worker dies Dask recomputes
the partitions it held, and retries the tasks it was running, on the workers left.

:func:`dask_map` is the fit's :class:`~ppl_em.em.mapped.StatsMap`: every E-step sends
``u`` with one task per partition and sums their :class:`Stats` in a fixed tree
(partition order, not completion order: the sum, and so the fit, is the same to the
last bit whoever computes it); a numeric M-step's Q and gradient are the same
map-reduce over the partitions, on responsibilities computed once per M-step and held
on the workers. SQUAREM and the loop are the mapped ones, unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.distributed import tasks
from ppl_em.em.mapped import StatsMap
from ppl_em.em.sources import ArraySource, open_source, request_from_scan
from ppl_em.steps.closed_form import Batches
from ppl_em.steps.columns import StatsRequest
from ppl_em.steps.mstep import MStepConfig
from ppl_em.steps.stats import DataChunk, Stats

# Partials are summed this many at a time: depth log_8(partitions), no client bottleneck.
FAN_IN = 8
# A partition is at most this many default chunks by default: one task per partition
# per E-step costs the scheduler about a millisecond, so partitions are far larger than
# the chunks a single process streams.
PARTITION_CHUNKS = 32


class DaskData(NamedTuple):
    """A dataset persisted on a cluster: the client, the model payload's future, one
    future per partition (a :class:`DataChunk` with its columns), the partitions'
    ``(first, stop)`` rows, the statistics request and the number of rows."""

    client: Any
    payload: Any
    chunks: tuple[Any, ...]
    bounds: tuple[tuple[int, int], ...]
    request: StatsRequest
    n_rows: int


def tree_reduce(client, futures: list, combine) -> Any:
    """``combine`` over ``futures`` in a fixed tree of ``FAN_IN``-way tasks; the value."""
    futures = list(futures)
    while len(futures) > 1:
        futures = [
            client.submit(combine, *futures[i : i + FAN_IN], pure=False)
            for i in range(0, len(futures), FAN_IN)
        ]
    return futures[0].result()


def _is_dask(array: Any) -> bool:
    return hasattr(array, "dask") and hasattr(array, "chunks") and hasattr(array, "blocks")


def _bounds(data: Mapping, names, n: int, chunk_size: int | None, workers: int, default: int):
    """Partition rows: ``chunk_size`` if given; else the first dask array's own chunks;
    else ``PARTITION_CHUNKS`` default chunks, cut further so every worker gets two."""
    if chunk_size is None:
        for name in names:
            if _is_dask(data[name]):
                sizes = data[name].chunks[0]
                firsts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
                return tuple(zip(firsts[:-1].tolist(), firsts[1:].tolist(), strict=True))
        chunk_size = max(1, min(PARTITION_CHUNKS * default, -(-n // (2 * max(workers, 1)))))
    return tuple((a, min(a + chunk_size, n)) for a in range(0, n, chunk_size))


def _blocks(data: Mapping, source: ArraySource, bounds) -> list[list]:
    """Per partition, what its load task reads each array from: a dask block (the
    array rechunked to the partitions), a :class:`tasks.RowRange` of a file or zarr
    array, or the NumPy slice itself."""
    sizes = tuple(b - a for a, b in bounds)
    columns = []
    for name, read_from in zip(source.names, source.arrays, strict=True):
        given = data[name]
        if _is_dask(given):
            rest = {axis: -1 for axis in range(1, given.ndim)}
            rechunked = given.rechunk({0: sizes, **rest})
            columns.append([rechunked.blocks[i] for i in range(len(bounds))])
        elif isinstance(read_from, np.ndarray) and not isinstance(read_from, np.memmap):
            columns.append([read_from[a:b] for a, b in bounds])
        else:
            columns.append([tasks.RowRange(read_from, a, b) for a, b in bounds])
    return [list(row) for row in zip(*columns, strict=True)]


def persist_data(
    client,
    functions: EMFunctions,
    config: MStepConfig,
    data: Mapping,
    chunk_size: int | None = None,
) -> DaskData:
    """Check ``data`` against the model, load it onto ``client``'s workers in partitions
    and build their statistics columns (see the module docstring)."""
    import dask

    source = open_source(functions, data, chunk_size)
    workers = len(client.scheduler_info().get("workers", {})) or 1
    bounds = _bounds(data, source.names, source.n_rows, chunk_size, workers, source.bounds[0][1])
    payload = client.submit(tasks.identity, tasks.make_payload(functions), pure=False)
    names, dtypes = source.names, source.dtypes
    # Keys of their own per dataset: loads of other data never share a result.
    token = uuid.uuid4().hex[:12]
    blocks_of = _blocks(data, source, bounds)
    loads = client.compute([
        dask.delayed(tasks.load_partition)(
            i, a, names, dtypes, *blocks, dask_key_name=f"ppl_em-load-{token}-{i}"
        )
        for i, ((a, _), blocks) in enumerate(zip(bounds, blocks_of, strict=True))
    ])  # fmt: skip
    scans = client.map(tasks.partition_scan, loads, pure=False)
    found = tree_reduce(client, scans, tasks.sum_scans)
    per_row = functions.graph.labels_per_row
    request = request_from_scan(config.plan, names, found, per_row)
    firsts = [a for a, _ in bounds]
    chunks = client.map(tasks.make_chunk, loads, firsts, request=request, pure=False)
    _wait(client, chunks)
    return DaskData(client, payload, tuple(chunks), bounds, request, source.n_rows)


def _wait(client, futures) -> None:
    """Block until every future is done; the first error is raised here."""
    from distributed import wait

    wait(futures)
    for f in futures:
        if f.status == "error":
            f.result()


class RemoteResp(NamedTuple):
    """Responsibilities held on the workers: one future per partition (K x n each)."""

    futures: tuple[Any, ...]


class RemoteQ:
    """``q_and_grad`` for a numeric M-step over a cluster: given :class:`RemoteResp`
    (what :func:`dask_map`'s batches yield), Q and its gradient at ``u`` summed over
    the partitions by the workers, the fixed terms taken once."""

    def __init__(self, dd: DaskData):
        self._dd = dd

    def __call__(self, u, gamma: RemoteResp, weight, *fixed_data):
        dd = self._dd
        parts = [
            dd.client.submit(tasks.partition_q, chunk, g, u, weight if i == 0 else 0.0,
                             dd.payload, pure=False)
            for i, (chunk, g) in enumerate(zip(dd.chunks, gamma.futures, strict=True))
        ]  # fmt: skip
        return tree_reduce(dd.client, parts, tasks.sum_q)


def _gammas(dd: DaskData, u: np.ndarray) -> list:
    return [
        dd.client.submit(tasks.partition_gamma, chunk, i, u, dd.payload, pure=False)
        for i, chunk in enumerate(dd.chunks)
    ]


def dask_map(functions: EMFunctions, dd: DaskData) -> StatsMap:
    """The :class:`StatsMap` of a persisted dataset (see the module docstring)."""
    client = dd.client

    def estep(u: np.ndarray) -> Stats:
        parts = [
            client.submit(tasks.partition_estep, chunk, i, u, dd.payload, pure=False)
            for i, chunk in enumerate(dd.chunks)
        ]
        return tree_reduce(client, parts, tasks.sum_stats)

    def resp(u: np.ndarray) -> Batches:
        # The rare second pass over the data: each partition's responsibilities and
        # arrays come to the client in turn (memory: one partition).
        def batches():
            for gamma, chunk in zip(_gammas(dd, u), dd.chunks, strict=True):
                yield gamma.result(), chunk.result()

        return batches

    remote = functions._replace(q_and_grad=RemoteQ(dd))
    empty = DataChunk((), 0, None)

    def q_source(u: np.ndarray) -> tuple[EMFunctions, Batches]:
        held: list = []

        def batches():
            if not held:
                held.append(RemoteResp(tuple(_gammas(dd, u))))
            return [(held[0], empty)]

        return remote, batches

    return StatsMap(dd.request, estep, resp, q_source)


def lazy_log_resp(functions: EMFunctions, u: np.ndarray, data: Mapping):
    """The n x K log-responsibilities of ``data`` at ``u`` as a lazy dask array, one
    block per partition of ``data``'s (first) dask array, computed where dask runs it."""
    import dask
    import dask.array as da

    source = open_source(functions, data)
    bounds = _bounds(data, source.names, source.n_rows, None, 1, source.bounds[0][1])
    payload = dask.delayed(tasks.make_payload(functions), traverse=False)
    k, per_row = functions.graph.n_components, functions.graph.labels_per_row
    parts = [
        da.from_delayed(
            dask.delayed(tasks.block_log_resp)(payload, u, source.names, source.dtypes, a, *blocks),
            shape=((b - a) * per_row, k),
            dtype=float,
        )
        for (a, b), blocks in zip(bounds, _blocks(data, source, bounds), strict=True)
    ]
    return da.concatenate(parts, axis=0)
