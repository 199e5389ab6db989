"""Time per EM iteration of two checkouts of ppl_em, side by side in one run.

    python -m benchmarks.compare_trees OLD_TREE NEW_TREE [--n 1000000] [--rounds 5]

Each round runs the same fit in a fresh process for each tree in turn (the tree first
on ``PYTHONPATH``), through the public API both share (``prepare``, then ``fit`` with
``prepared=``): 1-D, K=3, flat priors, ``mode="mle"``. The time per iteration is the
difference between fits of ``HI`` and ``LO`` iterations over ``HI - LO``, which removes
the start, the final E-step and the diagnostics. Rounds alternate so that drifts of the
machine hit both trees alike; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

LO, HI = 5, 45

SNIPPET = """
import time, warnings
import numpy as np, pymc as pm, ppl_em
rng = np.random.default_rng(0)
n = {n}
z = rng.choice(3, size=n, p=[0.3, 0.3, 0.4])
x = rng.normal(np.array([-4.0, 0.0, 5.0])[z], np.array([1.0, 0.7, 1.5])[z])
with pm.Model() as model:
    w = pm.Dirichlet("w", a=np.ones(3))
    mu = pm.Flat("mu", shape=3)
    sigma = pm.HalfFlat("sigma", shape=3)
    pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
prepared = ppl_em.prepare(model, mode="mle")
# A poor start, so that EM is still moving after HI iterations.
start = {{"w": [0.3, 0.3, 0.4], "mu": [-1.0, 0.0, 1.0], "sigma": [3.0, 3.0, 3.0]}}
def run(iters):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        res = ppl_em.fit(prepared=prepared, start=start, max_iter=iters, tol=1e-300,
                         progressbar=False)
        return time.perf_counter() - t, res.n_iter
run(2)  # compile and warm up
times = []
for _ in range(3):
    (t_hi, n_hi), (t_lo, n_lo) = run({hi}), run({lo})
    assert n_hi == {hi} and n_lo == {lo}, (n_hi, n_lo)
    times.append((t_hi - t_lo) / (n_hi - n_lo))
print(min(times) * 1e3)
"""


def per_iteration_ms(tree: Path, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = SNIPPET.format(n=n, lo=LO, hi=HI)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--n", type=int, default=10**6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new"):
            times[name].append(per_iteration_ms(getattr(args, name), args.n))
        print(f"round {r}: old {times['old'][-1]:.2f} ms, new {times['new'][-1]:.2f} ms")
    old, new = (statistics.median(times[k]) for k in ("old", "new"))
    print(f"median ms/iter at N={args.n}: old {old:.2f}, new {new:.2f}, new/old {new / old:.3f}")


if __name__ == "__main__":
    main()
