"""The data with the fitted mixture drawn over them, read off the model's own joint logp.

For a 1-D observed variable the curve is ``sum_k exp(log p(x, z=k | theta))`` evaluated
by the compiled EM function ``joint`` on a grid of x values, so every component family
PyMC supports is drawn without a per-distribution formula. That is valid only when each
row's density depends on that row's value alone (no covariates); ``_rows_independent``
checks it by reversing the data and comparing.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from ppl_em.result import EMResult

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def color(k: int) -> str:
    return COLORS[k % len(COLORS)]


def _observed_name(em: EMResult) -> str:
    return next(iter(em.observed))


def _joint_at(em: EMResult, values: np.ndarray) -> np.ndarray:
    """``log p(v, z=k | theta)`` for each v (G x K); the model has no covariates."""
    y = em.observed[_observed_name(em)]
    return em.joint_logp(**{_observed_name(em): np.asarray(values).astype(y.dtype)})


def _rows_independent(em: EMResult) -> bool:
    """Whether each observation's joint row depends on its own value only (so the
    density can be drawn on a grid): no covariates, and reversing the data reverses
    the rows."""
    if em.data_spec.names != em.data_spec.observed:
        return False
    y = em.observed[_observed_name(em)]
    forward = em.joint_logp()
    backward = _joint_at(em, y[::-1])[::-1]
    return bool(np.allclose(forward, backward, rtol=1e-9, atol=1e-9, equal_nan=True))


def _density_1d(ax, em: EMResult, y: np.ndarray) -> str:
    discrete = np.issubdtype(y.dtype, np.integer)
    if discrete:
        grid = np.arange(y.min(), y.max() + 1)
        values, counts = np.unique(y, return_counts=True)
        ax.bar(values, counts / len(y), width=0.8, color="#c7d4e8", label="data (frequency)")
    else:
        span = float(np.ptp(y)) or 1.0
        grid = np.linspace(y.min() - 0.05 * span, y.max() + 0.05 * span, 400)
        ax.hist(y, bins="auto", density=True, color="#c7d4e8", label="data (histogram)")
    comp = np.nan_to_num(np.exp(_joint_at(em, grid)), nan=0.0)
    style = {"marker": "o", "linestyle": ":"} if discrete else {}
    for k in range(comp.shape[1]):
        ax.plot(grid, comp[:, k], color=color(k), lw=1.2, label=f"w·f component {k}", **style)
    ax.plot(grid, comp.sum(axis=1), color="black", lw=2, label="EM mixture", **style)
    ax.set_xlabel(_observed_name(em))
    ax.set_ylabel("probability" if discrete else "density")
    ax.legend(frameon=False, fontsize=8)
    kind = "pmf" if discrete else "density"
    return (
        f"Data with the EM mixture {kind} (black) and each weighted component, evaluated "
        "from the model's own log-density at the EM estimate."
    )


def _stacked_1d(ax, em: EMResult, y: np.ndarray) -> str:
    resp = em.responsibilities
    bins = np.histogram_bin_edges(y, bins="auto")
    ax.hist(
        [y] * resp.shape[1],
        bins=bins,
        weights=list(resp.T),
        stacked=True,
        color=[color(k) for k in range(resp.shape[1])],
        label=[f"component {k}" for k in range(resp.shape[1])],
    )
    ax.set_xlabel(_observed_name(em))
    ax.set_ylabel("count")
    ax.legend(frameon=False, fontsize=8)
    return (
        "Histogram split by EM responsibilities. Each observation's density depends on more "
        "than its own value (covariates), so no single density curve applies; pass the "
        "covariate as data=(x, y) for a regression plot."
    )


def _ellipse(ax, mean, cov, k: int) -> None:
    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1]))
    for n_sd in (1.0, 2.0):
        w, h = 2 * n_sd * np.sqrt(np.maximum(vals[::-1], 0.0))
        ax.add_patch(
            Ellipse(mean, w, h, angle=angle, fill=False, color=color(k), lw=2 / n_sd, alpha=0.9)
        )


def _scatter_2d(ax, em: EMResult, y: np.ndarray) -> str:
    resp = em.responsibilities
    labels = em.predict()
    for k in range(resp.shape[1]):
        pts = y[labels == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color=color(k), alpha=0.5, label=f"component {k}")
        weight = resp[:, k]
        if weight.sum() > 1e-12:
            mean = weight @ y / weight.sum()
            centred = y - mean
            cov = (weight[:, None] * centred).T @ centred / weight.sum()
            _ellipse(ax, mean, cov, k)
            ax.plot(*mean, marker="x", color="black", ms=9)
    name = _observed_name(em)
    ax.set_xlabel(f"{name}[:, 0]")
    ax.set_ylabel(f"{name}[:, 1]")
    ax.legend(frameon=False, fontsize=8)
    return (
        "Points coloured by their most probable EM component; ellipses at 1 and 2 standard "
        "deviations of each component's responsibility-weighted mean and covariance "
        "(for a Gaussian mixture fitted by maximum likelihood these are its parameters)."
    )


def _regression(ax, em: EMResult, x: np.ndarray, y: np.ndarray) -> str:
    resp = em.responsibilities
    labels = em.predict()
    design = np.column_stack([np.ones_like(x), x])
    grid = np.linspace(x.min(), x.max(), 50)
    for k in range(resp.shape[1]):
        ax.scatter(x[labels == k], y[labels == k], s=8, color=color(k), alpha=0.5)
        sw = np.sqrt(resp[:, k])
        coef, *_ = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)
        ax.plot(grid, coef[0] + coef[1] * grid, color=color(k), lw=2, label=f"component {k}")
    ax.set_xlabel("x (covariate)")
    ax.set_ylabel(_observed_name(em))
    ax.legend(frameon=False, fontsize=8)
    return (
        "Response against covariate, points coloured by their most probable EM component; "
        "each line is that component's responsibility-weighted least-squares fit."
    )


def data_figure(em: EMResult, data=None) -> tuple[Figure | None, str]:
    """The data with the fitted mixture, and a caption saying what is drawn (or why not)."""
    observed = em.observed
    if len(observed) != 1:
        return None, (
            f"The model has {len(observed)} observed arrays {list(observed)}; the data "
            "plot covers single-observed models."
        )
    y = np.asarray(observed[_observed_name(em)])
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    is_pair = isinstance(data, tuple | list) and len(data) == 2
    if is_pair and np.shape(data[0]) == y.shape and y.ndim == 1:
        caption = _regression(ax, em, np.asarray(data[0], dtype=float), y)
    elif y.ndim == 2 and y.shape[1] == 2:
        caption = _scatter_2d(ax, em, y)
    elif y.ndim == 1 and _rows_independent(em):
        caption = _density_1d(ax, em, y)
    elif y.ndim == 1:
        caption = _stacked_1d(ax, em, y)
    else:
        return None, f"Observed data of shape {y.shape}: no plot for more than 2 dimensions."
    ax.set_title("Data and fitted mixture")
    return fig, caption
