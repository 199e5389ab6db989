"""The public entry point ``ppl_em.fit``: restarts, the best run, the result."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pymc as pm

from ppl_em.bigdata import StreamedEMResult, backend_for, fit_data
from ppl_em.diagnostics import select_run
from ppl_em.em.convergence import GAP_TOL
from ppl_em.em.loop import EMRun, run_em
from ppl_em.em.starts import apply_start, check_support, default_start
from ppl_em.em.step import em_data, log_prior
from ppl_em.observations import fix_parameters, with_observations
from ppl_em.options import FIT_CONSTRAINTS, check_args
from ppl_em.prepared import PreparedEM, apply_reg_covar, prepare
from ppl_em.result import EMResult
from ppl_em.steps.estep import joint
from ppl_em.steps.mstep import restarted


def _check_fit_args(args: dict) -> None:
    check_args(FIT_CONSTRAINTS, args)
    model = args.get("model")
    if model is not None and not isinstance(model, pm.Model):
        raise TypeError(f"model must be a pm.Model or None, got {type(model).__name__}.")
    latent = args.get("latent")
    if latent is not None and not isinstance(latent, str):
        raise TypeError(f"latent must be a variable name (str), got {latent!r}.")
    prepared = args.get("prepared")
    if prepared is not None and not isinstance(prepared, PreparedEM):
        raise TypeError(
            f"prepared must be the result of ppl_em.prepare(...), got {type(prepared).__name__}."
        )
    if prepared is not None:
        _check_prepared(prepared, args)


def _check_prepared(prepared: PreparedEM, args: dict) -> None:
    """A ``prepared`` model fits what it was prepared for: say so rather than silently
    fit another model, mode, label or M-step than the one asked for."""
    functions = prepared.functions
    graph = functions.graph
    model = args.get("model")
    if model is not None and model is not graph.user_model:
        raise ValueError(
            "fit got both model= and prepared=, and prepared was compiled for another "
            "model; omit model (prepared decides it) or prepare this one with ppl_em.prepare."
        )
    label = graph.label_name if graph.kind == "label" else graph.dependents[0].name
    for name, actual in (("mode", functions.mode), ("latent", label)):
        given = args.get(name)
        if given is not None and given != actual:
            raise ValueError(
                f"prepared was compiled for {name}={actual!r} but fit got {name}={given!r}; "
                f"omit {name} (prepared decides it) or prepare again with ppl_em.prepare."
            )
    if args.get("mstep") is not None:
        raise ValueError(
            f"fit got mstep={args['mstep']!r} with prepared=: the M-step was chosen by "
            "ppl_em.prepare(..., mstep=...); omit mstep or prepare again."
        )


def _check_observation_args(streamed: bool, prepared, weights, labels, fixed) -> None:
    given = [n for n, v in (("weights", weights), ("labels", labels), ("fixed", fixed))
             if v is not None]  # fmt: skip
    if streamed and given:
        raise ValueError(
            f"fit got {given[0]}= with data=/chunk_size=/client=/method='online': streamed "
            f"fits do not take {given[0]} yet; fit in memory (omit data=) to use it."
        )
    if prepared is not None and fixed is not None:
        raise ValueError(
            "fit got fixed= with prepared=: fixed values change the model that is "
            "compiled; omit prepared (fit compiles the model with them held)."
        )


def _fixed_values(fixed: Mapping) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=float) for name, value in fixed.items()}


def _choose(prepared: PreparedEM, runs: list[EMRun]) -> tuple[EMRun, dict]:
    """Best restart and its diagnostics; collapsed restarts are never chosen."""
    functions = prepared.functions
    best_index, diagnostics = select_run(
        [r.state.objective for r in runs],
        [joint(functions, r.state.u) for r in runs],
        [r.state.log_resp for r in runs],
        functions.observed_columns(),
        ", ".join(repr(name) for name in functions.spec.observed),
    )
    return runs[best_index], diagnostics


def _starts(prepared: PreparedEM, start, n_init: int, random_seed):
    """Yield ``n_init`` starting points: deterministic (or the user's) first, then random."""
    functions, config = prepared
    rng = np.random.default_rng(random_seed)
    for r in range(n_init):
        u = default_start(functions, config, None if r == 0 else rng)
        if start is not None and r == 0:
            u = apply_start(functions, start, u)
        yield u


def fit(
    model: pm.Model | None = None,
    *,
    latent: str | None = None,
    start: Mapping | None = None,
    mode: str | None = None,
    mstep: str | None = None,
    max_iter: int = 1000,
    tol: float = 1e-8,
    gap_tol: float = GAP_TOL,
    exact_mstep: bool = False,
    n_init: int = 1,
    random_seed: int | np.random.Generator | None = None,
    progressbar: bool = True,
    prepared: PreparedEM | None = None,
    reg_covar: float = 0.0,
    accelerate: str | None = "auto",
    data: Mapping | Iterable[Mapping] | None = None,
    chunk_size: int | None = None,
    client: Any = None,
    method: str = "batch",
    batch_size: int | None = None,
    online_kwargs: Mapping | None = None,
    weights: Any = None,
    labels: Any = None,
    fixed: Mapping | None = None,
) -> EMResult | StreamedEMResult:
    """Fit the mixture in ``model`` by EM; usable as ``with model: ppl_em.fit()``.

    ``mode="map"`` (the default) maximises the marginal log posterior without Jacobian
    terms (the point ``pm.find_MAP`` finds on the marginalised model); ``"mle"`` drops
    the priors. ``mstep="auto"`` (the default) uses closed-form updates where the graph
    allows and L-BFGS on Q elsewhere; ``"closed"`` insists on closed form; ``"numeric"``
    never uses it. ``exact_mstep=True`` maximises Q in every numeric M-step (textbook EM
    iterates); by default it stops once Q's gradient has shrunk tenfold (a generalised
    EM step: the same fixed point, reached faster).
    EM stops when the objective changes by less than ``tol`` times itself and its
    estimated remaining gain is below ``gap_tol`` nats (5e-7: every parameter within
    about 1e-3 standard errors of the optimum; ``ppl_em.em.convergence``).
    ``start`` gives values by free-variable name in the constrained space. With
    ``n_init > 1`` the other starts are k-means++ partitions drawn with ``random_seed``
    and the best objective wins. ``prepared`` (from :func:`ppl_em.prepare`) skips
    compilation; its ``mode``/``mstep`` then apply and the ``latent``/``mode``/``mstep``
    arguments are not used.
    ``reg_covar`` (>= 0) is added to each closed-form Normal component variance, as in
    scikit-learn, against collapse. ``result.diagnostics`` reports empty, identical and
    collapsed components (docs/failure-modes.md); collapsed restarts are never chosen.
    ``accelerate="auto"`` takes EM steps and, where EM's measured rate predicts a long
    crawl (hundreds of iterations: a logistic-regression mixture), runs L-BFGS on the
    marginal objective from EM's point before EM resumes (``ppl_em.em.marginal``);
    ``None`` takes EM steps only; ``"squarem"`` extrapolates EM steps (SQUAREM) to need
    fewer E-steps.

    Data beyond memory (README, "Big data"): ``data={name: array, ...}`` holds every
    per-observation array (observed values and covariates, ``result.data_spec.names``)
    as numpy arrays or memmaps, zarr arrays or dask arrays of any common length N; the
    model is declared with a sample (or ``pm.Data``) of the same trailing shapes.
    ``method="batch"`` (exact EM) streams it in chunks of ``chunk_size`` rows (default:
    about 64 MB of working set each), or with ``client`` (a ``dask.distributed.Client``)
    maps every E-step over partitions persisted on the workers. ``method="online"``
    runs online EM (Cappé & Moulines) over one pass of ``data``, a dict of arrays or an
    iterator of such dicts, in batches of ``batch_size`` rows; ``online_kwargs`` sets
    ``kappa``, ``t0``, ``average``, ``burn_in``, ``min_obs``, ``warm_start``
    (:class:`ppl_em.em.online.OnlineOptions`). The result is a
    :class:`~ppl_em.bigdata.StreamedEMResult`: ``n_obs`` is N, and responsibilities
    are computed for any data by ``result.predict_proba(data={...})``.

    ``weights`` (one per observation, >= 0) counts observation i ``weights[i]`` times:
    integer weights fit exactly like repeated rows, and BIC/ICL use ``sum(weights)`` as
    N. ``labels`` (one per observation, -1 or masked where unknown) fixes the known
    observations' components (semi-supervised EM). ``fixed={name: value}`` holds free
    variables at given values (``pm.do``) and fits the rest; ``result.fixed`` has them.
    """
    unchecked = ("start", "data", "client", "weights", "labels", "fixed")
    _check_fit_args({k: v for k, v in locals().items() if k not in unchecked})
    t0 = time.perf_counter()
    big = any(v is not None for v in (data, chunk_size, client, batch_size, online_kwargs))
    _check_observation_args(big or method != "batch", prepared, weights, labels, fixed)
    if prepared is None:
        model = model if fixed is None else fix_parameters(pm.modelcontext(model), fixed)
        prepared = prepare(model, latent=latent, mode=mode or "map", mstep=mstep or "auto",
                           backend=backend_for(data) if big else "auto")  # fmt: skip
    prepared = apply_reg_covar(prepared, reg_covar)
    prepared = prepared._replace(
        functions=prepared.functions.restarted(), config=restarted(prepared.config)
    )
    if weights is not None or labels is not None:
        observed = with_observations(prepared.functions, weights, labels)
        prepared = prepared._replace(functions=observed)
    functions, config = prepared
    if exact_mstep:
        config = config._replace(grad_reduction=0.0)
    options = dict(
        max_iter=max_iter, tol=tol, gap_tol=gap_tol, progressbar=progressbar, accelerate=accelerate
    )
    if big or method != "batch":
        return fit_data(prepared._replace(config=config), data, options, start=start,
                        n_init=n_init, random_seed=random_seed, chunk_size=chunk_size,
                        client=client, method=method, batch_size=batch_size,
                        online_kwargs=online_kwargs)  # fmt: skip
    starts = list(_starts(prepared, start, n_init, random_seed))
    check_support(functions, starts[0])
    data = em_data(functions, config)
    runs = [run_em(functions, config, u, data=data, **options) for u in starts]
    best, diagnostics = _choose(prepared, runs)
    result = _result(prepared, best, diagnostics, runs, time.perf_counter() - t0)
    return result if fixed is None else dataclasses.replace(result, fixed=_fixed_values(fixed))


def _result(
    prepared: PreparedEM, best: EMRun, diagnostics: dict, runs: list[EMRun], elapsed: float
) -> EMResult:
    functions = prepared.functions
    state = best.state
    values = functions.constrain(state.u)
    return EMResult(
        params=dict(zip(functions.layout.rv_names, map(np.asarray, values), strict=True)),
        log_posterior=state.loglik + log_prior(functions, state),
        loglik=state.loglik,
        history=best.history,
        n_iter=best.n_iter,
        converged=best.converged,
        monotone=best.monotone,
        log_resp=state.log_resp,
        elapsed=elapsed,
        mode=functions.mode,
        label_name=functions.graph.label_name,
        unconstrained=state.u,
        prepared=prepared,
        objectives_per_init=tuple(r.state.objective for r in runs),
        diagnostics=diagnostics,
    )
