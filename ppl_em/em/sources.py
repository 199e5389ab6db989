"""Data beyond memory as a source of chunks: memmap, zarr, dask or NumPy arrays, read a
chunk at a time.

``ppl_em.fit(data={name: array, ...})`` hands EM every per-observation array
(``EMFunctions.data_names``: observed values and covariates) with a first axis of any
length N; the compiled functions take chunks of any length, so N never enters them.
An :class:`ArraySource` holds the user's arrays (nothing is read when it is built) and
the chunk boundaries; :meth:`ArraySource.read` loads one chunk as NumPy arrays in the
model's dtypes. Arrays are duck-typed (``shape``, ``dtype``, slicing along the first
axis), so this layer imports neither zarr nor dask:

- an ``np.memmap`` is read with plain file reads into a fresh buffer
  (:class:`MemmapFile`): slicing the mapping would leave every page read mapped into
  the process, and its resident size would grow to the whole file;
- a zarr array's slice decompresses only the zarr chunks it touches;
- a dask array's slice is computed by dask's current scheduler.

Values are checked once per dataset (:func:`scan`, which also sums what the statistics
offsets need) and named by partition and observation; later reads only cast.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.errors import DataError
from ppl_em.model.recognise import ClosedFormPlan
from ppl_em.steps.columns import StatsRequest, stats_request

# A chunk's working set (data, the K rows, statistics columns, responsibilities when
# kept) is at most about this many bytes by default: the streamed fit's memory, whatever N.
CHUNK_BYTES = 64 * 2**20
# At most this many rows by default: below the numba kernel's two-thread threshold
# (ppl_em.steps.kernel.PARALLEL_MIN), so the E-step of one chunk takes one core while
# the reader thread reads the next and builds its columns on the other; a chunk's
# arrays also stay in cache between the two. Measured on 1-D K=3 at N=10^7 from a
# memmap (benchmarks/bench_bigdata.py): 65,536-row chunks ran an iteration in 1.0-1.3x
# the in-memory time, 250,000-row and larger ones in 1.8-2.3x.
MIN_CHUNK, MAX_CHUNK = 1_000, 65_536
# The start's k-means runs on at most this many observations, in this many runs spread
# evenly over the data (contiguous runs: cheap reads from a file, zarr or dask).
START_SAMPLE, START_RUNS = 100_000, 16


class MemmapFile(NamedTuple):
    """A C-ordered array stored in a file from byte ``offset`` (what ``np.memmap``
    maps), read by rows with ordinary file reads; picklable, so a Dask worker can open
    the same file."""

    filename: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        tail = self.shape[1:]
        row_bytes = int(np.prod(tail, dtype=np.int64)) * self.dtype.itemsize
        count = max(b - a, 0) * int(np.prod(tail, dtype=np.int64))
        with open(self.filename, "rb") as f:
            out = np.fromfile(f, dtype=self.dtype, count=count, offset=self.offset + a * row_bytes)
        return out.reshape((max(b - a, 0), *tail))


def reader(array: Any) -> Any:
    """What chunks are read from: a :class:`MemmapFile` for a whole, C-ordered
    ``np.memmap`` (a view of one shares its parent's offset, so it is sliced as is),
    else the array itself."""
    if (
        isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)
        and array.flags.c_contiguous
        and array.filename
    ):
        return MemmapFile(str(array.filename), int(array.offset), array.dtype, array.shape)
    return array


def native_chunk(array: Any) -> int | None:
    """The first-axis chunk length a zarr or (evenly chunked) dask array is stored in."""
    chunks = getattr(array, "chunks", None)
    if not chunks:
        return None
    first = chunks[0]
    if isinstance(first, tuple):  # dask: the lengths of every chunk
        return int(first[0]) if first else None
    return int(first)


class ArraySource(NamedTuple):
    """The per-observation arrays of a fit (``names`` in ``EMFunctions.data_names``
    order, read through :func:`reader`), the model's dtypes, the number of rows N and
    the chunks' ``(first, stop)`` rows."""

    names: tuple[str, ...]
    arrays: tuple[Any, ...]
    dtypes: tuple[np.dtype, ...]
    n_rows: int
    bounds: tuple[tuple[int, int], ...]

    def read(self, i: int, check: bool = False) -> tuple[np.ndarray, ...]:
        """Chunk ``i`` as NumPy arrays in the model's dtypes (``check``: values checked,
        errors naming partition ``i`` and the observation)."""
        a, b = self.bounds[i]
        return tuple(
            convert(name, x[a:b], dtype, a, i if check else None)
            for name, x, dtype in zip(self.names, self.arrays, self.dtypes, strict=True)
        )

    def rows(self, a: int, b: int) -> tuple[np.ndarray, ...]:
        """Rows ``a:b`` (any run, checked), e.g. a sample."""
        return tuple(
            convert(name, x[a:b], dtype, a, -1)
            for name, x, dtype in zip(self.names, self.arrays, self.dtypes, strict=True)
        )

    def rechunked(self, chunk_size: int) -> ArraySource:
        n = self.n_rows
        return self._replace(
            bounds=tuple((a, min(a + chunk_size, n)) for a in range(0, n, chunk_size))
        )


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _where(name: str, bad: tuple[int, ...], first: int, part: int | None) -> str:
    inner = f", element {bad[1:]}" if len(bad) > 1 else ""
    place = "" if part is None or part < 0 else f" in partition {part}"
    return f"data for {name!r}{place} at observation {first + bad[0]}{inner}"


def convert(name: str, block: Any, dtype: np.dtype, first: int, part: int | None) -> np.ndarray:
    """``block`` (rows from ``first`` on) as a NumPy array of ``dtype``. With ``part``
    not None, checked as :func:`ppl_em.with_data` checks an array (masked, non-finite,
    non-integer where the distribution is discrete, changed by the cast), the error
    naming the partition and the observation."""
    if part is None:
        return np.asarray(block).astype(dtype, copy=False)
    if np.ma.isMaskedArray(block) and np.ma.getmaskarray(block).any():
        bad = _first_bad(np.ma.getmaskarray(block))
        raise DataError(f"{_where(name, bad, first, part)} is masked; drop or fill it.")
    arr = np.asarray(block)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"data for {name!r} has dtype {arr.dtype}; give a numeric array.")
    if not np.all(np.isfinite(arr)):
        bad = _first_bad(~np.isfinite(arr))
        raise DataError(
            f"{_where(name, bad, first, part)} is not finite (value {arr[bad].item()!r}): "
            "remove or replace NaN/inf entries (EM integrates missing values out only "
            "in data held in memory, in the model as built)."
        )
    fractional = np.issubdtype(dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer)
    if fractional and not np.all(arr == np.round(arr)):
        bad = _first_bad(arr != np.round(arr))
        raise DataError(
            f"{_where(name, bad, first, part)} holds {arr[bad].item()!r} but must be an "
            "integer (its distribution is discrete); casting would truncate it."
        )
    out = arr.astype(dtype, copy=False)
    with np.errstate(invalid="ignore"):
        changed = out != arr
    if np.any(changed):
        bad = _first_bad(changed)
        raise DataError(
            f"{_where(name, bad, first, part)} holds {arr[bad].item()!r}, which the "
            f"model's dtype {dtype} cannot hold (it would become {out[bad].item()!r})."
        )
    return out


def _check_names(functions: EMFunctions, data: Mapping) -> None:
    names, fixed = functions.data_names, functions.spec.fixed_names
    unknown = [n for n in data if n not in names]
    if unknown:
        hint = (
            f" ({unknown} do not depend on the label: keep them in the model)"
            if set(unknown) <= set(fixed)
            else ""
        )
        raise DataError(
            f"data has {unknown}, which are not per-observation arrays of the model; they "
            f"are {list(names)}{hint}."
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(
            f"data must hold every per-observation array, chunked alike: missing {missing} "
            f"(the model's are {list(names)}: observed values and covariates)."
        )


def _check_array(name: str, array: Any, model_array: np.ndarray) -> None:
    """Type, dtype kind and trailing shape against the model's array (the first axis is
    free: the compiled functions take chunks of any length)."""
    if not all(hasattr(array, a) for a in ("shape", "dtype", "__getitem__")):
        raise TypeError(
            f"data for {name!r} is a {type(array).__name__}; give a numpy array or memmap, "
            "a zarr array or a dask array (anything with shape, dtype and row slicing)."
        )
    dtype = np.dtype(array.dtype)
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise TypeError(f"data for {name!r} has dtype {dtype}; give a numeric array.")
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != model_array.ndim or shape[1:] != model_array.shape[1:]:
        raise DataError(
            f"data for {name!r} has shape {shape} but the model's {name!r} has shape "
            f"{model_array.shape}: every axis but the first (the observations) must match."
        )


def open_source(
    functions: EMFunctions, data: Mapping, chunk_size: int | None = None
) -> ArraySource:
    """Check ``data`` against the model (names, types, trailing shapes, equal lengths)
    and cut it into chunks of ``chunk_size`` rows (default: :func:`default_chunk_size`)."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"data must be a dict of data name -> array, got {type(data).__name__}; "
            "an iterator of dicts is read by method='online'."
        )
    _check_names(functions, data)
    model = dict(zip(functions.data_names, functions.data, strict=True))
    for name in functions.data_names:
        _check_array(name, data[name], model[name])
    lengths = {name: int(data[name].shape[0]) for name in functions.data_names}
    if len(set(lengths.values())) != 1:
        raise DataError(f"the arrays in data must have one row per observation; lengths {lengths}.")
    n = next(iter(lengths.values()))
    if n < 1:
        raise DataError("data has no observations (first axis of length 0).")
    arrays = tuple(reader(data[name]) for name in functions.data_names)
    dtypes = tuple(model[name].dtype for name in functions.data_names)
    size = default_chunk_size(functions, arrays) if chunk_size is None else int(chunk_size)
    source = ArraySource(functions.data_names, arrays, dtypes, n, ())
    return source.rechunked(size)


def batch_arrays(
    functions: EMFunctions, part: Mapping, first: int, index: int
) -> tuple[np.ndarray, ...]:
    """One batch of a stream (a dict of arrays) as checked NumPy arrays in the model's
    dtypes; errors name the batch (``index``) and the observation (from ``first``)."""
    _check_names(functions, part)
    out = []
    for name, old in zip(functions.data_names, functions.data, strict=True):
        _check_array(name, part[name], old)
        out.append(convert(name, part[name], old.dtype, first, index))
    if len({x.shape[0] for x in out}) != 1:
        lengths = {n: x.shape[0] for n, x in zip(functions.data_names, out, strict=True)}
        raise DataError(f"batch {index} of the stream has arrays of lengths {lengths}.")
    return tuple(out)


def default_chunk_size(functions: EMFunctions, arrays=()) -> int:
    """Rows per chunk for about ``CHUNK_BYTES`` of working set, a multiple of the
    arrays' own (zarr/dask) chunk length where they have one."""
    k = functions.graph.n_components
    cells = sum(int(np.prod(x.shape[1:], dtype=np.int64)) for x in functions.data)
    per_row = 8 * (2 * k + cells * (cells + 3) + 4) * functions.graph.labels_per_row
    size = int(np.clip(CHUNK_BYTES // per_row, MIN_CHUNK, MAX_CHUNK))
    native = [c for c in map(native_chunk, arrays) if c]
    if native:
        step = max(native)
        size = max(step, size // step * step)
    return size


class Scan(NamedTuple):
    """What one checked pass over the data gives: the number of rows and each array's
    sum over its first axis."""

    n_rows: int
    sums: tuple[np.ndarray, ...]


def column_sums(arrays) -> Scan:
    """The :class:`Scan` of one chunk."""
    n = int(np.shape(arrays[0])[0])
    return Scan(n, tuple(np.asarray(x, dtype=float).sum(axis=0) for x in arrays))


def add_scans(a: Scan, b: Scan) -> Scan:
    return Scan(a.n_rows + b.n_rows, tuple(x + y for x, y in zip(a.sums, b.sums, strict=True)))


def scan(source: ArraySource) -> Scan:
    """One pass over ``source``: every value checked (errors name the partition and the
    observation), the sums the statistics offsets need."""
    out = None
    for i in range(len(source.bounds)):
        part = column_sums(source.read(i, check=True))
        out = part if out is None else add_scans(out, part)
    return out


def request_from_scan(
    plan: ClosedFormPlan, names, found: Scan, labels_per_row: int = 1
) -> StatsRequest:
    """The statistics request centred on the whole data's means: ``stats_request`` of
    one row holding each array's mean over the observations (the mean of a Normal
    block's data, an MvNormal block's mean vector: exactly what it takes of the whole
    data, up to the order of summation)."""
    means = [np.asarray(s / found.n_rows)[None] for s in found.sums]
    return stats_request(plan, names, means, labels_per_row)


def sample(source: ArraySource, size: int = START_SAMPLE) -> tuple[np.ndarray, ...]:
    """All the rows if there are at most ``size``, else ``START_RUNS`` contiguous runs
    spread evenly over the data (checked): what the default start's k-means sees."""
    n = source.n_rows
    if n <= size:
        return source.rows(0, n)
    run = size // START_RUNS
    firsts = np.linspace(0, n - run, START_RUNS).astype(np.int64)
    parts = [source.rows(int(a), int(a) + run) for a in firsts]
    return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


def stream_batches(stream, names: tuple[str, ...], batch_size: int | None) -> Iterator[dict]:
    """Dicts of arrays from ``stream`` (an iterator of dicts), re-cut into batches of
    ``batch_size`` rows when it is given (the last may be shorter)."""
    pending: list[dict] = []
    held = 0
    for part in stream:
        if not isinstance(part, Mapping):
            raise TypeError(
                f"an online data stream must yield dicts of data name -> array, got "
                f"{type(part).__name__}."
            )
        missing = [n for n in names if n not in part]
        if missing:
            raise DataError(
                f"a chunk of the online data stream lacks {missing}: every chunk must hold "
                f"every per-observation array {list(names)}."
            )
        if batch_size is None:
            yield part
            continue
        pending.append({n: np.asarray(part[n]) for n in names})
        held += int(np.shape(part[names[0]])[0])
        while held >= batch_size:
            joined = {n: np.concatenate([p[n] for p in pending]) for n in names}
            yield {n: x[:batch_size] for n, x in joined.items()}
            rest = {n: x[batch_size:] for n, x in joined.items()}
            held -= batch_size
            pending = [rest] if held else []
    if pending and held:
        yield {n: np.concatenate([p[n] for p in pending]) for n in names}
