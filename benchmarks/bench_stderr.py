"""Standard errors of every example model: ``method="louis"`` (the default: Louis'
identity on EM's compiled rows, nothing compiled) beside ``method="gradient"`` (central
differences of the PyTensor gradient of the marginal objective, which compiles Q's
gradient to C on first use), in one run.

Each model runs in its own Python process with an empty PyTensor compile directory
(``PYTENSOR_FLAGS=compiledir=<empty tmpdir>``): the default fit first (it compiles what
EM needs: for a numeric M-step that includes Q's gradient), then the first call of each
method ("cold": Louis first, so that nothing it needs was compiled for the other), then
the median of three more calls ("warm"). Accuracy: the largest relative difference of
the two methods' standard errors, and of their observed information matrices in units
of the complete-data information (``|dI_ij| / sqrt(Ic_ii Ic_jj)``), which exists also
where the estimate is not identified (the seed's coin fit: both methods raise).

Run: ``python -m benchmarks.bench_stderr [--large]`` from the repository root;
``--large`` adds a 1-D K=3 mixture at N=10^5 and 10^6 (this process, warm cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
WARM = 3

WORKER = """
import json, sys, time
import numpy as np, ppl_em
from benchmarks.bench_stderr import measure
from models import MODELS
t0 = time.perf_counter()
res = ppl_em.fit(MODELS[sys.argv[1]].build_model(), progressbar=False)
fit = time.perf_counter() - t0
print(json.dumps({"fit": fit, **measure(res)}))
"""


def _timed_se(res, method: str):
    from ppl_em import NotIdentifiedError, standard_errors

    t0 = time.perf_counter()
    try:
        se = standard_errors(res, method)
    except NotIdentifiedError:
        se = None
    return time.perf_counter() - t0, se


def measure(res) -> dict:
    """Cold and warm seconds of both methods on ``res`` and how far apart they are."""
    from ppl_em.inference.stderr import curvature

    out = {"n": res.n_obs, "d": res.n_parameters}
    ses = {}
    for method in ("louis", "gradient"):
        cold, ses[method] = _timed_se(res, method)
        warm = [_timed_se(res, method)[0] for _ in range(WARM)]
        out[method] = {"cold": cold, "warm": float(np.median(warm))}
    louis, gradient = curvature(res, "louis"), curvature(res, "gradient")
    unit = np.outer(louis.scale, louis.scale)
    out["info_diff"] = float(np.max(np.abs(louis.hessian - gradient.hessian) / unit))
    a, b = ses["louis"], ses["gradient"]
    if a is None or b is None:
        out["se_diff"] = "not identified" if a is None and b is None else "one raised"
    else:
        out["se_diff"] = max(float(np.max(np.abs(a[k] / b[k] - 1))) for k in a)
    return out


def _cold(name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as compiledir:
        flags = env.get("PYTENSOR_FLAGS", "")
        env["PYTENSOR_FLAGS"] = ",".join(f for f in (flags, f"compiledir={compiledir}") if f)
        done = subprocess.run(
            [sys.executable, "-c", WORKER, name],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode:
        raise RuntimeError(f"{name}: worker failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(label: str, r: dict) -> list:
    se_diff = r["se_diff"]
    return [
        label,
        r["n"],
        r["d"],
        r.get("fit", float("nan")),
        r["louis"]["cold"],
        r["louis"]["warm"],
        r["gradient"]["cold"],
        r["gradient"]["warm"],
        f"{se_diff:.1e}" if isinstance(se_diff, float) else se_diff,
        f"{r['info_diff']:.1e}",
    ]


def _large_rows() -> list[list]:
    import pymc as pm

    import ppl_em
    from benchmarks._common import START_1D, gaussian_1d

    rows = []
    for n in (10**5, 10**6):
        with pm.Model() as model:
            w = pm.Dirichlet("w", a=np.ones(3))
            mu = pm.Normal("mu", 0.0, 10.0, shape=3)
            sigma = pm.HalfNormal("sigma", 5.0, shape=3)
            pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=gaussian_1d(n))
        t0 = time.perf_counter()
        res = ppl_em.fit(model, start=START_1D, progressbar=False)
        rows.append(_row(f"1-D K=3, N=10^{round(np.log10(n))}", {
            "fit": time.perf_counter() - t0, **measure(res)}))  # fmt: skip
    return rows


HEADER = [
    "model", "N", "params", "fit s (cold)", "louis cold s", "louis warm s",
    "gradient cold s", "gradient warm s", "SE rel. diff", "info diff",
]  # fmt: skip
LARGE_HEADER = [
    "data", "N", "params", "fit s", "louis first s", "louis again s",
    "gradient first s", "gradient again s", "SE rel. diff", "info diff",
]  # fmt: skip


def main(quick: bool = False, large: bool = False) -> str:
    from models import MODELS

    rows = []
    for name in MODELS:
        t0 = time.perf_counter()
        rows.append(_row(name, _cold(name)))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    body = (
        "## Standard errors per example model, fresh process, empty compile cache\n\n"
        + markdown_table(HEADER, rows)
    )
    if large:
        body += "\n\n## Larger N (this process, warm compile cache)\n\n"
        body += markdown_table(LARGE_HEADER, _large_rows())
    write_report("stderr", "Standard errors: Louis' identity beside gradient differences", body)
    return body


if __name__ == "__main__":
    print(main(large="--large" in sys.argv))
