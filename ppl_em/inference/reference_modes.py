"""How PyMC's references are compiled: NumPy-backed Ops, C, or PyMC's defaults.

``find_MAP`` and NUTS stay PyMC's own; only the PyTensor mode their functions are
compiled in is chosen here. Measured on the seed models (``benchmarks/README.md``,
``bench_workflow.py``; NumPy-backed Ops means no C and no fusion, so that every
elementwise op stays one NumPy ufunc call):

* find_MAP takes a few hundred gradients, which NumPy-backed Ops evaluate in less time
  than C takes to compile them (about 60 C modules, 0.4 s each, on a cold cache);
* NUTS takes tens of thousands of gradients on these small models. On NumPy-backed Ops
  each costs 9-14 times what it does in C on the seed models, but nothing is compiled,
  and each chain runs in its own process (``chain_processes``), so a cold ``compare``
  is 2.5-3.8x faster than with C; once C's modules are cached, C samples two to four
  times faster.

``"fast"`` (the default) is NumPy-backed Ops for both: the quickest first run. Where
the model's logp factorises or solves matrices (an MvNormal's Cholesky factor and
triangular solves), C has no implementation of those batched Ops either and runs them
in Python, one matrix at a time, so ``"fast"`` compiles NUTS with numba, which does;
where numba refuses an Op, NUTS runs on NumPy-backed Ops and the notes say so.
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
from pytensor.graph.traversal import ancestors

from ppl_em.compiled.functions import backend_mode
from ppl_em.options import REFERENCE_MODES as MODES

NUMBA = "NUMBA"
LINALG = ("pytensor.tensor.slinalg", "pytensor.tensor.nlinalg")


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


COMPILERS = ("compile_logp", "compile_dlogp", "compile_fn")


def _key(value):
    """``value`` as a dictionary key (lists of variables as tuples); TypeError where it
    has no such form."""
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    hash(value)
    return value


@contextlib.contextmanager
def compiled_once(model: pm.Model):
    """Within: ``model``'s ``compile_logp``, ``compile_dlogp`` and ``compile_fn`` give
    the function they compiled before for the same arguments (and mode). PyMC compiles
    afresh at every ``find_MAP``: from two starts, with the log posterior read at each
    optimum, it compiled the log posterior four times and its gradient twice (on the
    coin model 3.7-4 s of a find_MAP's 5 s, benchmarks/README.md). Graphs PyMC
    builds anew at each call (its check of the start, its outputs) still compile
    each time."""
    own = {name: vars(model)[name] for name in COMPILERS if name in vars(model)}
    for name in COMPILERS:
        setattr(model, name, _memoised(getattr(model, name)))
    try:
        yield model
    finally:
        for name in COMPILERS:
            vars(model).pop(name)
        vars(model).update(own)


def _memoised(compile_):
    cache = {}

    def compiled(*args, **kwargs):
        try:
            key = _key((args, sorted(kwargs.items()), pytensor.config.mode))
        except TypeError:  # an argument with no key: compiled as PyMC would
            return compile_(*args, **kwargs)
        if key not in cache:
            cache[key] = compile_(*args, **kwargs)
        return cache[key]

    return compiled


def has_linalg(model: pm.Model) -> bool:
    """Whether ``model``'s logp factorises or solves matrices (a linear-algebra Op,
    batched or not)."""
    for var in ancestors([model.logp()]):
        op = var.owner.op if var.owner else None
        core = getattr(op, "core_op", op)
        if type(core).__module__.startswith(LINALG):
            return True
    return False


def nuts_compile_kwargs(reference_modes: str, nuts_sampler: str, linalg: bool = False) -> dict:
    """``pm.sample``'s ``compile_kwargs`` for PyMC's NUTS: in ``"fast"``, NumPy-backed
    Ops, or numba for a model with linear algebra (``linalg``); C otherwise. Other
    samplers (nutpie) compile themselves."""
    if nuts_sampler != "pymc":
        return {}
    if reference_modes == "fast":
        return {"mode": NUMBA if linalg else backend_mode("python")}
    return {"mode": "FAST_RUN"}


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
    compile the model, again on NumPy-backed Ops, said in ``notes``."""
    try:
        return pm.sample(compile_kwargs=compile_kwargs, **sample_kwargs)
    except Exception as err:  # only numba's refusals are retried; the rest propagate
        if compile_kwargs.get("mode") != NUMBA or not _numba_unsupported(err):
            raise
        notes.append(
            f"numba could not compile the model for NUTS ({type(err).__name__}); "
            "sampled on NumPy-backed Ops"
        )
        return pm.sample(compile_kwargs={"mode": backend_mode("python")}, **sample_kwargs)


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
    linalg = reference_modes == "fast" and has_linalg(sample_kwargs["model"])
    compile_kwargs = nuts_compile_kwargs(reference_modes, nuts_sampler, linalg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _pm_sample(notes, compile_kwargs, nuts_sampler=nuts_sampler,
                          compute_convergence_checks=False, **sample_kwargs)  # fmt: skip
