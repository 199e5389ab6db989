"""``ppl_em.fit(data=...)``: EM on data beyond memory or beyond one machine.

Three ways over one seam (``e_step`` -> additive ``Stats`` -> ``m_step``):

- ``method="batch"`` (default), no ``client``: exact EM streaming the data chunk by
  chunk every iteration (:func:`ppl_em.em.mapped.local_map`); memory bounded by the
  chunk, the estimate the in-memory one to round-off;
- ``method="batch"`` with a ``dask.distributed`` ``client``: the same EM with the
  partitions persisted on the workers (:mod:`ppl_em.distributed`);
- ``method="online"``: one pass over a stream of batches (:mod:`ppl_em.em.online`).

N enters only here: the model is compiled from the sample it was declared with (its
arrays fix names, dtypes and trailing shapes; the compiled functions take any length),
and the result's ``n_obs`` is the data's N, which BIC reads. The statistics offsets
are the whole data's means from one checked pass over it before the first E-step (the
pass validates every value anyway, and a first chunk of sorted data could sit far
from the mean and send the variances through their cancellation fallback, a second
pass over the data per iteration); an online stream cannot be passed over twice, so
there they come from the first batch. The default start is computed on a sample of
the data (all of it up to 10^5 observations: then the start, and so every iterate, is
the in-memory fit's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ppl_em.bigdata.result import StreamedEMResult
from ppl_em.compiled.functions import EMFunctions, with_arrays
from ppl_em.diagnostics import EMPTY_COUNT, select_run
from ppl_em.em.loop import EMRun, run_em
from ppl_em.em.mapped import local_map
from ppl_em.em.online import OnlineRun, online_em, online_options
from ppl_em.em.sources import (
    ArraySource,
    batch_arrays,
    open_source,
    request_from_scan,
    sample,
    scan,
    stream_batches,
)
from ppl_em.em.starts import apply_start, default_start
from ppl_em.em.step import log_prior
from ppl_em.options import METHODS
from ppl_em.prepared import PreparedEM
from ppl_em.steps.estep import joint

# Online batches of a dict of arrays when batch_size is not given.
ONLINE_BATCH = 100_000
# Data of at most this many rows may take the "auto" backend (NumPy-backed rows for a
# small problem); beyond it the rows are compiled (C) and passed over by the numba kernel.
SMALL_DATA = 100_000


def backend_for(data: Any) -> str:
    """The backend to compile a model for ``data`` with (see ``SMALL_DATA``)."""
    if isinstance(data, Mapping) and data:
        first = next(iter(data.values()))
        if hasattr(first, "shape") and len(first.shape) and int(first.shape[0]) <= SMALL_DATA:
            return "auto"
    return "c"


def _positive_int(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer or None.")


def check_data_args(data, chunk_size, client, method, batch_size, online_kwargs, n_init) -> None:
    """Refuse inconsistent big-data arguments before any work starts."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    _positive_int("chunk_size", chunk_size)
    _positive_int("batch_size", batch_size)
    if data is None:
        raise ValueError(
            f"method={method!r}, client, chunk_size and batch_size apply to data given to "
            "fit: pass data={name: array, ...} (or an iterator of such dicts for "
            "method='online')."
        )
    if method == "batch":
        if not isinstance(data, Mapping):
            raise TypeError(
                f"data must be a dict of data name -> array for method='batch', got "
                f"{type(data).__name__}; an iterator of dicts is read by method='online'."
            )
        if batch_size is not None or online_kwargs is not None:
            raise ValueError("batch_size and online_kwargs apply to method='online' only.")
        return
    if client is not None:
        raise ValueError(
            "method='online' reads its stream once on this process; client= distributes "
            "method='batch' (exact EM)."
        )
    if n_init != 1:
        raise ValueError(f"method='online' passes over its stream once: n_init={n_init} must be 1.")


def _sample_functions(functions: EMFunctions, source: ArraySource) -> EMFunctions:
    """``functions`` holding a sample of the data: where starts and diagnostics look."""
    return with_arrays(functions, sample(source))


def _starts(prepared, at: EMFunctions, start, n_init: int, random_seed) -> list[np.ndarray]:
    rng = np.random.default_rng(random_seed)
    starts = []
    for r in range(n_init):
        u = default_start(at, prepared.config, None if r == 0 else rng)
        if start is not None and r == 0:
            u = apply_start(at, start, u)
        starts.append(u)
    # No check_support on the sample: the first E-step reads every observation and names
    # an impossible one by its partition (the sample's index would not say where it is).
    return starts


def _stats_map(prepared: PreparedEM, source: ArraySource, data: Mapping, chunk_size, client):
    functions, config = prepared
    if client is not None:
        from ppl_em.distributed.engine import dask_map, persist_data

        return dask_map(functions, persist_data(client, functions, config, data, chunk_size))
    per_row = functions.graph.labels_per_row
    request = request_from_scan(config.plan, functions.data_names, scan(source), per_row)
    return local_map(functions, source, request)


def _choose(at: EMFunctions, runs: list[EMRun]) -> tuple[EMRun, dict]:
    """The best run, never a collapsed one; identical and collapsed components judged
    on the sample (they need every observation's responsibilities), counts on all N."""
    joints = [joint(at, r.state.u) for r in runs]
    log_resps = [j - np.logaddexp.reduce(j, axis=1, keepdims=True) for j in joints]
    names = ", ".join(repr(name) for name in at.spec.observed)
    best, found = select_run(
        [r.state.objective for r in runs], joints, log_resps, at.observed_columns(), names
    )
    return runs[best], _with_counts(found, runs[best].state.stats.nk, len(log_resps[best]))


def _with_counts(found: dict, nk: np.ndarray, sample_size: int) -> dict:
    empty = [int(k) for k in np.flatnonzero(nk < EMPTY_COUNT)]
    return {**found, "component_counts": nk, "empty_components": empty, "sample_size": sample_size}


def fit_batch(prepared: PreparedEM, data: Mapping, options: dict, *, start, n_init,
              random_seed, chunk_size, client) -> StreamedEMResult:  # fmt: skip
    """Exact EM on ``data``, streamed here or mapped over ``client``'s workers."""
    t0 = time.perf_counter()
    functions = prepared.functions
    source = open_source(functions, data, chunk_size)
    # First the checked pass (or the load onto the cluster): a bad value is then named
    # by its partition, not found first in the start's sample.
    smap = _stats_map(prepared, source, data, chunk_size, client)
    at = _sample_functions(functions, source)
    starts = _starts(prepared, at, start, n_init, random_seed)
    runs = [run_em(functions, prepared.config, u, data=smap, **options) for u in starts]
    best, diagnostics = _choose(at, runs)
    objectives = tuple(r.state.objective for r in runs)
    logprior = log_prior(functions, best.state)
    return _result(prepared, best.state.u, best.state.loglik, logprior, dict(
        history=best.history, n_iter=best.n_iter, converged=best.converged,
        monotone=best.monotone, objectives_per_init=objectives, diagnostics=diagnostics,
        n_data=best.state.stats.n_obs, n_data_rows=source.n_rows, method="batch",
        data=data, elapsed=time.perf_counter() - t0,
    ))  # fmt: skip


def _online_batches(functions: EMFunctions, data, batch_size: int | None) -> Iterator:
    """Checked arrays per batch: slices of a dict of arrays, or a stream's dicts."""
    if isinstance(data, Mapping):
        source = open_source(functions, data, batch_size or ONLINE_BATCH)
        yield from (source.read(i, check=True) for i in range(len(source.bounds)))
        return
    first = 0
    for index, part in enumerate(stream_batches(iter(data), functions.data_names, batch_size)):
        arrays = batch_arrays(functions, part, first, index)
        first += arrays[0].shape[0]
        yield arrays


def fit_online(prepared: PreparedEM, data, *, start, batch_size, online_kwargs) -> StreamedEMResult:
    """Online EM over ``data`` seen once (see :mod:`ppl_em.em.online`). For a dict of
    arrays the log-likelihood is evaluated at the estimate in one more pass; for a
    stream it is the prequential one (each batch's, before its update)."""
    t0 = time.perf_counter()
    functions, config = prepared
    options = online_options(online_kwargs)
    run: OnlineRun = online_em(
        functions, config, _online_batches(functions, data, batch_size), options, start
    )
    loglik, kind = run.prequential, "prequential"
    if isinstance(data, Mapping):
        source = open_source(functions, data, batch_size or ONLINE_BATCH)
        loglik, kind = local_map(functions, source, run.request).gather(run.u).loglik, "exact"
    extra, logprior = functions.fixed(run.u, *functions.fixed_data)
    loglik, logprior = loglik + float(extra), float(logprior)
    objective = loglik + logprior if functions.mode == "map" else loglik
    diagnostics = _with_counts({"issues": []}, run.stats.nk, 0)
    diagnostics["online"] = {
        "loglik": kind,
        "prequential_loglik": run.prequential,
        "step_sizes": run.steps,
        "n_batches": len(run.steps),
        "trace": run.trace,
        "options": options._asdict(),
    }
    return _result(prepared, run.u, loglik, logprior, dict(
        history=np.array([objective]), n_iter=len(run.steps), converged=True, monotone=True,
        objectives_per_init=(objective,), diagnostics=diagnostics, n_data=run.n_obs,
        n_data_rows=run.n_rows, method="online",
        data=data if isinstance(data, Mapping) else None, elapsed=time.perf_counter() - t0,
    ))  # fmt: skip


def _result(prepared: PreparedEM, u, loglik: float, logprior: float, extra: dict):
    functions = prepared.functions
    values = functions.constrain(u)
    return StreamedEMResult(
        params=dict(zip(functions.layout.rv_names, map(np.asarray, values), strict=True)),
        log_posterior=loglik + logprior,
        loglik=loglik,
        log_resp=None,
        mode=functions.mode,
        label_name=functions.graph.label_name,
        unconstrained=u,
        prepared=prepared,
        **extra,
    )


def fit_data(prepared: PreparedEM, data, options: dict, *, start=None, n_init=1,
             random_seed=None, chunk_size=None, client=None, method="batch",
             batch_size=None, online_kwargs=None) -> StreamedEMResult:  # fmt: skip
    """``ppl_em.fit``'s path for ``data=`` (see the module docstring); ``options`` are
    the loop's (max_iter, tol, gap_tol, progressbar, accelerate)."""
    check_data_args(data, chunk_size, client, method, batch_size, online_kwargs, n_init)
    for extra in ("weights", "labels"):
        # Per-observation weights or known labels held by the compiled functions would
        # have to be chunked with the data; the streamed paths do not carry them yet.
        if getattr(prepared.functions, extra, None) is not None:
            raise ValueError(
                f"fit(data=...) does not carry per-observation {extra} yet; fit in memory."
            )
    masked = [name for name, _ in prepared.functions.graph.observed_masks]
    if masked:
        raise ValueError(
            f"fit(data=...) streams complete arrays, but the model was built with missing "
            f"values in {masked}; fit it in memory (EM integrates them out there), or build "
            "the model from complete data."
        )
    if method == "online":
        return fit_online(
            prepared, data, start=start, batch_size=batch_size, online_kwargs=online_kwargs
        )
    return fit_batch(prepared, data, options, start=start, n_init=n_init,
                     random_seed=random_seed, chunk_size=chunk_size, client=client)  # fmt: skip
