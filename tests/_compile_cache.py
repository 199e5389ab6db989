"""A precompiled header for the C modules PyTensor compiles during the test suite.

Each of the suite's ~500 C modules begins with the same six includes (Python, NumPy,
PyTensor's helper), and parsing them is most of the 0.45-0.65 s gcc takes per module.
GCC reads ``Python.h.gch`` in place of ``Python.h`` when it was built with the
module's options (PyTensor's and those PyMC's import adds, which every module here
has), and the modules it builds then have the machine code of those built without it
(byte for byte, built to the same path: ``benchmarks/README.md``, "The test suite's C
compilation"); where it is not valid gcc silently parses the headers as before. Users'
compilations are not touched: this only adds an include directory to the tests'
PyTensor flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytensor
import pytensor.tensor as pt
from pytensor.graph.fg import FunctionGraph
from pytensor.link.c.basic import CLinker
from pytensor.link.c.cmodule import std_include_dirs

# The includes that open every module PyTensor generates, in its order. The guard stops
# NumPy's own ``#include <Python.h>`` from re-entering this header; the others are
# read only when the header is compiled itself (include level 0), so a file that gcc
# cannot give the precompiled form (one that includes Python.h after other code, as
# PyTensor's lazylinker does) gets Python.h and nothing more.
HEADER = """#ifndef PPL_EM_TESTS_PCH
#define PPL_EM_TESTS_PCH
#include_next <Python.h>
#if __INCLUDE_LEVEL__ == 0
#include "pytensor_mod_helper.h"
#include <math.h>
#include <numpy/arrayobject.h>
#include <numpy/arrayscalars.h>
#include <numpy/npy_math.h>
#endif
#endif
"""
NAME = "ppl_em_tests_pch"


def _module_args() -> list[str]:
    """gcc's arguments for a module, as PyTensor's C linker gives them (its own, the
    machine's and ``gcc__cxxflags``, to which PyMC's import adds ``-fno-exceptions``
    and others): the header is valid only for modules compiled with the same."""
    import pymc  # noqa: F401 (its import extends gcc__cxxflags)

    x = pt.vector("x")
    return ["-g", *CLinker().accept(FunctionGraph([x], [x.sum()])).compile_args()]


def _build(directory: Path) -> bool:
    """Write ``directory/Python.h`` and its precompiled form; False if gcc fails."""
    includes = [f"-I{d}" for d in std_include_dirs()]
    (directory / "Python.h").write_text(HEADER)
    cmd = [pytensor.config.cxx, "-x", "c++-header", *_module_args(), *includes,
           "-o", str(directory / "Python.h.gch"), str(directory / "Python.h")]  # fmt: skip
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _built(directory: Path) -> bool:
    """Whether ``directory`` holds the header, building it there if not."""
    if not (directory / "Python.h.gch").is_file():
        work = Path(tempfile.mkdtemp(dir=directory.parent))
        try:
            if _build(work):
                os.replace(work, directory)
        except OSError:
            pass  # another process's header took its place first
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return (directory / "Python.h.gch").is_file()


def _ours(flags: str) -> list[str]:
    return [f for f in flags.split() if not f.endswith(NAME)]


def use_precompiled_header() -> None:
    """Build the header once per compile directory and put its directory on the include
    path of this process's and its children's compilations (dask workers, the CLI's
    subprocesses), in place of one inherited from a parent process. It is built without
    that one on the include path, where ``#include_next`` would find its guard. Without
    a C++ compiler, or if gcc refuses, compilations go on without it."""
    if not pytensor.config.cxx:
        return
    env = dict(f.split("=", 1) for f in os.environ.get("PYTENSOR_FLAGS", "").split(",") if f)
    inherited = _ours(env.get("gcc__cxxflags", ""))
    pytensor.config.gcc__cxxflags = " ".join(_ours(pytensor.config.gcc__cxxflags))
    directory = Path(pytensor.config.compiledir) / NAME
    extra = [f"-I{directory}"] if _built(directory) else []
    # Children get the flags this process inherited, then ours; PyMC's import appends
    # its own in them as it did here. In that order here too, their modules' keys are
    # this process's, and its cache serves them.
    added = [f for f in _ours(pytensor.config.gcc__cxxflags) if f not in inherited]
    pytensor.config.gcc__cxxflags = " ".join([*inherited, *extra, *added])
    env["gcc__cxxflags"] = " ".join([*inherited, *extra])
    os.environ["PYTENSOR_FLAGS"] = ",".join(f"{k}={v}" for k, v in env.items())
