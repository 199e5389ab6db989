"""``compare`` end to end on the seed models, cold and warm, in each of its
``reference_modes``: ``"pymc"`` (PyMC's default compilation of find_MAP and NUTS, C),
``"compiled"`` (find_MAP on NumPy-backed Ops, NUTS in C) and ``"fast"`` (both on
NumPy-backed Ops), side by side in one run.

Each ``compare`` runs in its own Python process (``subprocess``): "cold" gives PyTensor
an empty base compile directory (its C modules and numba cache) and numba an empty
cache, "warm" runs again on them. Both
settings run the same EM and the same PyMC samplers with the same seed; the draws and
tuning are ``make demo``'s (300 + 300, 2 chains, PyMC's default ``cores``: one process
per chain on this 2-core machine).

Run: ``python -m benchmarks.bench_workflow`` from the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
MODES = ("pymc", "compiled", "fast")

COMPARE = """
import json, time, warnings
warnings.filterwarnings("ignore")
import ppl_em
from models import {name} as m
t0 = time.perf_counter()
c = ppl_em.compare(m.build_model(), model_name="{name}", draws=300, tune=300, chains=2,
                   reference_modes="{modes}")
print(json.dumps({{**c.timings, "compare": time.perf_counter() - t0,
                  "logp_map_from_em": c.logp_map_from_em}}))
"""


def _run(code: str, cache: str) -> dict:
    env = dict(os.environ)
    # base_compiledir, not compiledir: PyTensor keeps its numba cache beside the C one
    env["PYTENSOR_FLAGS"] = f"base_compiledir={cache}/pytensor"
    env["NUMBA_CACHE_DIR"] = f"{cache}/numba"
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "process": time.perf_counter() - t0}


def workflow_rows(models: tuple[str, ...]) -> list[list]:
    rows = []
    for name in models:
        timings = {}
        for modes in MODES:
            with tempfile.TemporaryDirectory() as cache:
                for state in ("cold", "warm"):
                    timings[modes, state] = _run(COMPARE.format(name=name, modes=modes), cache)
        for state in ("cold", "warm"):
            base = timings["pymc", state]
            for modes in MODES:
                t = timings[modes, state]
                rows.append([name, state, modes, t["em"], t["stderr"], t["find_map"],
                             t["nuts"], t["compare"], base["compare"] / t["compare"],
                             t["process"], t["logp_map_from_em"]])  # fmt: skip
    return rows


def main(quick: bool = False) -> str:
    models = ("coin",) if quick else ("coin", "exponential", "poisson_counts")
    head = ["model", "cache", "reference_modes", "EM s", "SEs s", "find_MAP s", "NUTS s",
            "compare s", "speed-up vs pymc", "process s", "find_MAP log posterior"]  # fmt: skip
    body = markdown_table(head, workflow_rows(models))
    write_report("workflow", "compare end to end in each reference_modes", body)
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
