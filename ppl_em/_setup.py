"""Process-wide PyTensor configuration, applied before PyTensor is first imported.

Why: a pip-installed PyTensor cannot link the BLAS bundled inside NumPy's wheel and
warns about it on import. ppl_em's graphs are elementwise maps and reductions over an
N x K matrix, where BLAS plays no part, so we choose the NumPy C-API fallback
explicitly (``blas__ldflags=""``) instead of leaving users a warning. A user who has a
linkable BLAS can still set ``PYTENSOR_FLAGS=blas__ldflags=...``; we never override it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def configure() -> None:
    flags = os.environ.get("PYTENSOR_FLAGS", "")
    if "blas__ldflags" not in flags:
        if "pytensor" in sys.modules:
            # The BLAS probe is lazy: setting the flag before any graph compiles still
            # avoids both the probe and its warning when PyMC was imported first.
            sys.modules["pytensor"].config.blas__ldflags = ""
        else:
            os.environ["PYTENSOR_FLAGS"] = ",".join(f for f in (flags, "blas__ldflags=") if f)
        # Having chosen the fallback, its one-line notice on the first C graph with a
        # matrix product ("Using NumPy C-API based implementation for BLAS functions")
        # says nothing new; only that logger is quietened, and only in this case.
        logging.getLogger("pytensor.tensor.blas").setLevel(logging.ERROR)
    # ArviZ 0.23 announces its 1.0 refactor on every import; it is not actionable here.
    warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
