"""A precompiled header for the C modules PyTensor compiles during the test suite.

Each of the suite's ~500 C modules begins with the same six includes (Python, NumPy,
PyTensor's helper), and parsing them is most of the 0.45-0.6 s gcc takes per module.
GCC reads ``Python.h.gch`` in place of ``Python.h`` when it is valid for the
module's options, and the modules it builds have the machine code of those built
without it (byte for byte, built to the same path: ``benchmarks/README.md``, "The test
suite's C compilation"); where it is not valid (an
Op with other options) gcc silently parses the headers as before. Users' compilations
are not touched: this only adds an include directory to the tests' PyTensor flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytensor
from pytensor.link.c.cmodule import GCC_compiler, std_include_dirs

# The includes that open every module PyTensor generates, in its order; the guard stops
# NumPy's own ``#include <Python.h>`` from re-entering this header.
HEADER = """#ifndef PPL_EM_TESTS_PCH
#define PPL_EM_TESTS_PCH
#include_next <Python.h>
#include "pytensor_mod_helper.h"
#include <math.h>
#include <numpy/arrayobject.h>
#include <numpy/arrayscalars.h>
#include <numpy/npy_math.h>
#endif
"""
# CLinker's own arguments, and those of the elementwise Ops (which most modules carry);
# a second header without the latter serves the other modules.
LINKER_ARGS = ["-O3", "-fno-math-errno", "-Wno-unused-label", "-Wno-unused-variable",
               "-Wno-write-strings"]  # fmt: skip
ELEMWISE_ARGS = ["-fno-exceptions", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"]
NAME = "ppl_em_tests_pch"


def _build(directory: Path) -> bool:
    """Write ``directory/Python.h`` and its precompiled variants; False if gcc fails.
    Built without any header directory of ours on the include path (a test process
    inherits its parent's), where ``#include_next`` would find that one's guard."""
    args = ["-g", *GCC_compiler.compile_args(), *LINKER_ARGS]
    includes = [f"-I{d}" for d in std_include_dirs()]
    (directory / "Python.h").write_text(HEADER)
    (directory / "Python.h.gch").mkdir()
    for name, extra in (("elemwise", ELEMWISE_ARGS), ("plain", [])):
        out = directory / "Python.h.gch" / name
        cmd = [pytensor.config.cxx, "-x", "c++-header", *args, *extra, *includes,
               "-o", str(out), str(directory / "Python.h")]  # fmt: skip
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return False
    return True


def _built(directory: Path) -> bool:
    """Whether ``directory`` holds the header, building it there if not."""
    if not (directory / "Python.h.gch").is_dir():
        work = Path(tempfile.mkdtemp(dir=directory.parent))
        try:
            if _build(work):
                os.replace(work, directory)
        except OSError:
            pass  # another process's header took its place first
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return (directory / "Python.h.gch").is_dir()


def use_precompiled_header() -> None:
    """Build the header once per compile directory and put its directory on the include
    path of this process's and its children's compilations (dask workers, the CLI's
    subprocesses), in place of one inherited from a parent process. Without a C++
    compiler, or if gcc refuses, compilations go on without it."""
    if not pytensor.config.cxx:
        return
    flags = [f for f in pytensor.config.gcc__cxxflags.split() if not f.endswith(NAME)]
    pytensor.config.gcc__cxxflags = " ".join(flags)
    directory = Path(pytensor.config.compiledir) / NAME
    if _built(directory):
        flags.append(f"-I{directory}")
    pytensor.config.gcc__cxxflags = " ".join(flags)
    os.environ["PYTENSOR_FLAGS"] = ",".join(
        [f for f in os.environ.get("PYTENSOR_FLAGS", "").split(",")
         if f and not f.startswith("gcc__cxxflags=")] + [f"gcc__cxxflags={' '.join(flags)}"]
    )  # fmt: skip
