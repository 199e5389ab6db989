"""``write_report``: assemble the page from a :class:`Comparison` and write it atomically."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window or need a display

import numpy as np

from ppl_em.report import fit_plots, html
from ppl_em.report.data_plots import data_figure
from ppl_em.report.files import REPORT_FILES, check_target, replace_dir

__all__ = ["REPORT_FILES", "check_target", "render_html", "write_report"]


def _n_chains(comparison) -> int:
    return int(comparison.idata.posterior.sizes["chain"])


def _summary(comparison) -> str:
    em, diag, table = comparison.em, comparison.diagnostics, comparison.table
    n_in = int(np.sum(table["em_in_hdi"].astype(bool)))
    d_map = comparison.logp_map_from_em - em.log_posterior
    div, r_hat, ess = diag["divergences"], diag["max_r_hat"], diag["min_ess_bulk"]
    min_ess = html.ESS_PER_CHAIN_MIN * _n_chains(comparison)
    healthy = div == 0 and r_hat <= html.R_HAT_MAX and ess >= min_ess
    cards = [
        html.card(
            "EM",
            f"{'converged' if em.converged else 'NOT converged'} in {em.n_iter} iterations",
            f"objective {em.objective:.6g} ({em.mode}); {em.elapsed:.2f} s",
            "ok" if em.converged else "bad",
        ),
        html.card(
            "find_MAP from EM's estimate",
            f"Δ log posterior {d_map:+.2e}",
            "find_MAP's log posterior minus EM's; ≈ 0 means both found the same mode",
            "ok" if abs(d_map) < 1e-3 * max(1.0, abs(em.log_posterior)) else "warn",
        ),
        html.card(
            "EM inside NUTS 94% HDI",
            f"{n_in} of {len(table)} parameters",
            "EM point estimate within the posterior's highest-density interval",
            "ok" if n_in == len(table) else "warn",
        ),
        html.card(
            "NUTS health",
            "healthy" if healthy else "check diagnostics",
            f"{div} divergences, max r_hat {r_hat:.3f}, min bulk ESS {ess:.0f}",
            "ok" if healthy else "bad",
        ),
    ]
    n, k = em.n_obs, em.n_components
    intro = (
        f"<p>{n} observations, K = {k} components, {len(table)} scalar parameters. "
        "EM, PyMC's find_MAP and NUTS on the marginalised model were run on the same model; "
        "every number on this page is also in <code>report.json</code>.</p>"
    )
    return html.section("Summary", intro + f'<div class="cards">{"".join(cards)}</div>', "summary")


def _notes(comparison) -> list[str]:
    notes = [f"find_MAP from PyMC's default start: {comparison.map_default_note}"]
    notes += [str(w) for w in comparison.diagnostics.get("warnings", []) or []]
    switching = comparison.diagnostics.get("label_switching")
    if switching:
        notes.append(f"Label switching: {switching}")
    em_diag = comparison.em.diagnostics
    if "component_counts" in em_diag:
        counts = ", ".join(f"{c:.1f}" for c in np.ravel(em_diag["component_counts"]))
        notes.append(f"EM expected observations per component: {counts}.")
    # Only findings are notes; empty lists and zero counts mean nothing was found.
    skip = {"component_counts", "n_distinct_components"}
    notes += [f"EM finding {k}: {v}" for k, v in em_diag.items() if k not in skip and _found(v)]
    return notes


def _found(value) -> bool:
    return bool(np.size(value)) and bool(np.any(np.asarray(value, dtype=object) != 0))


def _diagnostics_section(comparison) -> str:
    diag, t = comparison.diagnostics, comparison.timings
    pairs = [(f"{k}", v) for k, v in diag.items() if k != "warnings"]
    pairs += [(f"time {k} (s)", float(v)) for k, v in t.items()]
    sizes = comparison.idata.posterior.sizes
    pairs.append(("chains × draws", f"{sizes['chain']} × {sizes['draw']}"))
    names = list(comparison.em.params)
    body = html.key_value_table(pairs, "diagnostics-table") + html.figure_block(
        fit_plots.trace_figure(comparison.idata, names),
        "trace plot",
        "NUTS traces per chain (left: densities, right: draws).",
    )
    body += html.figure_block(
        fit_plots.rank_figure(comparison.idata, names),
        "rank plot",
        "Rank plots: roughly uniform bars in every chain mean the chains mix.",
    )
    return html.section("Sampler diagnostics and timings", body, "diagnostics")


def _sections(comparison, data) -> list[str]:
    em, names = comparison.em, list(comparison.em.params)
    fig, caption = data_figure(em, data)
    out = [_summary(comparison)]
    out.append(html.section("Notes", html.notes_html(_notes(comparison)), "notes"))
    out.append(
        html.section("Data and fitted mixture", html.figure_block(fig, "data", caption), "data")
    )
    table = html.table_html(comparison.table, _n_chains(comparison))
    out.append(html.section("EM, find_MAP and NUTS side by side", table, "table"))
    forest = html.figure_block(
        fit_plots.forest_figure(comparison.table),
        "intervals",
        "Black: EM estimate ± 1.88 standard errors (the normal 94% interval). Blue: NUTS "
        "posterior mean and 94% highest-density interval.",
    )
    out.append(html.section("EM ± SE against the NUTS 94% HDI", forest, "intervals"))
    posterior = html.figure_block(
        fit_plots.posterior_figure(comparison, names),
        "posteriors",
        "NUTS posterior draws (histogram) with EM (black), find_MAP from EM's estimate "
        "(dashed) and find_MAP from PyMC's default start (dotted).",
    )
    out.append(html.section("Posterior densities", posterior, "posteriors"))
    nuts = comparison.label_posteriors()[1]
    if nuts is None:
        resp = "<p>The NUTS run did not record the label posterior (lp_ variable).</p>"
    else:
        gap = float(np.abs(nuts - em.responsibilities).max())
        resp = html.figure_block(
            fit_plots.responsibility_figure(em, nuts),
            "responsibilities",
            f"Each point is one observation and component; on the diagonal EM and NUTS agree. "
            f"Largest absolute difference: {gap:.3f}.",
        )
    out.append(html.section("Responsibilities", resp, "responsibilities"))
    objective = html.figure_block(
        fit_plots.objective_figure(em),
        "objective",
        f"EM objective before the first and after each of {em.n_iter} iterations; EM never "
        "decreases it.",
    )
    out.append(html.section("EM convergence", objective, "objective"))
    out.append(_diagnostics_section(comparison))
    return out


def render_html(comparison, data=None) -> str:
    """The report page as one HTML string."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return html.page(
        f"ppl_em report: {comparison.model_name}",
        f"EM against find_MAP and NUTS · generated {stamp}",
        _sections(comparison, data),
    )


def _json_default(value):
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)


def write_report(comparison, out_dir: str | os.PathLike, *, data=None, force: bool = False) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/report.json``; return ``out_dir``.

    ``data`` is what the plots show; by default the model's observed array, and a pair
    ``(x, y)`` draws a regression. An existing ``out_dir`` is replaced only with
    ``force=True`` and only if everything in it, recursively, is a file a report wrote
    and nobody changed since (``index.html`` ends with a manifest of them); a symlinked
    ``out_dir`` keeps pointing at the directory it names, which is replaced. The files
    are built in a hidden sibling directory and swapped into place in one step, so a
    run killed at any moment leaves the old report or the new one; the next run removes
    what it left behind. ``ppl_em.report.files`` has the details and a test seam.
    """
    check_target(out_dir, force)  # refuse before rendering the figures, not after
    payload = json.dumps(comparison.to_json(), indent=2, default=_json_default)
    files = {"report.json": payload, "index.html": render_html(comparison, data)}
    return replace_dir(out_dir, files, force)
