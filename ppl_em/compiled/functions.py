"""Compile, once per model, the functions EM evaluates: the only caller of PyTensor's
compiler besides :mod:`ppl_em.compiled.curvature` and :mod:`ppl_em.compiled.mvn_map`.

The flat unconstrained vector ``u`` (:mod:`ppl_em.compiled.layout`) and the data are
inputs, the per-observation data with a first axis of any length (a chunk). The E-step
graph returns the joint's K rows as separate outputs; log-responsibilities, the
log-likelihood and the statistics come from one pass over them (``ppl_em.steps``).
Functions not every fit needs (Q and its gradient) are built and compiled on first
use, which keeps a cold start of a closed-form model to a few small compilations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import pytensor.tensor as pt
from pymc.pytensorf import compile as pymc_compile
from pytensor import Out
from pytensor.compile.mode import Mode, get_mode
from pytensor.graph.replace import graph_replace
from pytensor.link.vm import VMLinker
from pytensor.tensor import TensorVariable
from threadpoolctl import ThreadpoolController

from ppl_em.compiled.hoist import DataTerms, hoist_data_terms
from ppl_em.compiled.layout import FlatLayout, flat_layout, flat_replacements, transform_graphs
from ppl_em.compiled.numpy_ops import numpy_mode
from ppl_em.compiled.rewrites import checks_as_flags, logistic_as_softplus, solves_as_products
from ppl_em.model.data import DataSpec, data_arrays, data_spec
from ppl_em.model.graph import MixtureGraph
from ppl_em.model.joint import fixed_terms, joint_rows, shared_label_terms
from ppl_em.options import BACKENDS, MODES


class EMFunctions(NamedTuple):
    """Compiled building blocks of one model's EM, and the data they were built for.

    - ``rows(u, *chunk) -> [L[:, 0], ..., L[:, K-1]]`` with ``L[i, k] = log p(x_i, z_i=k)``
      over a chunk of the per-observation data (``spec.names`` order); with the C
      backend the rows are the function's own buffers, overwritten by the next call.
    - ``fixed(u, *fixed_data) -> (extra_loglik, logprior)``: the observed variables
      that do not depend on the label, and the log prior without Jacobian terms.
    - ``q_and_grad(u, gamma_t, fixed_weight, *chunk, *fixed_data) -> (Q, dQ/du)`` for
      ``mode``, with ``gamma_t`` the K x n responsibilities of the chunk; the fixed
      terms enter with weight ``fixed_weight`` (1 for one chunk of a sum, 0 for the rest).
    - ``constrain(u) -> [values]`` in ``layout.rv_names`` order;
      ``unconstrain(u, *values) -> [unconstrained]`` (``u`` supplies the values that
      other transforms depend on).
    - ``initial_point() -> {value name: array}``: PyMC's initial point of the model.
    - ``compiled_rows``: whether ``rows`` is compiled code, not NumPy-backed Ops (which
      decides the pass over the rows, :func:`ppl_em.steps.estep.e_step`).
    - ``blas``: the process's BLAS thread pools, which the E-step limits to one thread.
    - ``weights``, ``labels``: a weight per observation (it counts that many times) and
      the known labels (-1 where unknown), or None; one per label (``graph.n_obs``).
    - ``shared_label``: whether the label's probabilities are shared by all
      observations (:func:`ppl_em.model.joint.shared_label_terms`), as a written row
      needs (:mod:`ppl_em.steps.mvn_rows`, whose parameter map computes them).
    """

    graph: MixtureGraph
    mode: str
    layout: FlatLayout
    spec: DataSpec
    data: tuple[np.ndarray, ...]
    fixed_data: tuple[np.ndarray, ...]
    rows: Callable
    fixed: Callable
    q_and_grad: Callable
    constrain: Callable
    unconstrain: Callable
    initial_point: Callable
    compiled_rows: bool
    blas: ThreadpoolController
    weights: np.ndarray | None = None
    labels: np.ndarray | None = None
    shared_label: bool = False

    @property
    def data_names(self) -> tuple[str, ...]:
        return self.spec.names

    def restarted(self) -> EMFunctions:
        """These functions for a new fit: where Q switches from NumPy-backed Ops to C is
        decided by this fit alone (:class:`SwitchingFunction`)."""
        q = self.q_and_grad
        return self._replace(q_and_grad=q.restarted()) if isinstance(q, SwitchingFunction) else self

    def observed(self) -> dict[str, np.ndarray]:
        """The dependents' observed arrays (of the data these functions hold), by name."""
        data = dict(zip(self.spec.names, self.data, strict=True))
        return {name: data[name] for name in self.spec.observed}

    def observed_columns(self) -> np.ndarray:
        """The observed values the labels explain, as an (N, d) float array (one row per
        label: per element for a ``pm.Mixture`` over (N, J) data)."""
        n = self.data[0].shape[0] * self.graph.labels_per_row
        cols = [np.asarray(x, dtype=float).reshape(n, -1) for x in self.observed().values()]
        return np.concatenate(cols, axis=1)


# Below this many cells (N x K) the E-step is fast in any backend, and compiling C code
# (tens of seconds on a cold cache) would dominate the fit: use NumPy-backed Ops.
SMALL_CELLS = 200_000
# With a numeric M-step the rows and Q are called hundreds of times, and C pays off
# sooner: at 900-9000 cells a call of Q and its gradient on NumPy-backed Ops took
# 1.6-2.1 ms (C 0.09-0.17 ms), 3.2 ms at 90 000, and compiling rows and Q to C took
# 25 s of a 28 s first fit (benchmarks/README.md).
SMALL_NUMERIC_CELLS = 20_000


def backend_mode(backend: str) -> Mode:
    """PyTensor mode of a backend: ``"c"`` PyTensor's C code (slow first compile, cached),
    ``"numba"`` numba JIT, ``"python"`` each Op's NumPy implementation
    (:func:`ppl_em.compiled.numpy_ops.numpy_mode`)."""
    if backend == "c":
        return get_mode("FAST_RUN")
    if backend == "numba":
        return get_mode("NUMBA")
    if backend == "python":
        return numpy_mode()
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")


class DeferredGraph:
    """A function's ``(inputs, outputs)``, built by ``build()`` when first asked for and
    kept: differentiating Q took 4.0 of the 4.7 s of preparing the 2-D MvNormal example
    (benchmarks/README.md), and closed-form fits never call Q."""

    def __init__(self, build: Callable[[], tuple[list, list]]) -> None:
        self._build = build
        self._graph: tuple[list, list] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> tuple[list, list]:
        with self._lock:
            if self._graph is None:
                self._graph = self._build()
            return self._graph


class LazyFunction:
    """A PyTensor function compiled on its first call (many fits never need it); its
    first ``borrow`` outputs are the function's own buffers, overwritten by the next
    call.

    A compiled PyTensor function keeps its inputs and outputs in storage of its own, so
    two threads calling it at once would overwrite each other's: every call holds
    ``lock``, and a caller that reads borrowed outputs holds it until it has (one
    ``prepared`` model can serve fits in several threads; they take turns).
    """

    def __init__(
        self,
        inputs: list | DeferredGraph,
        outputs: list | TensorVariable | None,
        mode: Mode,
        borrow: int = 0,
        terms: tuple[DataTerms, slice] | None = None,
    ) -> None:
        self._graph = (inputs, outputs, mode)
        self._borrow = borrow
        self._terms = terms
        self._fn: Callable | None = None
        self.lock = threading.RLock()

    @property
    def graph(self) -> tuple[list, list | TensorVariable, Mode]:
        """(inputs, outputs, mode); a deferred graph is built here, once."""
        inputs, outputs, mode = self._graph
        if isinstance(inputs, DeferredGraph):
            inputs, outputs = inputs()
        return inputs, outputs, mode

    @property
    def compiled(self) -> Callable:
        """The compiled PyTensor function (compiling it now if not yet)."""
        with self.lock:
            if self._fn is None:
                inputs, outputs, mode = self.graph
                if self._borrow:
                    outputs = [Out(o, borrow=i < self._borrow) for i, o in enumerate(outputs)]
                self._fn = pymc_compile(inputs, outputs, mode=mode, on_unused_input="ignore")
            return self._fn

    @property
    def is_compiled(self) -> bool:
        return self._fn is not None

    def full_args(self, args: tuple) -> tuple:
        """``args`` and, with ``terms = (data_terms, chunk)``, the hoisted data terms of
        ``args[chunk]`` (:mod:`ppl_em.compiled.hoist`): the compiled function's inputs."""
        if self._terms is None:
            return args
        data_terms, chunk = self._terms
        return (*args, *data_terms.of(args[chunk]))

    def __call__(self, *args):
        args = self.full_args(args)
        with self.lock:
            return self.compiled(*args)


# Calls on NumPy-backed Ops before a switching function compiles C: for a block's Q of
# the statistics (430 us a call) about 0.4 s of them, a fit of some 25 EM iterations;
# for Q of a small data set (about 2 ms a call below SMALL_NUMERIC_CELLS) about 2 s,
# against 20 s to compile Q and its gradient cold (benchmarks/README.md).
SWITCH_CALLS = 1000


class SwitchingFunction:
    """A function on NumPy-backed Ops (0.3-1.2 s to build, 0.4-2 ms a call) for its
    first ``SWITCH_CALLS`` calls, then compiled C (seconds to compile cold, 20-170 us a
    call). A short fit never pays for C; a longer one pays a second or two before
    switching.

    The two round differently, and a flat objective (a stick-breaking prior's spare
    components) carries that difference far, so where the switch falls is decided per
    fit, on a :meth:`restarted` copy (the compiled functions are shared): a fit counts
    its own calls, or runs C throughout once an earlier fit has compiled it. Fits of
    freshly prepared models take the same arithmetic, and so do the fits of one
    prepared model once its C version is compiled."""

    def __init__(self, python: LazyFunction, c: LazyFunction, calls: int = 0) -> None:
        self._python, self._c = python, c
        self._calls = calls

    @classmethod
    def of(
        cls, inputs: list | DeferredGraph, outputs: list | None, terms=None
    ) -> SwitchingFunction:
        return cls(LazyFunction(inputs, outputs, backend_mode("python"), terms=terms),
                   LazyFunction(inputs, outputs, backend_mode("c"), terms=terms))  # fmt: skip

    @property
    def is_compiled(self) -> bool:
        """Whether the C version is compiled (every later fit runs it throughout)."""
        return self._c.is_compiled

    def restarted(self) -> SwitchingFunction:
        calls = SWITCH_CALLS if self._c.is_compiled else 0
        return SwitchingFunction(self._python, self._c, calls)

    def __call__(self, *args):
        self._calls += 1
        return (self._python if self._calls <= SWITCH_CALLS else self._c)(*args)


class InitialPoint:
    """PyMC's ``model.initial_point()``, computed on the first call and kept: PyMC
    compiles a function for it at each call (60 ms of a 0.49 s fit of a Poisson
    regression mixture at N=10^5, profiled). Its ``NotImplementedError`` (no initial
    point can be made) is raised at every call."""

    def __init__(self, model) -> None:
        self._model = model
        self._point: dict | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict:
        with self._lock:
            if self._point is None:
                self._point = self._model.initial_point()
            return {name: np.copy(value) for name, value in self._point.items()}


def _has_c_loops(mode: Mode) -> bool:
    return isinstance(mode.linker, VMLinker) and mode.linker.c_thunks


class RowsFunction(LazyFunction):
    """``rows``. With C thunks the rows are compiled without their single-value
    parameter checks (:func:`ppl_em.compiled.rewrites.checks_as_flags`: a row whose
    check fails is returned as ``-inf``, as PyMC's check makes it) and are the compiled
    function's buffers, reused by the next call; a caller reads them before calling
    again. ``benchmarks/README.md`` has the measurements behind both choices."""

    def __init__(self, inputs: list, rows: list, mode: Mode, terms=None) -> None:
        c_loops = _has_c_loops(mode)
        flags = [pt.constant(True)] * len(rows)
        if c_loops:
            rows, flags = checks_as_flags(rows)
            mode = mode.clone(link_kwargs={"allow_gc": False})
        super().__init__(inputs, [*rows, *flags], mode, len(rows) * c_loops, terms)
        self._k = len(rows)

    def __call__(self, *args):
        with self.lock:
            out = super().__call__(*args)
        k = self._k
        return [
            r if ok else np.full_like(r, -np.inf)
            for r, ok in zip(out[:k], out[k : 2 * k], strict=True)
        ]


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only copy: nothing derived from the data once per dataset can go stale."""
    out = np.array(array, copy=True)
    out.flags.writeable = False
    return out


def _q_graph(rows, extra, logprior, mode: str, flat, k: int, data_in: list):
    """``(inputs, [Q, dQ/du])``, Q over a chunk: ``sum_ik gamma_ik L_ik`` plus the
    weighted fixed terms; the inputs are ``u``, the responsibilities, the fixed terms'
    weight and ``data_in``."""
    gamma_t = pt.matrix("gamma_t", dtype="float64")
    weight = pt.scalar("fixed_weight", dtype="float64")
    # 0 * -inf is NaN: a component with zero responsibility contributes nothing.
    expected = pt.sum(
        [pt.sum(pt.switch(pt.gt(gamma_t[j], 0), gamma_t[j] * rows[j], 0.0)) for j in range(k)]
    )
    fixed = extra + logprior if mode == "map" else extra
    q = expected + weight * fixed
    return [flat, gamma_t, weight, *data_in], [q, pt.grad(q, flat)]


def _backends(backend: str, graph: MixtureGraph, numeric: bool):
    """(rows, Q, small graphs) backends. ``"auto"``: for at most ``SMALL_NUMERIC_CELLS``
    cells, NumPy-backed rows and a Q that switches to C after ``SWITCH_CALLS`` calls
    (compiling both to C is most of a small fit's time, cold: the first fit of
    ``models/gaussian_2d`` took 76.7 s with both compiled, 11.6 s this way,
    benchmarks/README.md); otherwise C for Q and its
    gradient, and NumPy-backed rows for at most ``SMALL_CELLS`` cells without a numeric
    M-step (C rows run many E-steps faster); NumPy-backed transforms and fixed terms."""
    if backend != "auto":
        backend_mode(backend)  # refuses an unknown name
        return backend, backend, backend
    cells = graph.n_obs * graph.n_components
    small = cells <= SMALL_NUMERIC_CELLS
    rows = small if numeric else cells <= SMALL_CELLS
    return ("python" if rows else "c"), ("switch" if small else "c"), "python"


def _q_function(graph: DeferredGraph, backend: str, terms) -> Callable:
    if backend == "switch":
        return SwitchingFunction.of(graph, None, terms)
    return LazyFunction(graph, None, backend_mode(backend), terms=terms)


def build_em_functions(
    graph: MixtureGraph,
    mode: str = "map",
    backend: str = "auto",
    numeric: bool = False,
    broadcast_label: bool = True,
) -> EMFunctions:
    """Compile everything one EM fit of ``graph`` needs (the slow, once-per-model part).

    ``backend`` is one of ``BACKENDS`` (see :func:`backend_mode` and :func:`_backends`);
    ``numeric`` says a numeric M-step will run; ``broadcast_label=False`` builds the
    label's rows over chunk-long label values (:func:`ppl_em.model.joint.label_rows`).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}: 'map' adds the log prior.")
    spec = data_spec(graph)
    layout = flat_layout(graph)
    flat = pt.vector("u", dtype="float64")
    replace = flat_replacements(graph, layout, flat)
    rows = graph_replace(joint_rows(graph, spec, broadcast_label), replace, strict=False)
    rows = logistic_as_softplus(rows)
    rows_backend, q_backend, tiny_backend = _backends(backend, graph, numeric)
    rows_mode, tiny = backend_mode(rows_backend), backend_mode(tiny_backend)
    extra, logprior = graph_replace(list(fixed_terms(graph, spec)), replace, strict=False)
    chunk, fixed_in = list(spec.inputs), list(spec.fixed_inputs)
    rows, term_in, term_graphs = hoist_data_terms(rows, chunk)
    # Data terms run once per chunk: like the small graphs, not worth a C compilation.
    terms = DataTerms(LazyFunction(chunk, term_graphs, tiny)) if term_in else None
    n = len(chunk)
    k, q_data = graph.n_components, [*chunk, *fixed_in, *term_in]
    q_graph = DeferredGraph(partial(_q_graph, rows, extra, logprior, mode, flat, k, q_data))
    constrained, param_inputs, forward = transform_graphs(graph, replace)
    data, fixed_data = data_arrays(spec)
    return EMFunctions(
        graph=graph,
        mode=mode,
        layout=layout,
        spec=spec,
        data=tuple(map(_frozen, data)),
        fixed_data=tuple(map(_frozen, fixed_data)),
        rows=RowsFunction(
            [flat, *chunk, *term_in],
            solves_as_products(rows),
            rows_mode,
            (terms, slice(1, 1 + n)) if terms else None,
        ),
        fixed=LazyFunction([flat, *fixed_in], [extra, logprior], tiny),
        q_and_grad=_q_function(
            q_graph,
            q_backend,
            (terms, slice(3, 3 + n)) if terms else None,
        ),
        constrain=LazyFunction([flat], constrained, tiny),
        unconstrain=LazyFunction([flat, *param_inputs], forward, tiny),
        initial_point=InitialPoint(graph.model),
        compiled_rows=rows_backend != "python",
        # Created here, after NumPy's and SciPy's BLAS libraries are loaded.
        blas=ThreadpoolController(),
        shared_label=shared_label_terms(graph) is not None,
    )


def with_arrays(functions: EMFunctions, data=None, fixed_data=None) -> EMFunctions:
    """``functions`` holding other arrays of the same dtypes (read-only copies)."""
    return functions._replace(
        data=functions.data if data is None else tuple(map(_frozen, data)),
        fixed_data=functions.fixed_data if fixed_data is None else tuple(map(_frozen, fixed_data)),
    )
