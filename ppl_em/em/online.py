"""Online EM (Cappé & Moulines 2009) for data seen once: a stream of batches.

Batch EM's M-step is a function of the expected sufficient statistics averaged over the
data, ``theta = M(s)``. Online EM replaces that average by a stochastic approximation
over the stream: batch t's E-step at the current parameters gives its statistics per
observation ``s_bar_t`` (a :class:`~ppl_em.steps.stats.Stats` divided by its size), and

    s_t = s_{t-1} + rho_t (s_bar_t - s_{t-1}),   theta_t = M(s_t),
    rho_t = (t + t0)^(-kappa)  (kappa in (0.5, 1]; rho_1 = 1: the first batch sets s_1)

The step sizes decrease, ``sum rho_t`` diverges and ``sum rho_t^2`` converges, so
``theta_t`` converges to a stationary point of the expected log-likelihood. With
``average=True`` the estimate is ``M`` of the average of ``s_t`` over the batches after
the first ``burn_in`` (Polyak-Ruppert averaging, on the statistics: the map ``M`` is
smooth, so the averaged estimate has the same limit with the averaged rate, and it is a
valid parameter whatever the family, e.g. a positive-definite covariance).

The M-step reads ``s_t`` scaled to the observations seen so far (``n_t s_t``), so the
priors of ``mode="map"`` weigh against the data as in a batch fit of them. Only
closed-form blocks have an ``M(s)``: a model with numeric variables is refused. The
statistics columns are centred on the first batch's means (a stream cannot be scanned
beforehand), and a variance whose moments would cancel about them cannot take the
second pass batch EM takes: that too is refused, naming the remedy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from ppl_em.compiled.functions import EMFunctions, with_arrays
from ppl_em.em.loop import run_em
from ppl_em.em.starts import apply_start, check_support, default_start
from ppl_em.errors import ClosedFormUnavailableError, ConvergenceWarning, DataError
from ppl_em.steps.columns import StatsRequest, stats_request
from ppl_em.steps.estep import e_step
from ppl_em.steps.mstep import Expectations, MStepConfig, closed_step
from ppl_em.steps.stats import DataChunk, Stats

# Batch EM iterations on the first batch for the warm start, at most.
WARM_ITER = 200


class OnlineOptions(NamedTuple):
    """Step sizes ``rho_t = (t + t0)^(-kappa)``; Polyak-Ruppert averaging of the
    statistics after ``burn_in`` batches; no M-step before ``min_obs`` observations
    (default ``20 K``: a first batch of a few observations would fit them exactly)."""

    kappa: float = 0.6
    t0: float = 0.0
    average: bool = False
    burn_in: int = 10
    min_obs: int | None = None
    warm_start: bool = True


def online_options(given: Mapping | None) -> OnlineOptions:
    """``OnlineOptions`` from a dict of overrides, checked."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(OnlineOptions._fields))
    if unknown:
        raise ValueError(
            f"online_kwargs has unknown keys {unknown}; the options are "
            f"{list(OnlineOptions._fields)}."
        )
    options = OnlineOptions(**given)
    if not 0.5 < float(options.kappa) <= 1.0:
        raise ValueError(
            f"online_kwargs['kappa']={options.kappa!r} must lie in (0.5, 1]: the step sizes "
            "must sum to infinity and their squares to a finite number (Cappé & Moulines)."
        )
    if not float(options.t0) >= 0.0:
        raise ValueError(f"online_kwargs['t0']={options.t0!r} must be >= 0.")
    if int(options.burn_in) < 0:
        raise ValueError(f"online_kwargs['burn_in']={options.burn_in!r} must be >= 0.")
    return options


def step_size(t: int, options: OnlineOptions) -> float:
    """``rho_t``; batch 1 initialises the statistics (``rho_1 = 1``)."""
    return 1.0 if t == 1 else float((t + options.t0) ** -options.kappa)


def refuse_numeric(functions: EMFunctions, config: MStepConfig) -> None:
    """Online EM needs ``M(s)`` for every variable: name those that have none."""
    layout = functions.layout
    names = [n for n, sl in zip(layout.rv_names, layout.slices, strict=True)
             if config.numeric_mask[sl].any()]  # fmt: skip
    if not names:
        return
    reasons = "; ".join(f"{n}: {config.plan.reasons[n]}" for n in names if n in config.plan.reasons)
    raise ClosedFormUnavailableError(
        f"method='online' updates sufficient statistics, so every parameter needs a "
        f"closed-form M-step, and {names} have none ({reasons or 'mstep=numeric'}). Fit "
        "with method='batch' (exact EM, streaming the data every iteration; any M-step), "
        "or give these parameters conjugate or flat priors (or mode='mle')."
    )


def _no_second_pass():
    raise DataError(
        "a closed-form moment of this fit cancels in the statistics centred on the first "
        "batch's means (a component lies over 100 standard deviations from them) and "
        "online EM cannot take a second pass over a stream. Centre or rescale the data, "
        "or fit with method='batch'."
    )


class OnlineRun(NamedTuple):
    """An online pass: the estimate ``u``; the statistics it is ``M`` of (scaled to the
    observations seen); the observations (labels) and rows seen; ``rho_t`` per batch;
    the prequential log-likelihood (each batch's at the parameters before its update)
    in total and per observation per batch."""

    u: np.ndarray
    stats: Stats
    request: StatsRequest
    n_obs: int
    n_rows: int
    steps: np.ndarray
    prequential: float
    trace: np.ndarray


class _Running(NamedTuple):
    nk: np.ndarray
    s: np.ndarray

    def toward(self, other: _Running, rho: float) -> _Running:
        return _Running(self.nk + rho * (other.nk - self.nk), self.s + rho * (other.s - self.s))

    def scaled(self, n: int) -> Stats:
        return Stats(n, float("nan"), self.nk * n, self.s * n)


def _start(functions, config, arrays, start: Mapping | None, warm: bool) -> np.ndarray:
    """The default start (k-means on the first batch, one exact M-step) or the user's;
    with ``warm``, then batch EM on the first batch to convergence (the recursion's
    ``theta_0``: its first steps then refine an estimate instead of running EM's early
    iterations with large steps on single batches)."""
    first = with_arrays(functions, arrays)
    u = default_start(first, config, None)
    if start is not None:
        u = apply_start(first, start, u)
    check_support(first, u)
    if warm:
        with warnings.catch_warnings():
            # A first batch's fit need not converge: it is only a starting point.
            warnings.simplefilter("ignore", ConvergenceWarning)
            u = run_em(first, config, u, max_iter=WARM_ITER, tol=1e-6, gap_tol=np.inf).state.u
    return u


def online_em(
    functions: EMFunctions,
    config: MStepConfig,
    batches: Iterable[tuple[np.ndarray, ...]],
    options: OnlineOptions | None = None,
    start: Mapping | None = None,
) -> OnlineRun:
    """One pass of online EM over ``batches`` (checked arrays in ``data_names`` order)."""
    refuse_numeric(functions, config)
    options = OnlineOptions() if options is None else options
    per_row = functions.graph.labels_per_row
    k = functions.graph.n_components
    min_obs = 20 * k if options.min_obs is None else int(options.min_obs)
    u, request, running, average = None, None, None, None
    n_seen, n_rows, n_avg, prequential, steps, trace = 0, 0, 0, 0.0, [], []
    for t, arrays in enumerate(batches, start=1):
        if u is None:
            request = stats_request(config.plan, functions.data_names, arrays, per_row)
            u = _start(functions, config, arrays, start, options.warm_start)
        chunk = DataChunk(arrays, n_rows, request.columns(arrays))
        try:
            stats = e_step(functions, u, chunk)
        except DataError as err:
            raise DataError(f"in batch {t - 1} (rows {n_rows}..): {err}") from err
        per_obs = _Running(stats.nk / stats.n_obs, stats.s / stats.n_obs)
        rho = step_size(t, options)
        running = per_obs if running is None else running.toward(per_obs, rho)
        n_seen, n_rows = n_seen + stats.n_obs, n_rows + chunk.n
        prequential += stats.loglik
        steps.append(rho)
        trace.append(stats.loglik / stats.n_obs)
        if options.average and t > options.burn_in:
            n_avg += 1
            average = running if average is None else average.toward(running, 1.0 / n_avg)
        if n_seen >= min_obs:
            ex = Expectations(running.scaled(n_seen), request, _no_second_pass)
            u = closed_step(functions, config, u, ex)
    if u is None:
        raise DataError("the online data stream yielded no batches.")
    final = average if average is not None else running
    if average is not None:
        u = closed_step(
            functions, config, u, Expectations(final.scaled(n_seen), request, _no_second_pass)
        )
    return OnlineRun(
        u, final.scaled(n_seen), request, n_seen, n_rows, np.asarray(steps), prequential,
        np.asarray(trace),
    )  # fmt: skip
