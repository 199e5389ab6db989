"""Shared helpers of the benchmark scripts: data, timing, Markdown and plots."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPORTS = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"
TRUE_W, TRUE_MU, TRUE_SD = (
    np.array([0.3, 0.3, 0.4]),
    np.array([-4.0, 0.0, 5.0]),
    np.array([1.0, 0.7, 1.5]),
)
# Shared by both sides of every comparison; deliberately not the truth.
START_1D = {"w": [0.2, 0.4, 0.4], "mu": [-3.0, 1.0, 3.0], "sigma": [2.0, 2.0, 2.0]}


def gaussian_1d(n: int, k: int = 3, seed: int = 0) -> np.ndarray:
    """``n`` draws from a ``k``-component 1-D mixture (the first three as TRUE_*)."""
    rng = np.random.default_rng(seed)
    mu = np.concatenate([TRUE_MU, 10.0 + 4.0 * np.arange(max(k - 3, 0))])[:k]
    sd = np.concatenate([TRUE_SD, np.ones(max(k - 3, 0))])[:k]
    z = rng.integers(0, k, size=n) if k != 3 else rng.choice(3, size=n, p=TRUE_W)
    return rng.normal(mu[z], sd[z])


def timed(fn: Callable, repeat: int = 1) -> tuple[float, object]:
    """Median wall time of ``repeat`` calls, and the last call's value."""
    times, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), value


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.6g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at start, Python {platform.python_version()}"
    )


def write_report(name: str, title: str, body: str) -> Path:
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}.md"
    path.write_text(f"# {title}\n\n{machine()}\n\n{body}\n")
    return path


def plot_lines(name: str, x: list, series: dict[str, list], xlabel: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.loglog(x, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def objective_at(prepared, point: dict) -> float:
    """ppl_em's objective (log-likelihood plus log prior) at a point of constrained
    values by variable name, such as the one ``pm.find_MAP`` returns."""
    from ppl_em.em import apply_start, em_init, log_prior

    f = prepared.functions
    u = apply_start(f, {k: point[k] for k in f.layout.rv_names}, np.zeros(f.layout.size))
    state = em_init(f, u)
    return float(state.loglik + log_prior(f, state))
