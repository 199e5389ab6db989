"""Figures comparing EM with NUTS: objective trace, MCMC diagnostics, posteriors, intervals."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pandas as pd
from matplotlib import MatplotlibDeprecationWarning
from matplotlib.figure import Figure

from ppl_em.compiled.layout import element_names
from ppl_em.report.data_plots import color
from ppl_em.result import EMResult

# EM +- Z94 * SE is the normal-approximation interval with the HDI's 94% mass.
Z94 = 1.880794


def scalar_entries(params: dict[str, np.ndarray]) -> list[tuple[str, str, tuple]]:
    """``(variable, "name[i, j]", index)`` for every scalar inside each parameter array."""
    out = []
    for name, value in params.items():
        shape = np.shape(value)
        labels = element_names(name, shape)
        out += [(name, label, idx) for label, idx in zip(labels, np.ndindex(shape), strict=True)]
    return out


def objective_figure(em: EMResult) -> Figure:
    history = np.asarray(em.history, dtype=float)
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(np.arange(len(history)), history, marker="o", ms=3, color=color(0))
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("log posterior" if em.mode == "map" else "log-likelihood")
    ax1.set_title("EM objective")
    gap = history[-1] - history[:-1]
    positive = gap > 0
    if positive.any():
        ax2.semilogy(np.arange(len(gap))[positive], gap[positive], marker="o", ms=3)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("final − current")
    ax2.set_title("Distance to the final objective (log scale)")
    return fig


def _figure_of(axes) -> Figure:
    return np.ravel(axes)[0].figure


def trace_figure(idata: az.InferenceData, var_names: list[str]) -> Figure:
    with warnings.catch_warnings():
        # ArviZ 0.23 calls a matplotlib 3.11-deprecated helper; not ours to fix.
        warnings.simplefilter("ignore", MatplotlibDeprecationWarning)
        axes = az.plot_trace(idata, var_names=var_names, compact=True, show=False)
    fig = _figure_of(axes)
    fig.set_layout_engine("constrained")
    return fig


def rank_figure(idata: az.InferenceData, var_names: list[str]) -> Figure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MatplotlibDeprecationWarning)
        axes = az.plot_rank(idata, var_names=var_names, show=False)
    fig = _figure_of(axes)
    fig.set_layout_engine("constrained")
    return fig


def posterior_figure(comparison, var_names: list[str]) -> Figure:
    """A histogram of the NUTS draws per scalar, with EM and both MAPs marked."""
    posterior = comparison.idata.posterior
    entries = [e for e in scalar_entries(comparison.em.params) if e[0] in var_names]
    ncols = min(4, len(entries))
    nrows = int(np.ceil(len(entries) / ncols))
    fig = Figure(figsize=(3.2 * ncols, 2.5 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (name, label, idx) in zip(axes, entries, strict=False):
        draws = np.asarray(posterior[name].values)[(slice(None), slice(None), *idx)].ravel()
        ax.hist(draws, bins=40, density=True, color="#c7d4e8")
        ax.axvline(comparison.em.params[name][idx], color="black", lw=2, label="EM")
        ax.axvline(
            comparison.map_from_em[name][idx], color=color(1), ls="--", label="MAP (EM start)"
        )
        _mark_default_map(ax, draws, float(comparison.map_default[name][idx]))
        ax.set_title(label, fontsize=10)
        ax.set_yticks([])
    for ax in axes[len(entries) :]:
        ax.set_visible(False)
    axes[0].legend(frameon=False, fontsize=7)
    return fig


def _mark_default_map(ax, draws: np.ndarray, value: float) -> None:
    """Dotted line at the default-start MAP, or a note when it lies far outside the draws.

    A MAP at another mode would stretch the axis and flatten the histogram.
    """
    lo, hi = np.quantile(draws, [0.0, 1.0])
    pad = 0.5 * (hi - lo) + 1e-12
    if lo - pad <= value <= hi + pad:
        ax.axvline(value, color=color(2), ls=":", label="MAP (default)")
    else:
        side = "left" if value < lo else "right"
        text = f"← default MAP {value:.3g}" if side == "left" else f"default MAP {value:.3g} →"
        ax.text(
            0.02 if side == "left" else 0.98,
            0.92,
            text,
            transform=ax.transAxes,
            ha=side,
            fontsize=7,
            color=color(2),
        )
        ax.plot([], [], color=color(2), ls=":", label="MAP (default)")


def forest_figure(table: pd.DataFrame) -> Figure:
    """EM +- 1.88 SE (94% normal interval) above the NUTS 94% HDI, one panel per scalar.

    Each scalar gets its own x-axis: weights, means and scales differ by orders of
    magnitude and a shared axis would shrink the small ones to dots.
    """
    n = len(table)
    fig = Figure(figsize=(8, 0.62 * n + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)).ravel()
    for ax, (label, row) in zip(axes, table.iterrows(), strict=True):
        em, se = float(row["em"]), float(row["em_se"])
        ax.hlines(0, row["hdi_3%"], row["hdi_97%"], color=color(0), lw=4, label="NUTS 94% HDI")
        ax.plot(row["post_mean"], 0, "o", color=color(0), ms=5, label="NUTS mean")
        if np.isfinite(se):
            ax.hlines(1, em - Z94 * se, em + Z94 * se, color="black", lw=4, label="EM ± 1.88 SE")
        ax.plot(em, 1, "s", color="black", ms=5, label="EM")
        ax.set_ylim(-0.8, 1.8)
        ax.set_yticks([])
        ax.set_ylabel(str(label), rotation=0, ha="right", va="center")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].legend(frameon=False, fontsize=7, ncols=4, loc="lower left", bbox_to_anchor=(0, 1))
    return fig


def responsibility_figure(em: EMResult, nuts: np.ndarray) -> Figure:
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    resp = em.responsibilities
    for k in range(resp.shape[1]):
        ax.scatter(resp[:, k], nuts[:, k], s=10, alpha=0.5, color=color(k), label=f"k = {k}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlabel("EM responsibility  p(z=k | x, θ̂)")
    ax.set_ylabel("NUTS posterior mean  p(z=k | x)")
    ax.set_title("Memberships: EM against NUTS")
    ax.legend(frameon=False, fontsize=8)
    return fig
