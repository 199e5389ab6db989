"""Compile the E-step, the Q function and the parameter transforms, once per model.

Parameters live in one flat float64 vector ``u`` over the unconstrained value
variables (the space ``pm.find_MAP`` optimises in). Observed data are inputs of the
compiled functions, not constants baked into them, so fitting a new dataset of the
same shape reuses the compiled code; the arrays to pass are in ``EMFunctions.data``
and ``ppl_em.with_data`` swaps in a new dataset without compiling anything.

One compiled graph, ``joint_terms``, serves every E-step: the K component rows of the
N x K joint plus two scalars. Log-responsibilities, the log-likelihood and the expected
sufficient statistics come from one pass over it
(:func:`ppl_em.kernel.compiled_fused_estep`, a numba loop, for the compiled backends;
the NumPy :func:`ppl_em.estep.fused_estep` for ``backend="python"``), which measured
several times faster than PyTensor's own logsumexp/softmax reductions on an N x K
matrix with small K. Functions not every fit needs (Q and its gradient) are compiled on
first use, which keeps a cold start of a closed-form model to three compilations.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import pytensor.tensor as pt
from pymc.pytensorf import compile as pymc_compile
from pytensor import Out
from pytensor.compile.mode import Mode, get_mode
from pytensor.graph.replace import graph_replace
from pytensor.link.vm import VMLinker
from pytensor.tensor import TensorConstant, TensorVariable
from pytensor.tensor.basic import Join
from threadpoolctl import ThreadpoolController

from ppl_em.estep import fused_estep, objective_graphs
from ppl_em.graph import MixtureGraph, observed_data
from ppl_em.kernel import compiled_fused_estep
from ppl_em.rewrites import checks_as_flags, solves_as_products

MODES = ("map", "mle")


class FlatLayout(NamedTuple):
    """Where each parameter's unconstrained values sit in the flat vector ``u``."""

    rv_names: tuple[str, ...]
    value_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slices: tuple[slice, ...]
    size: int

    def unflatten(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """Value-variable name -> unconstrained array."""
        return {
            n: u[s].reshape(shape)
            for n, s, shape in zip(self.value_names, self.slices, self.shapes, strict=True)
        }


class EMFunctions(NamedTuple):
    """Compiled building blocks of one model's EM; every callable takes ``*data`` last.

    - ``estep(u, *data) -> (log_resp[N, K], loglik, logprior)``
    - ``joint(u, *data) -> L[N, K]`` with ``L[i, k] = log p(x_i, z_i=k | theta)``
    - ``q_and_grad(u, gamma, *data) -> (Q, dQ/du)`` for the chosen ``mode``
    - ``constrain(u) -> [param values]`` in the order of ``layout.rv_names``
    - ``unconstrain(u, *params) -> [unconstrained values]``; ``u`` supplies the values
      of parameters that other transforms depend on.
    - ``joint_terms(u, *data) -> (L[:, 0], ..., L[:, K-1], extra_loglik, logprior)``:
      the K rows of the joint as separate arrays (:func:`joint_rows` says why); the one
      compiled graph behind ``estep`` and ``joint``.
    - ``blas``: the process's BLAS thread pools, limited to one thread during an E-step
      (:func:`one_blas_thread` says why).
    - ``fused(rows, columns) -> (log_resp, loglik, EStepStats)``: the pass over the
      joint's rows, :func:`ppl_em.kernel.compiled_fused_estep` when the E-step graph is
      compiled, the NumPy :func:`ppl_em.estep.fused_estep` for ``backend="python"``.
    """

    graph: MixtureGraph
    mode: str
    layout: FlatLayout
    data_names: tuple[str, ...]
    data: tuple[np.ndarray, ...]
    estep: Callable
    joint: Callable
    q_and_grad: Callable
    constrain: Callable
    unconstrain: Callable
    joint_terms: Callable | None = None
    blas: ThreadpoolController | None = None
    fused: Callable = fused_estep


BACKENDS = ("auto", "c", "numba", "python")
# Below this many cells (N x K) the E-step is fast in any backend, and compiling C code
# (tens of seconds on a cold cache) would dominate the fit: use NumPy-backed Ops.
SMALL_CELLS = 200_000


def backend_mode(backend: str) -> Mode:
    """PyTensor mode of a backend: ``"c"`` PyTensor's C code (slow first compile, cached),
    ``"numba"`` numba JIT, ``"python"`` each Op's NumPy implementation with the full
    graph rewrites except fusion (a fused Composite would run as a Python scalar loop)."""
    if backend == "c":
        return get_mode("FAST_RUN")
    if backend == "numba":
        return get_mode("NUMBA")
    if backend == "python":
        return Mode(VMLinker(use_cloop=False, c_thunks=False), "fast_run").excluding("fusion")
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")


class LazyFunction:
    """A PyTensor function compiled on its first call (many fits never need it); its
    first ``borrow`` outputs are the function's own buffers, overwritten by the next
    call."""

    def __init__(
        self, inputs: list, outputs: list | TensorVariable, mode: Mode, borrow: int = 0
    ) -> None:
        self._graph = (inputs, outputs, mode)
        self._borrow = borrow
        self._fn: Callable | None = None

    def __call__(self, *args):
        if self._fn is None:
            inputs, outputs, mode = self._graph
            if self._borrow:
                outputs = [Out(o, borrow=i < self._borrow) for i, o in enumerate(outputs)]
            self._fn = pymc_compile(inputs, outputs, mode=mode, on_unused_input="ignore")
        return self._fn(*args)


class JointTerms(LazyFunction):
    """``joint_terms``: the joint's K rows, then the extra log-likelihood and the log
    prior. With C thunks (the C backend) the rows are compiled without their
    single-value parameter checks (:func:`ppl_em.rewrites.checks_as_flags`; a row whose
    check fails is returned as ``-inf``, as PyMC's check makes it; NumPy-backed Ops ran
    the unchecked rows 16x slower, measured) and are the compiled function's buffers,
    reused by the next call (fresh 8 MB arrays per row cost as much as computing them,
    measured): a caller reads them before calling again."""

    def __init__(self, inputs: list, rows: list, tail: list, mode: Mode) -> None:
        c_loops = isinstance(mode.linker, VMLinker) and mode.linker.c_thunks
        flags = [pt.constant(True)] * len(rows)
        if c_loops:
            rows, flags = checks_as_flags(rows)
            mode = mode.clone(link_kwargs={"allow_gc": False})
        super().__init__(inputs, [*rows, *flags, *tail], mode, borrow=len(rows) * c_loops)
        self._k = len(rows)

    def __call__(self, *args):
        out = super().__call__(*args)
        k = self._k
        rows = [
            r if ok else np.full_like(r, -np.inf)
            for r, ok in zip(out[:k], out[k : 2 * k], strict=True)
        ]
        return [*rows, *out[2 * k :]]


def one_blas_thread(blas: ThreadpoolController | None):
    """One BLAS thread for an E-step's many small products (the fused pass's dot
    products, an MvNormal's whitening). OpenBLAS's threads spin-wait between calls and
    took the second core from the elementwise work (and, before ``rewrites``, from
    SciPy's own pool). Measured on 2 cores, per EM iteration with the default threads
    against one (two runs each): D=4, K=3: 32-46 -> 16 ms at N=10^5, 195-209 -> 65-97 ms
    at N=10^6; 1-D, K=3, N=10^6: 18.2 -> 13.7 ms. The user's setting is restored."""
    if blas is None:
        return nullcontext()
    return blas.limit(limits=1, user_api="blas")


def _estep_from_joint(
    joint_terms: Callable, blas: ThreadpoolController, fused: Callable
) -> Callable:
    def estep(u, *data):
        with one_blas_thread(blas):
            *rows, extra, logprior = joint_terms(u, *data)
            log_resp, loglik, _ = fused(rows)
        return log_resp, loglik + float(extra), logprior

    return estep


def _joint_from_terms(joint_terms: Callable) -> Callable:
    def joint(u, *data):
        return np.stack(joint_terms(u, *data)[:-2], axis=1)

    return joint


def _is_transpose(x: TensorVariable) -> bool:
    return x.owner is not None and getattr(x.owner.op, "new_order", None) == (1, 0)


def joint_rows(joint: TensorVariable, k: int) -> list[TensorVariable]:
    """The K rows (length N) of the N x K joint, as separate graph outputs.

    The joint is a stack of per-component rows, transposed (:mod:`ppl_em.estep`);
    compiling the rows themselves saves the join that copies them into one K x N array
    (N=10^6, K=3: 17 -> 7-9 ms per evaluation of the graph, measured). A joint built
    otherwise is indexed row by row.
    """
    kn = joint.T
    while _is_transpose(kn) and _is_transpose(kn.owner.inputs[0]):
        kn = kn.owner.inputs[0].owner.inputs[0]
    if kn.owner is not None and isinstance(kn.owner.op, Join):
        axis, *pieces = kn.owner.inputs
        stacked = isinstance(axis, TensorConstant) and int(axis.data) == 0
        if stacked and len(pieces) == k and all(p.type.shape[0] == 1 for p in pieces):
            return [p[0] for p in pieces]
    return [kn[j] for j in range(k)]


def _layout(graph: MixtureGraph) -> FlatLayout:
    values = [graph.value_var(rv) for rv in graph.params]
    # Static shapes when PyMC knows them: model.initial_point() compiles a function.
    static = all(None not in v.type.shape for v in values)
    point = None if static else graph.model.initial_point()
    value_names, shapes, slices, start = [], [], [], 0
    for value in values:
        name = value.name
        shape = tuple(value.type.shape) if static else tuple(np.shape(point[name]))
        size = int(np.prod(shape))
        value_names.append(name)
        shapes.append(shape)
        slices.append(slice(start, start + size))
        start += size
    return FlatLayout(
        rv_names=graph.param_names,
        value_names=tuple(value_names),
        shapes=tuple(shapes),
        slices=tuple(slices),
        size=start,
    )


def _frozen(array: np.ndarray) -> np.ndarray:
    """A read-only copy: the statistics columns derived from the data once per dataset
    (``ppl_em.closed_form.RequestCache``) stay valid only if nobody writes to it."""
    out = np.array(array, copy=True)
    out.flags.writeable = False
    return out


def _data_inputs(graph: MixtureGraph) -> tuple[dict, list, tuple[str, ...], tuple]:
    """Swap each observed constant for a symbolic input of the same static type."""
    replace, inputs, names, arrays = {}, [], [], []
    for rv in graph.model.observed_RVs:
        value = graph.model.rvs_to_values[rv]
        if isinstance(value, TensorConstant):
            sym = value.type(name=f"{rv.name}_data")
            replace[value] = sym
            inputs.append(sym)
            names.append(rv.name)
            arrays.append(_frozen(observed_data(graph.model, rv)))
    return replace, inputs, tuple(names), tuple(arrays)


def flat_replacements(graph: MixtureGraph, layout: FlatLayout, flat: TensorVariable) -> dict:
    return {
        graph.value_var(rv): flat[s].reshape(shape).astype(graph.value_var(rv).dtype)
        for rv, s, shape in zip(graph.params, layout.slices, layout.shapes, strict=True)
    }


def _transform_graphs(graph: MixtureGraph, flat_replace: dict) -> tuple[list, list, list]:
    model = graph.model
    constrained = model.replace_rvs_by_values(list(graph.params))
    inputs, forward = [], []
    for rv in graph.params:
        sym = rv.type(name=f"{rv.name}_constrained")
        inputs.append(sym)
        transform = model.rvs_to_transforms.get(rv)
        if transform is None:
            forward.append(sym)
        else:
            (fwd,) = model.replace_rvs_by_values([transform.forward(sym, *rv.owner.inputs)])
            forward.append(fwd)
    constrained = graph_replace(constrained, flat_replace, strict=False)
    forward = graph_replace(forward, flat_replace, strict=False)
    return constrained, inputs, forward


def build_em_functions(
    graph: MixtureGraph, mode: str = "map", backend: str = "auto", numeric: bool = False
) -> EMFunctions:
    """Compile everything one EM fit of ``graph`` needs (the slow, once-per-model part).

    ``backend`` (see :func:`backend_mode`): ``"auto"`` is ``"python"`` for the E-step
    graph when it has at most ``SMALL_CELLS`` observation-component cells and no
    ``numeric`` M-step is coming, ``"c"`` otherwise; the small parameter transforms use
    ``"python"``, Q and its gradient ``"c"``. A named backend is used for every function
    (``"c"``: fastest per call on a warm cache).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}: 'map' adds the log prior.")
    q_mode = backend_mode("c" if backend == "auto" else backend)
    # The parameter transforms are tiny graphs: NumPy-backed unless a backend is named.
    tiny = backend_mode("python" if backend == "auto" else backend)
    if backend == "auto":
        # A numeric M-step compiles Q and its gradient to C anyway, so the cold start
        # NumPy Ops save is small next to it, while C runs its many E-steps 3x faster
        # (N=10^3, K=3: 0.097 vs 0.029 s to convergence, benchmarks/bench_pymc.py).
        small = graph.n_obs * graph.n_components <= SMALL_CELLS and not numeric
        backend = "python" if small else "c"
    big = backend_mode(backend)
    layout = _layout(graph)
    flat = pt.vector("u", dtype="float64")
    gamma = pt.matrix("gamma", dtype="float64")
    data_replace, data_inputs, data_names, data = _data_inputs(graph)
    replace = {**flat_replacements(graph, layout, flat), **data_replace}

    pieces = objective_graphs(graph)
    joint, extra, logprior = graph_replace(list(pieces), replace, strict=False)
    # 0 * -inf is NaN: a component with zero responsibility contributes nothing.
    expected = pt.sum(pt.switch(pt.gt(gamma, 0), gamma * joint, 0.0)) + extra
    q = expected + logprior if mode == "map" else expected

    constrained, param_inputs, forward = _transform_graphs(graph, replace)

    # One contiguous output per component: the fused E-step reads rows.
    (fast_joint,) = solves_as_products([joint])
    rows = joint_rows(fast_joint, graph.n_components)
    joint_terms = JointTerms([flat, *data_inputs], rows, [extra, logprior], big)
    # Created here, after NumPy's and SciPy's BLAS libraries are loaded.
    blas = ThreadpoolController()
    # The numba pass compiles once (cached on disk like PyTensor's C); NumPy-backed
    # Ops are chosen to compile nothing, so they keep the NumPy pass.
    fused = fused_estep if backend == "python" else compiled_fused_estep
    return EMFunctions(
        graph=graph,
        mode=mode,
        layout=layout,
        data_names=data_names,
        data=data,
        estep=_estep_from_joint(joint_terms, blas, fused),
        joint=_joint_from_terms(joint_terms),
        # Q's gradient graph (numeric M-steps only, evaluated dozens of times per
        # iteration) is C even for small data: NumPy-backed Blockwise gradients of
        # multivariate logps measured 100x slower.
        q_and_grad=LazyFunction([flat, gamma, *data_inputs], [q, pt.grad(q, flat)], q_mode),
        constrain=LazyFunction([flat], constrained, tiny),
        unconstrain=LazyFunction([flat, *param_inputs], forward, tiny),
        joint_terms=joint_terms,
        blas=blas,
        fused=fused,
    )
