"""What runs on a Dask worker: each task is a plain function of a partition and values.

The client never ships compiled functions (PyTensor functions hold C modules and
buffers of one process). It ships a :class:`ModelPayload`: the ``pm.Model`` pickled
once by cloudpickle, with the label, mode and backend the client compiled for, and a
fingerprint of all of them. A worker compiles the model the first time a task needs
it and keeps the result in ``_COMPILED``, keyed by that fingerprint.

Why a module-level cache, against the package's rule that compiled functions are
passed as values: a worker process outlives the tasks it runs, and these tasks run
both on ``distributed`` workers and under dask's local schedulers (a lazy
``predict_proba`` without a cluster), where no worker object exists to hold state (a
``WorkerPlugin`` would cover only the first); the process is what both share, so its
module state is where they keep what they compiled. Compiling per task would
cost seconds per partition per iteration. The cache lives only here, is keyed by the
fingerprint (two models, or one model under two modes, never share an entry), holds a
few entries (oldest dropped) and is built under a lock (a worker may run several
threads). A worker that dies takes its cache with it; its replacement compiles again
(PyTensor's and numba's on-disk caches make that a load, not a compilation).
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import cloudpickle
import numpy as np

from ppl_em.compiled.functions import EMFunctions, build_em_functions
from ppl_em.em.sources import Scan, add_scans, column_sums, convert
from ppl_em.errors import DataError
from ppl_em.model.graph import analyse_model
from ppl_em.steps.columns import StatsRequest
from ppl_em.steps.estep import e_step
from ppl_em.steps.stats import DataChunk, Stats, total


class ModelPayload(NamedTuple):
    """What a worker needs to rebuild the compiled functions (see the module docstring)."""

    fingerprint: str
    model: bytes
    latent: str | None
    mode: str
    backend: str
    numeric: bool


def make_payload(functions: EMFunctions) -> ModelPayload:
    """The payload of the model ``functions`` were compiled from, in their mode and
    with their backend: C where the client's rows are compiled code, else NumPy-backed
    Ops throughout. A small model's client runs Q NumPy-backed for a fit's first calls
    and then C (:class:`ppl_em.compiled.functions.SwitchingFunction`, restarted per
    fit); a worker keeps Q NumPy-backed, because it serves many fits and cannot tell
    where one starts, and a switch counted across them would make a fit's arithmetic
    depend on what the worker ran before (and differ on a replacement worker)."""
    graph = functions.graph
    latent = graph.label_name if graph.kind == "label" else graph.dependents[0].name
    backend = "c" if functions.compiled_rows else "python"
    # Q and its gradient are compiled lazily, so asking for them costs nothing unused.
    numeric = True
    model = cloudpickle.dumps(graph.model)
    digest = hashlib.sha256(model)
    digest.update(pickle.dumps((latent, functions.mode, backend, numeric)))
    return ModelPayload(digest.hexdigest(), model, latent, functions.mode, backend, numeric)


_COMPILED: OrderedDict[str, EMFunctions] = OrderedDict()
_LOCK = threading.Lock()
MAX_COMPILED = 4


def worker_functions(payload: ModelPayload) -> EMFunctions:
    """This process's compiled functions for ``payload``: compiled on first use."""
    with _LOCK:
        found = _COMPILED.get(payload.fingerprint)
        if found is None:
            graph = analyse_model(pickle.loads(payload.model), payload.latent)
            found = build_em_functions(
                graph, payload.mode, backend=payload.backend, numeric=payload.numeric
            )
            _COMPILED[payload.fingerprint] = found
            while len(_COMPILED) > MAX_COMPILED:
                _COMPILED.popitem(last=False)
        _COMPILED.move_to_end(payload.fingerprint)
        return found


def compiled_fingerprints() -> list[str]:
    """The fingerprints this process has compiled (what a test asks a worker)."""
    with _LOCK:
        return list(_COMPILED)


class RowRange(NamedTuple):
    """Rows ``first:stop`` of an array a worker can open itself (a
    :class:`~ppl_em.em.sources.MemmapFile`, a zarr array)."""

    array: Any
    first: int
    stop: int

    def read(self) -> np.ndarray:
        return np.asarray(self.array[self.first : self.stop])


def load_partition(index: int, first: int, names, dtypes, *blocks) -> tuple[np.ndarray, ...]:
    """Partition ``index`` (rows from ``first``) as checked arrays in the model's dtypes;
    a bad value raises :class:`DataError` naming the partition and the observation."""
    arrays = [b.read() if isinstance(b, RowRange) else b for b in blocks]
    return tuple(
        _aligned(convert(name, x, dtype, first, index))
        for name, x, dtype in zip(names, arrays, dtypes, strict=True)
    )


def partition_scan(arrays: tuple[np.ndarray, ...]) -> Scan:
    return column_sums(arrays)


def sum_scans(*parts: Scan) -> Scan:
    out = parts[0]
    for part in parts[1:]:
        out = add_scans(out, part)
    return out


def make_chunk(arrays: tuple[np.ndarray, ...], first: int, request: StatsRequest) -> DataChunk:
    """The partition as a chunk with its statistics columns, built once per dataset."""
    return DataChunk(arrays, first, request.columns(arrays))


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array`` in aligned memory: arrays deserialised from Dask's network frames can
    sit at any byte offset, and PyTensor's C code refuses unaligned inputs."""
    return np.require(array, requirements=("A",))


def _chunk(chunk: DataChunk) -> DataChunk:
    """``chunk`` with aligned arrays (it may have come from another worker)."""
    if all(x.flags.aligned for x in chunk.arrays):
        return chunk
    return chunk._replace(arrays=tuple(map(_aligned, chunk.arrays)))


def _named(index: int, chunk: DataChunk, fn):
    try:
        return fn()
    except DataError as err:
        last = chunk.start + chunk.n - 1
        raise DataError(f"in partition {index} (rows {chunk.start}..{last}): {err}") from err


def partition_estep(chunk: DataChunk, index: int, u: np.ndarray, payload: ModelPayload) -> Stats:
    """The partition's E-step statistics at ``u`` (no log-responsibilities)."""
    functions, u, chunk = worker_functions(payload), _aligned(u), _chunk(chunk)
    return _named(index, chunk, lambda: e_step(functions, u, chunk))


def sum_stats(*parts: Stats) -> Stats:
    return total(parts)


def partition_gamma(
    chunk: DataChunk, index: int, u: np.ndarray, payload: ModelPayload
) -> np.ndarray:
    """The partition's K x n responsibilities at ``u``."""
    functions, u, chunk = worker_functions(payload), _aligned(u), _chunk(chunk)
    stats = _named(index, chunk, lambda: e_step(functions, u, chunk, keep_resp=True))
    return np.ascontiguousarray(np.exp(stats.log_resp.T))


def partition_q(
    chunk: DataChunk, gamma_t: np.ndarray, u: np.ndarray, weight: float, payload: ModelPayload
) -> tuple[float, np.ndarray]:
    """The partition's share of Q and its gradient at ``u`` (the fixed terms, the log
    prior among them, with ``weight``: 1 on one partition, 0 on the others)."""
    functions, u, chunk = worker_functions(payload), _aligned(u), _chunk(chunk)
    gamma_t = _aligned(gamma_t)
    q, grad = functions.q_and_grad(u, gamma_t, weight, *chunk.arrays, *functions.fixed_data)
    return float(q), np.asarray(grad, dtype=float)


def sum_q(*parts: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def block_log_resp(payload: ModelPayload, u: np.ndarray, names, dtypes, first, *blocks):
    """Log-responsibilities of one block of new data (``result.predict_proba``)."""
    functions = worker_functions(payload)
    arrays = tuple(map(_aligned, load_partition(-1, first, names, dtypes, *blocks)))
    stats = e_step(functions, _aligned(u), DataChunk(arrays, first), keep_resp=True)
    return stats.log_resp


def identity(value):
    """A value as a task's result: a future with lineage, recomputed if its worker dies
    (``client.scatter`` data would be lost with it)."""
    return value
