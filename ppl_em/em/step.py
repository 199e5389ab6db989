"""EM as pure ``init`` and ``step`` functions over a small state; the loop is separate.

In the style of blackjax: ``em_init(functions, u, config)`` runs the E-step at ``u``;
``em_step(functions, config, state)`` runs the M-step from the state's expectations
and the E-step at the new point. Both see the data only through :class:`EMData`'s
methods: chunks in memory here, each E-step the sum of ``e_step`` over them, or a
:class:`ppl_em.em.mapped.StatsMap` for data streamed or on a cluster.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions
from ppl_em.errors import DataError
from ppl_em.model.recognise import ClosedFormPlan
from ppl_em.steps.closed_form import Batches
from ppl_em.steps.columns import StatsRequest, stats_request
from ppl_em.steps.estep import e_step, resp_batches, split, whole_data
from ppl_em.steps.mstep import Expectations, MStepConfig, closed_step, numeric_step
from ppl_em.steps.stats import DataChunk, Stats, total

_NO_PLAN = ClosedFormPlan((), frozenset(), {})


class EMData(NamedTuple):
    """The data of a fit as chunks in memory, and the statistics request their columns
    follow.

    An iteration reaches its data only through three methods, which
    :class:`ppl_em.em.mapped.StatsMap` (data streamed from disk or held on a cluster)
    also has, so one loop (:func:`ppl_em.em.loop.run_em`) runs over both:
    ``estep`` (the additive statistics at ``u``), ``expectations`` (what the M-step
    reads, and where a numeric M-step sums Q) and ``final`` (the last state as kept).
    """

    chunks: tuple[DataChunk, ...]
    request: StatsRequest

    def estep(self, functions: EMFunctions, u: np.ndarray, keep_resp: bool) -> Stats:
        return total(e_step(functions, u, chunk, keep_resp) for chunk in self.chunks)

    def expectations(
        self, functions: EMFunctions, state: EMState, keep: bool = True
    ) -> tuple[Expectations, EMFunctions, Batches]:
        """The M-step's :class:`Expectations`, and ``(functions, batches)`` to sum Q over:
        responsibilities are computed (once, from the kept log-responsibilities or an
        E-step per chunk) only if asked for. ``keep`` matters only for streamed data
        (:class:`ppl_em.em.mapped.StatsMap`): data in memory are held whole anyway."""
        cache: list = []

        def batches():
            if not cache:
                cache.extend(resp_batches(functions, state.u, self.chunks, state.log_resp))
            return cache

        return Expectations(state.stats, self.request, batches), functions, batches

    def final(self, functions: EMFunctions, state: EMState) -> EMState:
        """``state`` with its log-responsibilities, recomputed at ``state.u`` if not kept."""
        if state.log_resp is not None:
            return state
        stats = self.estep(functions, state.u, keep_resp=True)
        return state._replace(stats=replace(state.stats, log_resp=stats.log_resp))


def em_data(
    functions: EMFunctions, config: MStepConfig | None = None, chunk_size: int | None = None
) -> EMData:
    """The data ``functions`` hold, whole or in chunks of ``chunk_size`` observations,
    with the statistics columns ``config``'s closed-form blocks ask for (built once)."""
    plan = _NO_PLAN if config is None else config.plan
    request = stats_request(
        plan, functions.data_names, functions.data, functions.graph.labels_per_row
    )
    if chunk_size is None:
        return EMData((whole_data(functions, request),), request)
    if not functions.spec.chunkable:
        raise ValueError(
            f"the data cannot be cut into chunks: N={functions.graph.n_obs} observations "
            f"do not exceed K={functions.graph.n_components} components, so per-observation "
            "arrays cannot be told from per-component ones. Fit the data whole."
        )
    return EMData(tuple(split(functions, chunk_size, request)), request)


class EMState(NamedTuple):
    """One E-step's result at ``u``: the objective (``loglik + logprior`` for
    ``mode="map"``, ``loglik`` for ``"mle"``) and the additive statistics (of the
    columns ``request`` names), whose log-responsibilities are None unless kept (the
    loop does not store N x K values it will not read; :func:`with_log_resp` fills
    them in). ``logprior`` is None where the objective has no use for it
    (:func:`_fixed_terms`); :func:`log_prior` gives it."""

    u: np.ndarray
    loglik: float
    logprior: float | None
    objective: float
    stats: Stats
    request: StatsRequest | None = None

    @property
    def log_resp(self) -> np.ndarray | None:
        return self.stats.log_resp


def needs_resp(config: MStepConfig | None) -> bool:
    """Whether the M-step reads responsibilities, not only statistics."""
    return config is not None and bool(config.numeric_mask.any())


def em_init(
    functions: EMFunctions,
    u: np.ndarray,
    config: MStepConfig | None = None,
    data: EMData | None = None,
    keep_resp: bool = True,
) -> EMState:
    """E-step at ``u`` over ``data`` (default: all the data ``functions`` hold).

    ``keep_resp=False`` stores no log-responsibilities unless ``config``'s M-step reads
    them (numeric variables).
    """
    data = em_data(functions, config) if data is None else data
    stats = data.estep(functions, u, keep_resp or needs_resp(config))
    extra, logprior = _fixed_terms(functions, u)
    loglik = stats.loglik + extra
    objective = loglik + logprior if functions.mode == "map" else loglik
    if not np.isfinite(objective):
        raise DataError(
            f"the objective is not finite at the current parameters (log-likelihood "
            f"{loglik}, log prior {logprior}): a parameter left its prior's support or an "
            "observed variable that does not depend on the label has impossible data."
        )
    return EMState(u, loglik, logprior, objective, stats, data.request)


def _fixed_terms(functions: EMFunctions, u: np.ndarray) -> tuple[float, float | None]:
    """``(extra, logprior)`` at ``u`` (:attr:`EMFunctions.fixed`), the log prior None
    where the objective does not read it: in ``mode="mle"`` with every observed
    variable depending on the label, neither term enters the objective, and the call
    (a NumPy-backed graph of 24 Ops, 64-116 us) took 5-8 % of an iteration of a D=4
    mixture at N=10^4 (benchmarks/README.md)."""
    if functions.mode == "mle" and not functions.graph.other_observed:
        return 0.0, None
    extra, logprior = functions.fixed(u, *functions.fixed_data)
    return float(extra), float(logprior)


def log_prior(functions: EMFunctions, state: EMState) -> float:
    """The log prior at ``state.u``, computed now where the state does not hold it."""
    if state.logprior is not None:
        return state.logprior
    return float(functions.fixed(state.u, *functions.fixed_data)[1])


def with_log_resp(functions: EMFunctions, state: EMState, data: EMData | None = None) -> EMState:
    """``state`` with its log-responsibilities, recomputed at ``state.u`` if not kept."""
    return (em_data(functions) if data is None else data).final(functions, state)


def _same_columns(a: StatsRequest | None, b: StatsRequest) -> bool:
    if a is b:
        return True
    if a is None or a.index != b.index or a.offsets.keys() != b.offsets.keys():
        return False
    same = [np.array_equal(a.offsets[key], b.offsets[key]) for key in a.offsets]
    same += [np.array_equal(x, y) for x, y in zip(a.mvn_means, b.mvn_means, strict=True)]
    return all(same)


def em_step(
    functions: EMFunctions,
    config: MStepConfig,
    state: EMState,
    data: EMData | None = None,
    keep_resp: bool = True,
) -> EMState:
    """One EM iteration: the M-step from ``state``, then the E-step at the new point."""
    data = em_data(functions, config) if data is None else data
    if not _same_columns(state.request, data.request):
        # A state from another config's E-step: its statistics are of other columns.
        state = em_init(functions, state.u, config, data, state.log_resp is not None)
    ex, q_functions, q_batches = data.expectations(functions, state)
    u = closed_step(functions, config, state.u, ex)
    u = numeric_step(q_functions, config, u, q_batches)
    return em_init(functions, u, config, data, keep_resp)
