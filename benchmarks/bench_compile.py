"""Compiling on NumPy-backed Ops with and without PyTensor's in-place rewrites.

``ppl_em.compiled.numpy_ops.numpy_mode`` (ppl_em's functions under ``backend="auto"``
until C pays, and ``compare``'s find_MAP and NUTS in ``reference_modes="fast"``)
excludes the in-place rewrites. Measured in one process, for each model the two
rewrite sets one after the other: the compilation of each seed model's marginal log posterior's
gradient (the function find_MAP compiles; the model built afresh each time), its calls
at the model's own N and at N=10^5, and ``prepare`` plus ``fit``. Each time is the
least of ``REPEAT``.

Run: ``python -m benchmarks.bench_compile`` from the repository root.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings

import numpy as np
import pytensor

import ppl_em
from benchmarks._common import markdown_table, write_report
from models import MODELS
from ppl_em.compiled import functions as compiled_functions
from ppl_em.compiled.numpy_ops import numpy_mode
from ppl_em.inference.crosscheck import marginal_model

REPEAT = 3
CALLS = 200
SEED_MODELS = ("coin", "exponential", "gaussian_1d", "poisson_counts", "regression_mixture")


RULES = {"in-place": functools.partial(numpy_mode, inplace=True), "without": numpy_mode}


def _least(fn, repeat: int = REPEAT) -> tuple[float, object]:
    best, value = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def _gradient_times(build, mode) -> tuple[float, float, np.ndarray]:
    """Compile seconds and seconds a call of the marginal logp's gradient, and a value.
    Each compilation is of a model built afresh, as a user's or a test's first one."""
    with pytensor.config.change_flags(mode=mode):
        compile_s, fn = _least(lambda: build().compile_dlogp(jacobian=False))
    point = build().initial_point()
    fn(point)
    call_s, value = _least(lambda: [fn(point) for _ in range(CALLS)][-1])
    return compile_s, call_s / CALLS, value


def _fit_seconds(model, rule) -> tuple[float, float]:
    compiled_functions.numpy_mode = rule
    try:
        return _least(lambda: ppl_em.fit(model, progressbar=False).log_posterior)
    finally:
        compiled_functions.numpy_mode = numpy_mode


def _marginal(mod, data, em):
    return marginal_model(mod.build_model(data), em)


def rows(names, sizes) -> list[list]:
    out = []
    for name in names:
        mod = MODELS[name]
        for n in sizes:
            data = None if n is None else mod.default_data(n=n)
            model = mod.build_model(data)
            em = ppl_em.fit(model, progressbar=False)
            build = functools.partial(_marginal, mod, data, em)
            got = {r: _gradient_times(build, make()) for r, make in RULES.items()}
            a, b = got["in-place"], got["without"]
            np.testing.assert_allclose(a[2], b[2], rtol=1e-12)
            fits = {r: _fit_seconds(model, make) for r, make in RULES.items()} if n is None else {}
            row = [name, em.n_obs, a[0], b[0], a[0] / b[0],
                   a[1] * 1e3, b[1] * 1e3, a[1] / b[1]]  # fmt: skip
            if fits:
                (fa, la), (fb, lb) = fits["in-place"], fits["without"]
                assert la == lb, (name, la, lb)
                row += [fa, fb, fa / fb]
            else:
                row += ["", "", ""]
            out.append(row)
    return out


def main(quick: bool = False) -> str:
    warnings.simplefilter("ignore")
    table = rows(SEED_MODELS[:2] if quick else SEED_MODELS, [None])
    table += rows(["regression_mixture"], [10**4] if quick else [10**5])
    body = markdown_table(
        ["model", "N", "compile s, in-place", "compile s, without", "ratio",
         "call ms, in-place", "call ms, without", "ratio",
         "fit s, in-place", "fit s, without", "ratio"],
        table,
    )  # fmt: skip
    write_report("compile", "NumPy-backed Ops with and without in-place rewrites", body)
    return body


if __name__ == "__main__":
    print(main(quick="--quick" in sys.argv))
