"""Cross-check an EM fit against ``pm.find_MAP`` and NUTS on the marginalised model.

EM (``mode="map"``) maximises the marginal log posterior without Jacobian terms, the
objective ``pm.find_MAP`` maximises on the model with the label summed out
(``pymc_extras.marginalize``; a ``pm.Mixture`` model is already marginal). So find_MAP
started at the EM estimate must stay there, and on a well-identified model the EM
estimate should lie inside NUTS' highest-density intervals, with EM standard errors
close to the posterior standard deviations when N is large. NUTS draws are relabelled
to EM's component order (``ppl_em.relabel``) before anything is summarised.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import arviz as az
import numpy as np
import pandas as pd
import pymc as pm
from pymc_extras import marginalize, recover_marginals

from ppl_em.compiled.layout import element_names
from ppl_em.errors import NotIdentifiedError
from ppl_em.fit import fit
from ppl_em.inference.reference_modes import (
    chain_processes,
    check_modes,
    compiled_once,
    numpy_mode,
    sample_nuts,
)
from ppl_em.inference.relabel import (
    component_params,
    match,
    permute,
    permute_last_axis,
    relabel_draws,
)
from ppl_em.inference.stderr import standard_errors
from ppl_em.model.missing import imputed_names
from ppl_em.observations import fix_parameters
from ppl_em.result import EMResult

TABLE_COLUMNS = ("em", "em_se", "find_map", "post_mean", "post_sd", "hdi_3%", "hdi_97%",
                 "em_in_hdi", "z_score", "r_hat", "ess_bulk")  # fmt: skip
# find_MAP's L-BFGS-B stops at a relative change of ~1e-9 of the objective: two optima
# whose log posteriors differ by less than this are the same mode.
SAME_MODE_ATOL = 1e-3


@dataclass(frozen=True)
class Comparison:
    """EM next to find_MAP (two starts) and NUTS for one model; see :func:`compare`."""

    model_name: str
    em: EMResult
    se: dict[str, np.ndarray]
    map_from_em: dict[str, np.ndarray]
    logp_map_from_em: float
    map_default: dict[str, np.ndarray]
    logp_map_default: float
    map_default_note: str
    idata: az.InferenceData
    table: pd.DataFrame
    timings: dict[str, float]
    diagnostics: dict[str, object]

    def label_posteriors(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(EM responsibilities, NUTS posterior p(z_i = k | x))``, both N x K in EM's order."""
        return label_posteriors(self)

    def to_json(self) -> dict:
        """Every number as plain JSON types (non-finite numbers become None); no idata."""
        table = {
            row: {col: _plain(val) for col, val in values.items()}
            for row, values in self.table.to_dict(orient="index").items()
        }
        return {
            "model_name": self.model_name,
            "em": {
                "params": _plain(self.em.params),
                "log_posterior": _plain(self.em.log_posterior),
                "loglik": _plain(self.em.loglik),
                "n_iter": int(self.em.n_iter),
                "converged": bool(self.em.converged),
                "monotone": bool(self.em.monotone),
                "history": _plain(self.em.history),
            },
            "se": _plain(self.se),
            "map_from_em": _plain(self.map_from_em),
            "logp_map_from_em": _plain(self.logp_map_from_em),
            "map_default": _plain(self.map_default),
            "logp_map_default": _plain(self.logp_map_default),
            "map_default_note": self.map_default_note,
            "table": table,
            "timings": _plain(self.timings),
            "diagnostics": _plain(self.diagnostics),
        }


def _plain(value):
    """Convert numpy containers and scalars to lists, floats, ints, bools, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value


def marginal_model(model: pm.Model, em: EMResult) -> pm.Model:
    """The model with the label summed out (a ``pm.Mixture`` model is returned as is)."""
    if em.kind == "mixture":
        return model
    return marginalize(model, [em.label_name])


def _find_map(model: pm.Model, names, start: dict | None) -> tuple[dict, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        point = pm.find_MAP(start=start, model=model, progressbar=False)
    logp = model.compile_logp(jacobian=False)
    value = float(logp({v.name: point[v.name] for v in model.value_vars}))
    return {n: np.asarray(point[n]) for n in names}, value


def _find_maps(marg: pm.Model, em: EMResult, notes: list):
    """find_MAP from the EM estimate and from PyMC's default start, and what to say."""
    names = list(em.params)
    with compiled_once(marg):
        map_em, logp_em = _find_map(marg, names, dict(em.params))
        map_def, logp_def = _find_map(marg, names, None)
    if abs(logp_em - em.log_posterior) > 1e-5 * max(1.0, abs(em.log_posterior)):
        notes.append(
            f"find_MAP from the EM estimate moved: log posterior {logp_em:.8g} vs EM "
            f"{em.log_posterior:.8g}; EM had not reached the mode"
        )
    note = default_start_note(em, map_def, logp_def, logp_em)
    return map_em, logp_em, map_def, logp_def, note


def default_start_note(em: EMResult, map_default: dict, logp_default: float, logp_em: float):
    """Say whether find_MAP from PyMC's default start reached EM's mode, and if not, where."""
    k = em.n_components
    names = component_params(em.params, k)
    spread = max(float(np.ptp(np.asarray(map_default[n]), axis=0).max()) for n in names)
    scale = max(float(np.abs(np.asarray(map_default[n])).max()) for n in names)
    diff = logp_default - logp_em
    if spread <= 1e-4 * max(1.0, scale):
        if abs(diff) <= SAME_MODE_ATOL:
            return "symmetric saddle: components equal, the same log posterior as EM's estimate"
        return f"symmetric saddle: components equal (log posterior lower by {-diff:.4g})"
    perm = match(map_default, em.params, k)
    aligned = permute(map_default, perm)
    close = all(np.allclose(aligned[n], em.params[n], rtol=1e-3, atol=1e-3) for n in em.params)
    if abs(diff) <= SAME_MODE_ATOL and close:
        return "same mode as EM"
    if diff < 0:
        return f"another mode (lower by {-diff:.4g})"
    return f"another mode (higher by {diff:.4g}: EM stopped at a local mode)"


def _run_nuts(marg, em: EMResult, se: dict, nuts_init: str, notes: list, sample_kwargs: dict):
    """NUTS on the marginal model, label posterior, relabelling to EM's order."""
    if nuts_init not in ("em", "default"):
        raise ValueError(f"nuts_init={nuts_init!r} must be 'em' or 'default'.")
    # Chains start at the EM estimate (jittered by PyMC): from PyMC's default start, where
    # all components are equal, NUTS can spend minutes leaving the saddle.
    initvals = dict(em.params) if nuts_init == "em" else None
    idata = sample_nuts(notes, model=marg, initvals=initvals, **sample_kwargs)
    lp = _nuts_label_lp(idata, marg, em)
    return idata, _relabel_idata(idata, em, se, lp)


def _nuts_label_lp(idata, marg: pm.Model, em: EMResult) -> np.ndarray:
    """Per-draw log p(z_i = k | x, theta) in the draw's own labelling, (C, D, N, K)."""
    label = em.label_name
    if em.kind == "label":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = recover_marginals(
                idata, model=marg, var_names=[label], return_samples=False,
                extend_inferencedata=False,
            )  # fmt: skip
        return np.asarray(out[f"lp_{label}"])
    post = idata.posterior
    c_n, d_n = post.sizes["chain"], post.sizes["draw"]
    lp = np.empty((c_n, d_n, em.n_obs, em.n_components))
    for c in range(c_n):
        for d in range(d_n):
            lp[c, d] = em.log_resp_at({n: np.asarray(post[n][c, d]) for n in em.params})
    return lp


def _relabel_idata(idata, em: EMResult, se: dict, lp: np.ndarray):
    """Relabel posterior draws in place and add ``lp_<label>`` in EM's order."""
    post = idata.posterior
    names = list(em.params)
    draws = {n: np.asarray(post[n]) for n in names}
    relabelled, info = relabel_draws(draws, em.params, em.n_components, se)
    for n in names:
        post[n].values = relabelled[n]
    lp_name = f"lp_{em.label_name}"
    dims = ("chain", "draw", f"{em.label_name}_dim_0", f"{lp_name}_dim")
    idata.posterior[lp_name] = (dims, permute_last_axis(lp, info.perms))
    return info


def label_posteriors(comparison: Comparison) -> tuple[np.ndarray, np.ndarray | None]:
    """EM's responsibilities and NUTS' posterior label probabilities (mean over draws;
    None if the draws do not record ``lp_<label>``)."""
    lp_name = f"lp_{comparison.em.label_name}"
    if lp_name not in comparison.idata.posterior:
        return comparison.em.responsibilities, None
    lp = np.asarray(comparison.idata.posterior[lp_name], dtype=float)
    return comparison.em.responsibilities, np.exp(lp).mean(axis=(0, 1))


def _element_rows(values: dict[str, np.ndarray]) -> dict[str, float]:
    rows = {}
    for name, v in values.items():
        v = np.asarray(v)
        rows.update(zip(element_names(name, v.shape), map(float, v.ravel()), strict=True))
    return rows


def build_table(em: EMResult, se: dict, map_from_em: dict, idata) -> pd.DataFrame:
    """One row per scalar parameter element, EM next to find_MAP and the NUTS summary."""
    summary = az.summary(idata, var_names=list(em.params), hdi_prob=0.94, kind="all")
    table = pd.DataFrame(
        {
            "em": _element_rows(em.params),
            "em_se": _element_rows(se),
            "find_map": _element_rows(map_from_em),
        }
    )
    summary = summary.reindex(table.index)
    table["post_mean"] = summary["mean"]
    table["post_sd"] = summary["sd"]
    table["hdi_3%"] = summary["hdi_3%"]
    table["hdi_97%"] = summary["hdi_97%"]
    table["em_in_hdi"] = (table["em"] >= table["hdi_3%"]) & (table["em"] <= table["hdi_97%"])
    table["z_score"] = (table["em"] - table["post_mean"]) / table["post_sd"]
    table["r_hat"] = summary["r_hat"]
    table["ess_bulk"] = summary["ess_bulk"]
    return table[list(TABLE_COLUMNS)]


def _diagnostics(em: EMResult, idata, table: pd.DataFrame, relabelling, notes: list) -> dict:
    divergences = int(np.asarray(idata.sample_stats["diverging"]).sum())
    max_r_hat = float(table["r_hat"].max())
    min_ess = float(table["ess_bulk"].min())
    notes = list(notes)
    if not em.converged:
        notes.append(f"EM did not converge in {em.n_iter} iterations")
    if divergences:
        notes.append(f"NUTS had {divergences} divergent transitions")
    if max_r_hat > 1.01:
        notes.append(f"max r_hat {max_r_hat:.3f} > 1.01 after relabelling: chains disagree")
    if min_ess < 400:
        notes.append(f"min ess_bulk {min_ess:.0f} < 400: posterior summaries are noisy")
    outside = list(table.index[~table["em_in_hdi"].astype(bool)])
    if outside:
        notes.append(f"EM estimate outside the 94% HDI for {outside}")
    return {
        "divergences": divergences,
        "max_r_hat": max_r_hat,
        "min_ess_bulk": min_ess,
        "label_switching": relabelling.report,
        "chains_disagree_on_labelling": bool(relabelling.chains_disagree),
        "fraction_relabelled": relabelling.fraction_permuted,
        "warnings": notes,
    }


def _refuse_missing(model) -> None:
    imputed = imputed_names(pm.modelcontext(model))
    if imputed:
        raise ValueError(
            f"observed data of {imputed} contain NaN. EM integrates the missing entries out, "
            "but in PyMC's model they are free variables (PyMC imputes them), so find_MAP "
            "would maximise over them too: another objective. Cross-check on the complete "
            "rows, or use ppl_em.fit alone."
        )


def _em_fit(model, latent, em_kwargs) -> EMResult:
    # A tighter tol than fit's default: find_MAP started at the estimate is then expected
    # to move the log posterior by well under 1e-5 (EM converges only linearly).
    kwargs = {"progressbar": False, "tol": 1e-10, **(em_kwargs or {})}
    for name in ("weights", "labels"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"em_kwargs {name}=: find_MAP and NUTS fit the model as written, which has "
                f"no {name}, so EM would be checked against another objective. Cross-check "
                f"without {name}= (ppl_em.fit takes it), or write them into the model."
            )
    if kwargs.get("mode", "map") != "map":
        raise ValueError(
            f"em_kwargs mode={kwargs['mode']!r}: the cross-check compares with find_MAP and "
            "NUTS, which include the priors; use mode='map' (the default)."
        )
    return fit(model, latent=latent, **kwargs)


def _standard_errors(em: EMResult, se_method: str, notes: list) -> dict:
    """SEs, or NaN with a note when the estimate is not identified (e.g. equal components)."""
    try:
        se = standard_errors(em, se_method)
    except NotIdentifiedError as err:
        notes.append(f"no EM standard errors: {err}")
        se = {n: np.full(np.shape(v), np.nan) for n, v in em.params.items()}
    return se


def compare(
    model: pm.Model,
    *,
    model_name: str = "model",
    latent: str | None = None,
    em_kwargs: dict | None = None,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    random_seed: int = 0,
    progressbar: bool = False,
    nuts_sampler: str = "pymc",
    cores: int | None = None,
    se_method: str = "louis",
    nuts_init: str = "em",
    reference_modes: str = "fast",
) -> Comparison:
    """Fit ``model`` by EM and check it against find_MAP (two starts) and NUTS.

    ``em_kwargs`` go to :func:`ppl_em.fit` (``mode`` must stay ``"map"``; parameters it
    holds ``fixed`` are constants for find_MAP and NUTS too; ``weights`` and ``labels``
    are refused, as PyMC's references would fit another objective); ``draws``,
    ``tune``, ``chains``, ``cores`` (default: one process per chain, up to the CPUs) and
    ``nuts_sampler`` ("pymc" or "nutpie", which falls back to PyMC when not installed) go
    to ``pm.sample`` on the marginalised model.
    ``se_method`` ("louis", "gradient" or "exact") goes to :func:`ppl_em.stderr.standard_errors`;
    ``nuts_init`` is "em" (chains start at the jittered EM estimate) or "default".
    ``reference_modes`` "fast" runs find_MAP and NUTS on NumPy-backed Ops (nothing to
    compile; NUTS on numba where the logp has linear algebra), "compiled" compiles
    NUTS in C, "pymc" keeps PyMC's default (C) for both
    (:mod:`ppl_em.inference.reference_modes`).
    """
    _refuse_missing(model)
    check_modes(reference_modes)
    timings = {}
    t0 = time.perf_counter()
    em = _em_fit(model, latent, em_kwargs)
    timings["em"] = time.perf_counter() - t0
    t0, notes = time.perf_counter(), []
    se = _standard_errors(em, se_method, notes)
    timings["stderr"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # find_MAP and NUTS see the parameters EM held fixed as constants too (pm.do).
    marg = marginal_model(fix_parameters(model, em.fixed) if em.fixed else model, em)
    # find_MAP and the label posteriors compile on NumPy-backed Ops unless "pymc".
    with numpy_mode(reference_modes):
        map_em, logp_em, map_def, logp_def, note = _find_maps(marg, em, notes)
        timings["find_map"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sample_kwargs = dict(draws=draws, tune=tune, chains=chains,
                             cores=chain_processes(cores, chains),
                             random_seed=random_seed, progressbar=progressbar,
                             nuts_sampler=nuts_sampler,
                             reference_modes=reference_modes)  # fmt: skip
        idata, relabelling = _run_nuts(marg, em, se, nuts_init, notes, sample_kwargs)
        timings["nuts"] = time.perf_counter() - t0

    table = build_table(em, se, map_em, idata)
    return Comparison(
        model_name=model_name,
        em=em,
        se=se,
        map_from_em=map_em,
        logp_map_from_em=logp_em,
        map_default=map_def,
        logp_map_default=logp_def,
        map_default_note=note,
        idata=idata,
        table=table,
        timings=timings,
        diagnostics=_diagnostics(em, idata, table, relabelling, notes),
    )
