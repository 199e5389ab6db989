"""The joint graph's speed rewrites keep its value: triangular solves with many
right-hand sides become products with the inverted factor (checked against SciPy's
MvNormal density), single-value parameter checks become per-row flags (a failed check
still gives -inf), and the E-step's one-thread BLAS limit is undone afterwards."""

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
import pytest
from pymc.logprob.utils import CheckParameterValue
from pymc.pytensorf import compile as pymc_compile
from pytensor.graph.replace import graph_replace
from pytensor.graph.traversal import applys_between, graph_inputs
from pytensor.scalar import Softplus
from pytensor.scalar.math import Sigmoid
from pytensor.tensor.slinalg import SolveTriangular
from scipy import stats
from scipy.special import log_expit

import ppl_em
import ppl_em.steps.estep as estep_module
from ppl_em.compiled.functions import backend_mode
from ppl_em.compiled.layout import flat_replacements
from ppl_em.compiled.rewrites import MANY_RHS, solves_as_products
from ppl_em.em import apply_start, default_start, em_init
from ppl_em.model import joint_rows
from ppl_em.steps import e_step, joint, whole_data
from ppl_em.steps.glm_rows import WrittenRows
from ppl_em.steps.mvn_rows import WrittenMvnRows
from tests.conftest import numpy_ops
from tests.test_glm import _data, _model
from tests.test_mvnormal import _chol_from_flat, blobs, flat_cholesky_mixture, gaussian_2d_label


def _solves(outputs) -> list:
    """Triangular solves in ``outputs``' graph, Blockwise-wrapped or not."""
    found = []
    for node in applys_between(list(graph_inputs(outputs)), outputs):
        op = getattr(node.op, "core_op", node.op)
        if isinstance(op, SolveTriangular):
            found.append(node)
    return found


def _compiled(functions):
    """``functions`` with the rows compiled from the graph, where ``prepare`` swapped in
    written ones (``ppl_em.steps.glm_rows``, ``ppl_em.steps.mvn_rows``)."""
    rows = functions.rows
    written = isinstance(rows, WrittenRows | WrittenMvnRows)
    return functions._replace(rows=rows.graph_rows if written else rows)


def _rows_graph(functions):
    """The rows' graph as handed to the compiler (rewritten): ``(inputs, outputs, mode)``."""
    return _compiled(functions).rows.graph


def _plain_rows(functions) -> tuple[list, list]:
    """``(inputs, rows)``: the same rows as built from the model, before any rewrite."""
    flat = pt.vector("u", dtype="float64")
    replace = flat_replacements(functions.graph, functions.layout, flat)
    rows = graph_replace(joint_rows(functions.graph, functions.spec), replace, strict=False)
    return [flat, *functions.spec.inputs], rows


def _rhs_rows(inputs, nodes, u, data) -> list[int]:
    """The first dimension of each solve's right-hand side when the rows are evaluated
    over ``data`` (the graph's data inputs have no static length)."""
    with numpy_ops():
        shapes = pytensor.function(
            inputs, [node.inputs[1].shape[0] for node in nodes], on_unused_input="ignore"
        )
    return [int(s) for s in shapes(u, *data)] if nodes else []


def test_mixture_joint_equals_scipy_after_rewrite():
    k, d, n = 3, 4, 2 * MANY_RHS
    x = blobs(n, k, d)
    functions, _ = ppl_em.prepare(flat_cholesky_mixture(x, k), mode="mle")
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(k))
    mu, sd = rng.normal(size=(k, d)), rng.uniform(0.5, 2.0, size=(k, d))
    off = rng.normal(scale=0.3, size=(k, d * (d - 1) // 2))
    start = {"w": w, "mu": mu, "sd": sd, "off": off}
    u = apply_start(functions, start, np.zeros(functions.layout.size))
    chol = _chol_from_flat(sd, off)
    expected = np.stack(
        [np.log(w[j]) + stats.multivariate_normal(mu[j], chol[j] @ chol[j].T).logpdf(x)
         for j in range(k)], axis=1,
    )  # fmt: skip
    assert isinstance(functions.rows, WrittenMvnRows)
    np.testing.assert_allclose(joint(functions, u), expected, rtol=1e-12)
    np.testing.assert_allclose(joint(_compiled(functions), u), expected, rtol=1e-12)
    # the compiled joint has only the D x D inversions left (identity right-hand side)
    _, outputs, _ = _rows_graph(functions)
    for node in _solves(outputs):
        assert node.inputs[1].type.shape[-1] == d and node.inputs[1].type.shape[0] == d


def test_label_model_rewritten_and_unchanged():
    model = gaussian_2d_label(n=300)
    model_joint, config = ppl_em.prepare(model, mode="map")
    u = default_start(model_joint, config, np.random.default_rng(1))
    inputs, outputs, _ = _rows_graph(model_joint)
    # The rows take chunks of any length, so the length of a solve's right-hand side is
    # read off the graph evaluated over the data (N = 300), not its static type.
    data = model_joint.data
    full = model_joint.rows.full_args((u, *data))[1:]  # with the hoisted data terms
    assert not any(rows == 300 for rows in _rhs_rows(inputs, _solves(outputs), u, full))
    # the same rows as built from the model, before the rewrite, give the same joint
    plain_inputs, plain_rows = _plain_rows(model_joint)
    assert any(rows == 300 for rows in _rhs_rows(plain_inputs, _solves(plain_rows), u, data))
    with numpy_ops():  # a reference evaluated once: not worth compiling C for (23 s cold)
        plain = pytensor.function(plain_inputs, plain_rows, on_unused_input="ignore")
    np.testing.assert_allclose(joint(model_joint, u), np.stack(plain(u, *data), axis=1), rtol=1e-12)


def test_per_observation_factors_are_left_alone():
    """A factor per observation (batch N) is not one shared factor: no product form."""
    n, d = 2 * MANY_RHS, 2
    chol = pt.tensor("chol", shape=(n, d, d))
    b = pt.tensor("b", shape=(n, d))
    (solved,) = solves_as_products([pt.linalg.solve_triangular(chol, b[..., None])[..., 0]])
    assert len(_solves([solved])) == 1
    shared = pt.tensor("shared", shape=(1, d, d))
    solve = pt.vectorize(
        lambda a, v: pt.linalg.solve_triangular(a, v, lower=True), "(m,m),(m)->(m)"
    )
    (rewritten,) = solves_as_products([solve(shared, b)])
    rng = np.random.default_rng(2)
    a = np.tril(rng.normal(size=(1, d, d))) + 3 * np.eye(d)
    v = rng.normal(size=(n, d))
    expected = np.linalg.solve(a[0], v.T).T
    np.testing.assert_allclose(rewritten.eval({shared: a, b: v}), expected, rtol=1e-12)
    assert all(node.inputs[1].type.shape[0] == d for node in _solves([rewritten]))


def _blas_threads(functions) -> list[int]:
    return [p["num_threads"] for p in functions.blas.info() if p["user_api"] == "blas"]


def test_estep_runs_with_one_blas_thread_and_restores_it(monkeypatch):
    x = blobs(300, 2, 2)
    seen = []

    def spy(real):
        def run(*args, **kwargs):
            seen.append(_blas_threads(functions))
            return real(*args, **kwargs)

        return run

    # The E-step picks its pass when it runs (the numba kernel over these rows, which
    # are written out, the NumPy pass over NumPy-backed ones); both E-step entry points
    # (the EM loop's em_init and e_step) must call it with one BLAS thread.
    for name in ("fused_estep", "compiled_fused_estep"):
        monkeypatch.setattr(estep_module, name, spy(getattr(estep_module, name)))
    functions, config = ppl_em.prepare(flat_cholesky_mixture(x, 2), mode="mle")
    u = default_start(functions, config, None)
    # two threads outside, whatever this machine's default, so the check can fail
    with functions.blas.limit(limits=2, user_api="blas"):
        before = _blas_threads(functions)
        em_init(functions, u, config)
        e_step(functions, u, whole_data(functions), keep_resp=True)
        after = _blas_threads(functions)
    assert before and all(n == 2 for n in before)
    assert len(seen) == 2 and all(n == 1 for threads in seen for n in threads)
    assert after == before


def _label_normal(x, k, backend):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Flat("mu", shape=k)
        sigma = pm.Flat("sigma", shape=k)  # unconstrained: sigma <= 0 reachable
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return ppl_em.prepare(model, mode="mle", backend=backend).functions


@pytest.mark.parametrize("backend", ["c", "python"])
def test_failed_parameter_check_still_gives_minus_inf(backend):
    """With the C backend the rows are compiled without PyMC's sigma > 0 check, which
    comes back as a flag: either way a component with sigma <= 0 gives -inf."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=400)
    functions = _label_normal(x, 3, backend)
    _, outputs, _ = _rows_graph(functions)
    rows = outputs[:3]
    checked = any(
        isinstance(node.op, CheckParameterValue)
        for node in applys_between(list(graph_inputs(rows)), rows)
    )
    # C loops only: NumPy-backed Ops keep PyMC's checks (they were slower without)
    assert checked == (backend == "python")
    w, mu = np.array([0.2, 0.3, 0.5]), np.array([-1.0, 0.0, 2.0])
    for sigma in ([1.0, 0.5, 2.0], [1.0, -0.5, 2.0], [1.0, 0.0, 2.0]):
        u = apply_start(
            functions, {"w": w, "mu": mu, "sigma": sigma}, np.zeros(functions.layout.size)
        )
        matrix = joint(functions, u)
        for j in range(3):
            if sigma[j] > 0:
                expected = np.log(w[j]) + stats.norm.logpdf(x, mu[j], sigma[j])
                np.testing.assert_allclose(matrix[:, j], expected, rtol=1e-13)
            else:
                assert np.all(matrix[:, j] == -np.inf)
        # the compiled row buffers are reused; a joint returned before is the caller's
        before = matrix.copy()
        joint(functions, u + 0.1)
        np.testing.assert_array_equal(matrix, before)


def _logistic_mixture(backend: str):
    rng = np.random.default_rng(5)
    x = rng.uniform(-2.0, 2.0, 500)
    y = (rng.random(500) < 0.5).astype(int)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Flat("a", shape=2)
        b = pm.Flat("b", shape=2)
        z = pm.Categorical("z", p=w, shape=x.size)
        pm.Bernoulli("y", logit_p=a[z] + b[z] * x, observed=y)
    return x, y, ppl_em.prepare(model, mode="mle", backend=backend).functions


def _logistic_point(functions, w, a, b) -> np.ndarray:
    """``u`` at these values; ``a`` and ``b`` (Flat: no transform) may be infinite or
    NaN, which a start refuses."""
    u = apply_start(functions, {"w": w}, np.zeros(functions.layout.size))
    layout = functions.layout
    for name, value in (("a", a), ("b", b)):
        u[layout.slices[layout.rv_names.index(name)]] = value
    return u


def _scalar_ops(outputs, kind) -> int:
    nodes = applys_between(list(graph_inputs(outputs)), outputs)
    return sum(isinstance(getattr(n.op, "scalar_op", None), kind) for n in nodes)


@pytest.mark.parametrize("backend", ["c", "python"])
def test_a_logistic_component_takes_one_softplus_per_observation(backend):
    """PyMC's Bernoulli on ``logit_p`` computes both ``log(p)`` and ``log1p(-p)`` of
    ``p = sigmoid(eta)`` and checks ``0 <= p <= 1`` on every element; the rows take one
    softplus per element and component, no sigmoid, and equal the rows as PyMC builds
    them (compiled by the same backend) bit for bit, and SciPy's log-sigmoid: at
    ordinary, large and infinite predictors. A NaN predictor still fails the check."""
    x, y, functions = _logistic_mixture(backend)
    _, outputs, _ = _rows_graph(functions)
    plain_inputs, plain_rows = _plain_rows(functions)
    assert _scalar_ops(plain_rows, Sigmoid) > 0
    assert _scalar_ops(outputs[:2], Sigmoid) == 0
    assert _scalar_ops(outputs[:2], Softplus) == 2
    # compiled as the rows are: PyMC's compile makes a failed check -inf
    plain = pymc_compile(plain_inputs, plain_rows, mode=backend_mode(backend))
    w = np.array([0.3, 0.7])
    for a, b in [([0.5, -1.0], [2.0, -3.0]), ([30.0, -2.0], [400.0, -400.0]),
                 ([np.inf, 0.0], [1.0, -1.0]), ([0.0, -np.inf], [0.0, 0.0])]:  # fmt: skip
        u = _logistic_point(functions, w, a, b)
        rows = joint(_compiled(functions), u)
        np.testing.assert_array_equal(rows, np.stack(plain(u, *functions.data), axis=1))
        eta = np.asarray(a)[None, :] + np.asarray(b)[None, :] * x[:, None]
        with np.errstate(invalid="ignore"):
            expected = np.log(w) + np.where(y[:, None] == 1, log_expit(eta), log_expit(-eta))
        np.testing.assert_allclose(rows, expected, rtol=1e-13, atol=0)
        # the rows an E-step reads, written out (ppl_em.steps.glm_rows)
        np.testing.assert_allclose(joint(functions, u), expected, rtol=1e-13, atol=0)
    u = _logistic_point(functions, w, [np.nan, 0.0], [1.0, 1.0])
    rows = joint(_compiled(functions), u)
    np.testing.assert_array_equal(rows, np.stack(plain(u, *functions.data), axis=1))
    assert np.all(rows[:, 0] == -np.inf) and np.all(np.isfinite(rows[:, 1]))
    np.testing.assert_allclose(joint(functions, u), rows, rtol=1e-13, atol=0)


@pytest.mark.parametrize("form", ["label", "list", "batched"])
def test_each_form_of_a_logistic_mixture_takes_the_softplus_rows(form):
    """The label, list and batched forms a user writes (``tests/test_glm.py``) give
    SciPy's log-sigmoid at ordinary and at large predictors. In the first two PyTensor's
    own rewrites make PyMC's rows the same softplus (equal bit for bit); in the batched
    one each component's ``p`` is a column of one ``sigmoid`` of an (N, 2) predictor,
    which PyTensor leaves as ``log(sigmoid(x))``: 6e-14 off at ordinary predictors and
    ``-inf`` where ``sigmoid`` rounds to 0 or 1, where the rows stay right."""
    x, y = _data("bernoulli", n=300)
    functions = ppl_em.prepare(_model("bernoulli", x, y, form=form)).functions
    _, outputs, mode = _rows_graph(functions)
    assert (_scalar_ops(outputs[:2], Sigmoid), _scalar_ops(outputs[:2], Softplus)) == (0, 2)
    plain_inputs, plain_rows = _plain_rows(functions)
    plain = pymc_compile(plain_inputs, plain_rows, mode=mode)
    for scale in (2.0, 200.0):
        u = np.random.default_rng(4).normal(0.0, scale, functions.layout.size)
        rows = joint(_compiled(functions), u)
        values = dict(zip(functions.layout.rv_names, functions.constrain(u), strict=True))
        eta = values["a"][None, :] + values["b"][None, :] * x[:, None]
        expected = np.log(values["w"]) + np.where(y[:, None] == 1, log_expit(eta), log_expit(-eta))
        np.testing.assert_allclose(rows, expected, rtol=1e-13, atol=0)
        np.testing.assert_allclose(joint(functions, u), expected, rtol=1e-13, atol=0)
        theirs = np.stack(plain(u, *functions.data), axis=1)
        if form != "batched":
            np.testing.assert_array_equal(rows, theirs)
        elif scale > 100:
            assert np.isinf(theirs).any()
