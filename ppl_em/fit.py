"""The public entry point: ``ppl_em.fit`` and the once-per-model preparation."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pymc as pm

from ppl_em.compile import EMFunctions, build_em_functions
from ppl_em.diagnostics import select_run
from ppl_em.em import EMRun, run_em
from ppl_em.graph import analyse_model
from ppl_em.init import apply_start, default_start
from ppl_em.mstep import MStepConfig, make_mstep_config
from ppl_em.recognise import build_plan
from ppl_em.result import EMResult
from ppl_em.validate import apply_reg_covar, check_fit_args, check_support, observed_columns


class PreparedEM(NamedTuple):
    """Compiled functions and M-step plan of one model; reusable across fits."""

    functions: EMFunctions
    config: MStepConfig


def prepare(
    model: pm.Model | None = None,
    *,
    latent: str | None = None,
    mode: str = "map",
    mstep: str = "auto",
    backend: str = "auto",
) -> PreparedEM:
    """Analyse and compile ``model`` once; pass the result to :func:`fit` as ``prepared``.

    ``backend`` (``"auto"``, ``"c"``, ``"numba"``, ``"python"``) picks how PyTensor runs
    the compiled functions; ``"auto"`` avoids C compilation for small closed-form
    problems (a fast cold start), ``"c"`` is fastest per iteration once its cache is warm.
    """
    graph = analyse_model(model, latent)
    plan = build_plan(graph, mode)
    numeric = mstep == "numeric" or bool(plan.reasons)
    functions = build_em_functions(graph, mode, backend=backend, numeric=numeric)
    return PreparedEM(functions, make_mstep_config(functions, mstep, plan=plan))


def _choose(functions: EMFunctions, runs: list[EMRun]) -> tuple[EMRun, dict]:
    """Best restart and its diagnostics; collapsed restarts are never chosen."""
    best_index, diagnostics = select_run(
        [r.state.objective for r in runs],
        [functions.joint(r.state.u, *functions.data) for r in runs],
        [r.state.log_resp for r in runs],
        observed_columns(functions),
        ", ".join(repr(rv.name) for rv in functions.graph.dependents),
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
    mode: str = "map",
    mstep: str = "auto",
    max_iter: int = 1000,
    tol: float = 1e-8,
    n_init: int = 1,
    random_seed: int | np.random.Generator | None = None,
    progressbar: bool = True,
    prepared: PreparedEM | None = None,
    reg_covar: float = 0.0,
    accelerate: str | None = None,
) -> EMResult:
    """Fit the mixture in ``model`` by EM; usable as ``with model: ppl_em.fit()``.

    ``mode="map"`` maximises the marginal log posterior without Jacobian terms (the
    point ``pm.find_MAP`` finds on the marginalised model); ``"mle"`` drops the priors.
    ``mstep="auto"`` uses closed-form updates where the graph allows and L-BFGS on Q
    elsewhere; ``"closed"`` insists on closed form; ``"numeric"`` never uses it.
    ``start`` gives values by free-variable name in the constrained space. With
    ``n_init > 1`` the other starts are k-means++ partitions drawn with ``random_seed``
    and the best objective wins. ``prepared`` (from :func:`prepare`) skips compilation;
    its ``mode``/``mstep`` then apply and the ``latent``/``mode``/``mstep`` arguments
    are not used.
    ``reg_covar`` (>= 0) is added to each closed-form Normal component variance, as in
    scikit-learn, against collapse. ``result.diagnostics`` reports empty, identical and
    collapsed components (docs/failure-modes.md); collapsed restarts are never chosen.
    ``accelerate="squarem"`` extrapolates EM steps (SQUAREM) to need fewer E-steps.
    """
    check_fit_args(**{k: v for k, v in locals().items() if k != "start"})
    t0 = time.perf_counter()
    if prepared is None:
        prepared = prepare(model, latent=latent, mode=mode, mstep=mstep)
    prepared = apply_reg_covar(prepared, reg_covar)
    functions = prepared.functions
    starts = list(_starts(prepared, start, n_init, random_seed))
    check_support(functions, starts[0])
    options = dict(max_iter=max_iter, tol=tol, progressbar=progressbar, accelerate=accelerate)
    runs = [run_em(functions, prepared.config, u, **options) for u in starts]
    best, diagnostics = _choose(functions, runs)
    return _result(functions, best, diagnostics, runs, time.perf_counter() - t0)


def _result(
    functions: EMFunctions, best: EMRun, diagnostics: dict, runs: list[EMRun], elapsed: float
) -> EMResult:
    state = best.state
    values = functions.constrain(state.u)
    return EMResult(
        params=dict(zip(functions.layout.rv_names, map(np.asarray, values), strict=True)),
        log_posterior=state.loglik + state.logprior,
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
        functions=functions,
        objectives_per_init=tuple(r.state.objective for r in runs),
        diagnostics=diagnostics,
    )
