"""How PyMC's references are compiled: NumPy-backed Ops, C, or PyMC's defaults.

``find_MAP`` and NUTS stay PyMC's own; only the PyTensor mode their functions are
compiled in is chosen here. Measured on the seed models (``benchmarks/README.md``,
``bench_workflow.py``; NumPy-backed Ops means no C and no fusion, so that every
elementwise op stays one NumPy ufunc call):

* find_MAP takes a few hundred gradients, which NumPy-backed Ops evaluate in less time
  than C takes to compile them (about 60 C modules, 0.4 s each, on a cold cache);
* NUTS takes tens of thousands of gradients on these small models. On NumPy-backed Ops
  each costs about ten times what it does in C, but nothing is compiled, and each chain
  runs in its own process (PyMC's ``cores``), so a cold ``compare`` takes about half as
  long as with C; once C's modules are cached, C samples two to three times faster.

``"fast"`` (the default) is NumPy-backed Ops for both: the quickest first run.
``"compiled"`` compiles NUTS in C: the quickest once C's modules are cached (every
later run of a model, or of another with the same Ops) and for large models, where each
gradient's arithmetic, not its Python overhead, dominates. ``"pymc"`` is PyMC's default
(C) for both.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import pymc as pm
import pytensor

from ppl_em.compiled.functions import backend_mode
from ppl_em.options import REFERENCE_MODES as MODES


def check_modes(reference_modes: str) -> None:
    if reference_modes not in MODES:
        raise ValueError(f"reference_modes={reference_modes!r} must be one of {MODES}.")


def numpy_mode(reference_modes: str):
    """A context in which PyTensor compiles on NumPy-backed Ops (``"fast"`` and
    ``"compiled"``), or PyMC's default (``"pymc"``): find_MAP's functions and the
    per-draw label posteriors."""
    if reference_modes != "pymc":
        return pytensor.config.change_flags(mode=backend_mode("python"))
    return contextlib.nullcontext()


def nuts_compile_kwargs(reference_modes: str, nuts_sampler: str) -> dict:
    """``pm.sample``'s ``compile_kwargs`` for PyMC's NUTS: NumPy-backed Ops in
    ``"fast"``, C otherwise. Other samplers (nutpie) compile themselves."""
    if nuts_sampler != "pymc":
        return {}
    if reference_modes == "fast":
        return {"mode": backend_mode("python")}
    return {"mode": "FAST_RUN"}


def chain_processes(cores: int | None, chains: int) -> int:
    """``cores`` if given, else one process per chain up to the CPUs this process may
    use. PyMC's own default counts half the CPUs (it takes the rest for hyperthreads),
    so on a 2-vCPU machine it ran two chains one after the other."""
    if cores is not None:
        return cores
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(chains, cpus))


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
        return pm.sample(compile_kwargs=compile_kwargs, nuts_sampler=nuts_sampler,
                         compute_convergence_checks=False, **sample_kwargs)  # fmt: skip
