"""One logp-and-gradient evaluation of each example model's marginalised posterior (the
function PyMC's NUTS calls), compiled four ways side by side in one run: C (PyMC's
default), NumPy-backed Ops as PyTensor gives them (no C, no fusion), those with
variadic products and sums split into two-input ufunc calls (ppl_em's NumPy-backed
mode before its ufunc thunks), and ppl_em's NumPy-backed mode
(:mod:`ppl_em.compiled.numpy_ops`: the split, and each elementwise node a call of its
ufunc alone). Compile times are with whatever C cache the machine has:
this benchmark is about the evaluation, ``bench_workflow.py`` about cold compilation.

Run: ``python -m benchmarks.bench_gradients`` from the repository root.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
from pytensor.compile.mode import Mode
from pytensor.link.vm import VMLinker

import ppl_em
from benchmarks._common import markdown_table, write_report
from models import MODELS
from ppl_em.compiled.numpy_ops import TAG, numpy_mode
from ppl_em.inference.crosscheck import marginal_model

CALLS = 300


def _modes() -> dict:
    plain = Mode(VMLinker(use_cloop=False, c_thunks=False), "fast_run").excluding("fusion")
    split = plain.including(TAG)  # ppl_em's rewrites, PyTensor's thunks
    return {"C": "FAST_RUN", "NumPy Ops, PyTensor's": plain, "split only": split,
            "NumPy Ops, ppl_em's": numpy_mode()}  # fmt: skip


def _time_gradient(marg, mode) -> tuple[float, float]:
    """Seconds to compile, microseconds per call."""
    t0 = time.perf_counter()
    fn = marg.logp_dlogp_function(ravel_inputs=True, mode=mode)
    fn.set_extra_values({})
    compile_s = time.perf_counter() - t0
    start = marg.initial_point()
    x = np.concatenate([np.ravel(start[v.name]) for v in fn._grad_vars])
    fn(x)
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn(x)
    return compile_s, (time.perf_counter() - t0) / CALLS * 1e6


def gradient_rows(names) -> list[list]:
    rows = []
    for name in names:
        model = MODELS[name].build_model()
        em = ppl_em.fit(model, progressbar=False)
        marg = marginal_model(model, em)
        times = {label: _time_gradient(marg, mode) for label, mode in _modes().items()}
        c_us = times["C"][1]
        row = [name, em.n_obs, em.n_components]
        for compile_s, us in times.values():
            row += [compile_s, us, us / c_us]
        rows.append(row)
    return rows


def main(quick: bool = False) -> str:
    warnings.filterwarnings("ignore")
    names = ("coin", "gaussian_1d") if quick else tuple(sorted(MODELS))
    head = ["model", "N", "K"]
    for label in _modes():
        head += [f"{label}: compile s", f"{label}: us/call", f"{label}: / C"]
    body = markdown_table(head, gradient_rows(names))
    write_report("gradients", "NUTS's logp and gradient: C against NumPy-backed Ops", body)
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
