"""Start-up cost: first fit of a seed model in a fresh process, cold and warm compile cache,
and refitting new data of the same shape; plus peak memory at N=10^7.

Each measurement runs in its own Python process (``subprocess``) so that imports,
compilation and peak memory are those of a user's first call. "Cold" gives PyTensor an
empty compile directory; "warm" reuses it.

Run: ``python -m benchmarks.bench_startup`` from the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]

FIRST_FIT = """
import json, time
t0 = time.perf_counter()
import numpy as np, ppl_em
from models import {name} as m
t1 = time.perf_counter()
model = m.build_model()
t2 = time.perf_counter()
res = ppl_em.fit(model, progressbar=False)
t3 = time.perf_counter()
prepared = ppl_em.prepare(m.build_model())
t4 = time.perf_counter()
new = np.random.default_rng(1).permutation(m.default_data())
again = ppl_em.with_data(prepared, **{{prepared.functions.data_names[0]: new}})
t5 = time.perf_counter()
ppl_em.fit(prepared=again, progressbar=False)
t6 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "fit": t3 - t2, "prepare_again": t4 - t3,
                  "refit_new_data": t6 - t4, "n_iter": res.n_iter}}))
"""

MEMORY = """
import json, resource, time
import numpy as np, pymc as pm, ppl_em
from benchmarks._common import gaussian_1d, START_1D
x = gaussian_1d({n})
with pm.Model() as model:
    w = pm.Dirichlet("w", a=np.ones(3))
    mu = pm.Flat("mu", shape=3)
    sigma = pm.HalfFlat("sigma", shape=3)
    pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = ppl_em.fit(model, mode="mle", start=START_1D, progressbar=False, max_iter={iters})
print(json.dumps({{"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "before_fit_gb": base / 2**20, "seconds": time.perf_counter() - t0,
                  "n_iter": res.n_iter}}))
"""


def _run(code: str, compiledir: str) -> dict:
    env = dict(os.environ)
    env["PYTENSOR_FLAGS"] = f"compiledir={compiledir},blas__ldflags="
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def startup_rows() -> list[list]:
    rows = []
    for name in ("coin", "exponential"):
        with tempfile.TemporaryDirectory() as cold:
            for cache in ("cold", "warm"):
                r = _run(FIRST_FIT.format(name=name), cold)
                rows.append(
                    [name, cache, r["import"], r["fit"], r["prepare_again"], r["refit_new_data"]]
                )
    return rows


def memory_rows(ns: list[int], compiledir: str) -> list[list]:
    rows = []
    for n in ns:
        r = _run(MEMORY.format(n=n, iters=1000), compiledir)
        rows.append([n, r["before_fit_gb"], r["peak_gb"], r["seconds"], r["n_iter"]])
    return rows


def main(quick: bool = False) -> str:
    start = startup_rows()
    body = "## First fit of a seed model in a fresh process\n\n" + markdown_table(
        ["model", "compile cache", "import s", "first fit s", "prepare again s",
         "with_data + fit s"],
        start,
    )  # fmt: skip
    flags = dict(
        f.split("=", 1) for f in os.environ.get("PYTENSOR_FLAGS", "").split(",") if "=" in f
    )
    compiledir = flags.get("compiledir", str(Path.home() / ".pytensor"))
    mem = memory_rows([10**6] if quick else [10**6, 10**7], compiledir)
    body += "\n\n## Peak memory, 1-D K=3 fit to convergence (`ppl_em.fit`, mode='mle')\n\n"
    body += markdown_table(["N", "RSS before fit GB", "peak RSS GB", "fit s", "iterations"], mem)
    write_report("startup", "Start-up time and memory", body)
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
