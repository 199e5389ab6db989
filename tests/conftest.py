import os

# Before PyTensor is first imported: it reads its flags once, on import.
os.environ.setdefault("PYTENSOR_FLAGS", "blas__ldflags=")
if "gcc__cxxflags" not in os.environ["PYTENSOR_FLAGS"]:
    # Without debug information: gcc generates the same code (-g never changes it), and
    # each of the suite's ~500 C modules compiles about 10% faster (benchmarks/README.md).
    os.environ["PYTENSOR_FLAGS"] += ",gcc__cxxflags=-g0"
if "traceback__limit" not in os.environ["PYTENSOR_FLAGS"]:
    # No creation traceback kept on each graph variable the suite builds (it only
    # annotates PyTensor's error messages): reading eight stack frames per variable
    # made three compile-heavy test files 5.5 % slower (benchmarks/README.md).
    os.environ["PYTENSOR_FLAGS"] += ",traceback__limit=0"
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and "compiledir_format" not in os.environ["PYTENSOR_FLAGS"]:
    # PyTensor lets one process at a time compile into a compile directory (a file
    # lock), so two test processes sharing one take turns at the compiler on a cold
    # cache; each gets its own (benchmarks/README.md, "The workflow, cold").
    os.environ["PYTENSOR_FLAGS"] += (
        ",compiledir_format=compiledir_%(short_platform)s-%(processor)s-"
        f"%(python_version)s-%(python_bitwidth)s-{_WORKER}"
    )

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytensor  # noqa: E402
import pytest  # noqa: E402
from pytensor.compile.mode import Mode  # noqa: E402
from pytensor.link.vm import VMLinker  # noqa: E402

from tests._compile_cache import use_precompiled_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# grad_reduction for a numeric M-step that is Q's exact maximiser, not the generalised
# step EM takes by default (ppl_em.mstep.GEM_GRAD_REDUCTION).
EXACT = 0.0


def pytest_configure(config):
    """Before any test module is imported: a precompiled header for the C this process
    compiles. pytest-xdist's controller runs no tests, so it builds none."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    use_precompiled_header()


@pytest.fixture(scope="session")
def seed_coin():
    """The seed's 3-coin worked example (Tables 6.1-6.4)."""
    with open(SHARED / "reference" / "seed_coin_example.json") as fh:
        return json.load(fh)


def assert_monotone(history, rel=1e-9):
    """EM never decreases its objective beyond round-off."""
    history = np.asarray(history)
    slack = rel * np.maximum(1.0, np.abs(history[1:]))
    assert np.all(np.diff(history) >= -slack), np.diff(history).min()


def assert_same_params(functions, ua, ub, **tolerance) -> None:
    """Two flat points' free variables, constrained, equal name by name to ``tolerance``
    (``np.testing.assert_allclose``'s ``rtol``, ``atol``)."""
    a, b = functions.constrain(ua), functions.constrain(ub)
    for name, va, vb in zip(functions.layout.rv_names, a, b, strict=True):
        np.testing.assert_allclose(va, vb, err_msg=name, **tolerance)


def numpy_ops():
    """A context in which PyTensor compiles on NumPy-backed Ops (no C, no fusion).

    For the references a test runs once (``pm.find_MAP`` and a logp on the marginalised
    model): they take a few hundred gradients, fewer seconds than C takes to compile
    them on a cold cache. Written here, not taken from ppl_em, so that a reference
    shares no code with what it checks.
    """
    linker = VMLinker(use_cloop=False, c_thunks=False)
    # As ppl_em's numpy_mode: in-place rewrites only save allocations, and checking
    # them against the graph costs compilation (benchmarks/README.md).
    mode = Mode(linker, "fast_run").excluding("fusion", "inplace")
    return pytensor.config.change_flags(mode=mode)
