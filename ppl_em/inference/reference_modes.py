"""How PyMC's references are compiled: find_MAP on NumPy-backed Ops, NUTS on numba.

``find_MAP`` and NUTS stay PyMC's own; only the PyTensor mode their functions are
compiled in is chosen here. Measured on the seed models (``benchmarks/README.md``,
``bench_workflow.py``):

* find_MAP takes a few hundred gradients, which NumPy-backed Ops (no C, no fusion, so
  that every elementwise op stays one NumPy ufunc call) evaluate in less time than C
  takes to compile them: 1.9-3.8 s cold against 21-29 s, and slightly faster warm;
* NUTS takes thousands of gradients, so its function is compiled, by numba: 2.2-2.7 s
  warm against 2.3-3.4 s for C, but 20-38 s cold against 7.5-12 s.

So a cold ``compare`` costs about what it did with C everywhere, and a warm one a
little less.

Numba does not implement every PyTensor Op; a model that uses one samples with PyMC's
default mode instead, and the comparison's notes say so.
"""

from __future__ import annotations

import contextlib
import warnings

import pymc as pm
import pytensor

from ppl_em.compiled.functions import backend_mode

NUMBA = "NUMBA"
MODES = ("fast", "pymc")


def check_modes(reference_modes: str) -> None:
    if reference_modes not in MODES:
        raise ValueError(f"reference_modes={reference_modes!r} must be one of {MODES}.")


def numpy_mode(reference_modes: str):
    """A context in which PyTensor compiles on NumPy-backed Ops (``"fast"``), or PyMC's
    default (``"pymc"``): find_MAP's functions and the per-draw label posteriors."""
    if reference_modes == "fast":
        return pytensor.config.change_flags(mode=backend_mode("python"))
    return contextlib.nullcontext()


def nuts_compile_kwargs(reference_modes: str, nuts_sampler: str) -> dict:
    """``pm.sample``'s ``compile_kwargs``: numba for PyMC's NUTS in ``"fast"``; PyMC's
    default (C) otherwise. Other samplers (nutpie) compile themselves."""
    if reference_modes == "fast" and nuts_sampler == "pymc":
        return {"mode": NUMBA}
    return {"mode": "FAST_RUN"} if nuts_sampler == "pymc" else {}


def _numba_unsupported(err: Exception) -> bool:
    """Whether ``err`` is numba refusing an Op (not a fault of the model or data)."""
    if isinstance(err, NotImplementedError):
        return True
    try:
        from numba.core.errors import NumbaError
    except ImportError:
        return False
    return isinstance(err, NumbaError)


def _pm_sample(notes: list, compile_kwargs: dict, **sample_kwargs):
    """``pm.sample(compile_kwargs=compile_kwargs, **sample_kwargs)``; where numba cannot
    compile the model, again in PyMC's default (C) mode, said in ``notes``."""
    try:
        return pm.sample(compile_kwargs=compile_kwargs, **sample_kwargs)
    except Exception as err:  # only numba's refusals are retried; the rest propagate
        if compile_kwargs.get("mode") != NUMBA or not _numba_unsupported(err):
            raise
        notes.append(
            f"numba could not compile the model for NUTS ({type(err).__name__}); "
            "sampled with PyMC's default (C) mode"
        )
        return pm.sample(compile_kwargs={"mode": "FAST_RUN"}, **sample_kwargs)


def sample_nuts(notes: list, *, reference_modes: str, nuts_sampler: str, **sample_kwargs):
    """NUTS draws on ``sample_kwargs["model"]`` by ``pm.sample`` (without PyMC's own
    convergence checks: the comparison makes its own, after relabelling), compiled as
    ``reference_modes`` says; nutpie where asked and installed, else PyMC's NUTS."""
    if nuts_sampler == "nutpie":
        try:
            import nutpie  # noqa: F401
        except ImportError:
            notes.append("nutpie is not installed; sampled with PyMC's NUTS instead")
            nuts_sampler = "pymc"
    compile_kwargs = nuts_compile_kwargs(reference_modes, nuts_sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _pm_sample(notes, compile_kwargs, nuts_sampler=nuts_sampler,
                          compute_convergence_checks=False, **sample_kwargs)  # fmt: skip
