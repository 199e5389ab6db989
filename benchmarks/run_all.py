"""Run every benchmark and write the Markdown tables and plots into reports/benchmarks/.

Run: ``make bench`` or ``python -m benchmarks.run_all [--quick]`` from the repository root.
Each comparison (ppl_em and its reference) runs side by side in one process; the tables
report ratios measured in the same run.
"""

from __future__ import annotations

import sys
import time

from benchmarks import (
    bench_bigdata,
    bench_compile,
    bench_gradients,
    bench_pymc,
    bench_regression,
    bench_sklearn,
    bench_starts,
    bench_startup,
    bench_stderr,
    bench_workflow,
)
from benchmarks._common import REPORTS


def main() -> None:
    quick = "--quick" in sys.argv
    modules = (bench_startup, bench_sklearn, bench_pymc, bench_regression, bench_starts,
               bench_stderr, bench_bigdata, bench_gradients, bench_compile,
               bench_workflow)  # fmt: skip
    for module in modules:
        t0 = time.perf_counter()
        print(f"== {module.__name__}", flush=True)
        print(module.main(quick=quick), flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"reports written to {REPORTS}")


if __name__ == "__main__":
    main()
