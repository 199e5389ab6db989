"""The numba E-step pass (ppl_em.steps.kernel) against NumPy and SciPy.

Its own ``exp`` and ``log`` are checked in ulp against NumPy's; the whole pass against
the NumPy pass it replaces and against SciPy's logsumexp; a fit on the compiled backend
against the same fit on the NumPy-backed one.
"""

import numpy as np
import pytest
from scipy.special import logsumexp

import ppl_em
from ppl_em.steps import cores, kernel, passes
from tests.test_perf_correctness import _flat_gaussian_mixture


def _ulp_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got - want) / np.spacing(np.abs(want))


def _exp(d: np.ndarray) -> np.ndarray:
    n = d.size
    out, bits = np.empty(n), np.empty(n, dtype=np.int64)
    kernel.exp_shifted(d, np.zeros(n), out, bits, n)
    return out


def _log(x: np.ndarray) -> np.ndarray:
    n = x.size
    out, bits = np.empty(n), np.empty(n, dtype=np.int64)
    kernel.log_positive(x, out, bits, n)
    return out


def test_exp_within_two_ulp_of_numpy():
    rng = np.random.default_rng(0)
    d = np.concatenate(
        [
            -rng.exponential(1.0, 200_000),
            -rng.uniform(0, 700, 200_000),
            -np.abs(rng.normal(0, 1e-8, 10_000)),
            [0.0, -0.5 * np.log(2), -np.log(2), -1e-300, -707.9],
        ]
    )
    assert _ulp_error(_exp(d), np.exp(d)).max() <= 2.0


def test_exp_underflow_and_special_values():
    d = np.array([-708.5, -745.0, -1e10, -np.inf, np.nan, 0.0])
    got = _exp(d)
    # below the floor exp is set to 0 (np.exp gives < 3e-308 there)
    np.testing.assert_array_equal(got[:4], 0.0)
    assert np.isnan(got[4]) and got[5] == 1.0


def test_log_within_three_ulp_of_numpy():
    rng = np.random.default_rng(1)
    sums = rng.uniform(1.0, 8.0, 200_000)  # row sums of exp(joint - max) lie in [1, K]
    x = np.concatenate(
        [
            sums,
            np.exp(rng.uniform(-700, 700, 100_000)),
            [np.sqrt(2.0), np.nextafter(np.sqrt(2.0), 2), 2.0, 1e-300, 1e300],
        ]
    )
    got, want = _log(x), np.log(x)
    # the division in atanh's argument costs up to 3 ulp just above 1 (measured)
    assert _ulp_error(got, want).max() <= 3.0
    # what the E-step adds to the row max: absolute error under one ulp of log(8)
    assert np.abs(_log(sums) - np.log(sums)).max() <= 4.5e-16
    near_one = 1.0 + rng.uniform(-1e-6, 1e-6, 10_000)
    assert np.abs(_log(near_one) - np.log(near_one)).max() <= 1e-21
    assert _log(np.array([1.0]))[0] == 0.0
    assert np.isnan(_log(np.array([np.nan]))[0])


def _joint(rng, n: int, k: int) -> np.ndarray:
    joint = rng.normal(size=(k, n)) * 6 - 3
    if k > 1:  # a component that cannot produce one observation
        joint[0, 5] = -np.inf
    joint[:, 7] = joint[:, 7] - 800.0  # far in the tail: the row max keeps it finite
    return joint


# A K x N joint is read as one array: one numba type for every K
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("m", [0, 1, 5])
def test_pass_equals_numpy_pass_and_scipy(k, m):
    rng = np.random.default_rng(10 * k + m)
    n = 3 * kernel.BLOCK + 17  # not a multiple of the block
    joint = _joint(rng, n, k)
    cols = rng.normal(size=(m, n)) * 3 + 1
    log_resp, loglik, nk, s = kernel.compiled_fused_estep(joint.copy(), cols)
    ref_resp, ref_loglik, ref_nk, ref_s = passes.fused_estep(joint.copy(), cols)

    lse = logsumexp(joint, axis=0)
    np.testing.assert_allclose(log_resp, (joint - lse).T, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(log_resp, ref_resp, rtol=1e-13, atol=1e-13)
    assert loglik == pytest.approx(lse.sum(), rel=1e-13)
    assert loglik == pytest.approx(ref_loglik, rel=1e-13)
    gamma = np.exp(joint - lse)
    np.testing.assert_allclose(nk, gamma.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(nk, ref_nk, rtol=1e-12)
    assert s.shape == (m, k)
    np.testing.assert_allclose(s, cols @ gamma.T, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(s, ref_s, rtol=1e-11, atol=1e-11)


def test_rows_input_leaves_rows_alone_and_equals_matrix_input():
    rng = np.random.default_rng(7)
    joint = _joint(rng, 2 * kernel.BLOCK + 3, 3)
    rows = [r.copy() for r in joint]
    cols = rng.normal(size=(2, joint.shape[1]))
    from_rows = kernel.compiled_fused_estep(rows, cols)
    from_matrix = kernel.compiled_fused_estep(joint.copy(), cols)
    np.testing.assert_array_equal(np.stack(rows), joint)  # read only
    np.testing.assert_array_equal(from_rows[0], from_matrix[0])
    assert from_rows[1] == from_matrix[1]
    np.testing.assert_array_equal(from_rows[3], from_matrix[3])
    with pytest.raises(ValueError, match="different lengths"):
        kernel.compiled_fused_estep([rows[0], rows[1][:-1]])


def _array_signatures() -> int:
    """How many of the kernel's compiled types take the rows as one 2-D array."""
    return sum(getattr(sig[0], "ndim", 0) == 2 for sig in kernel._run.signatures)


def test_rows_of_one_buffer_are_read_as_that_array_for_every_k():
    """Rows written into one K x N buffer (``steps/mvn_rows.py`` returns ``list(buffer)``)
    reach numba as that array, one compiled type for every K (a tuple of K rows is one
    per K), and stay unchanged: the log-responsibilities go to a new array. The values
    are the tuple's bit for bit and SciPy's to rounding."""
    rng = np.random.default_rng(11)
    for k in (3, 2, 5):
        buf = _joint(rng, kernel.BLOCK + 9, k)
        before, cols = buf.copy(), rng.normal(size=(2, buf.shape[1]))
        assert kernel._as_rows(list(buf), True)[0] is buf
        log_resp, loglik, nk, s = kernel.compiled_fused_estep(list(buf), cols)
        np.testing.assert_array_equal(buf, before)
        assert not np.shares_memory(log_resp, buf)
        lse = logsumexp(buf, axis=0)
        np.testing.assert_allclose(log_resp, (buf - lse).T, rtol=1e-13, atol=1e-13)
        assert loglik == pytest.approx(lse.sum(), rel=1e-13)
        gamma = np.exp(buf - lse)
        np.testing.assert_allclose(nk, gamma.sum(axis=1), rtol=1e-12)
        np.testing.assert_allclose(s, cols @ gamma.T, rtol=1e-11, atol=1e-11)
        if k == 3:  # the tuple's type for K=3 is compiled by this file's other tests
            tupled = kernel.compiled_fused_estep([r.copy() for r in buf], cols)
            np.testing.assert_array_equal(log_resp, tupled[0])
            assert loglik == tupled[1]
            np.testing.assert_array_equal(nk, tupled[2])
            np.testing.assert_array_equal(s, tupled[3])
    assert _array_signatures() == 1
    # Rows of a buffer out of order, or of two buffers, are not one array's rows.
    assert isinstance(kernel._as_rows(list(buf[::-1]), True)[0], tuple)
    assert isinstance(kernel._as_rows([*buf[:2], buf[2].copy()], True)[0], tuple)


@pytest.mark.parametrize("n", [5, 64, kernel.BLOCK + 65, 3 * kernel.BLOCK])
def test_without_log_resp_same_loglik_and_stats(n):
    """keep=False takes one log per 16 observations (of products of row sums): the
    same log-likelihood to round-off and the same statistics bit for bit."""
    rng = np.random.default_rng(n)
    joint = _joint(rng, n, 3) if n > 7 else rng.normal(size=(3, n))
    cols = rng.normal(size=(3, n))
    kept = kernel.compiled_fused_estep([r for r in joint], cols)
    lean = kernel.compiled_fused_estep([r for r in joint], cols, keep=False)
    assert lean[0] is None
    assert lean[1] == pytest.approx(logsumexp(joint, axis=0).sum(), rel=1e-14)
    assert lean[1] == pytest.approx(kept[1], rel=1e-14)
    np.testing.assert_array_equal(lean[2], kept[2])
    np.testing.assert_array_equal(lean[3], kept[3])


def test_block_log_of_products_does_not_overflow():
    """16 row sums per lane: even sums of 10^15 (K = 10^15 components) multiply to
    10^240, still finite."""
    rng = np.random.default_rng(8)
    for n in (kernel.BLOCK, 100, 3):
        tot = 10 ** rng.uniform(0, 15, n)
        lanes, bits = np.empty((2, kernel.LANES)), np.empty(kernel.BLOCK, dtype=np.int64)
        got = kernel._sum_log(tot, n, lanes, bits)
        assert got == pytest.approx(np.log(tot).sum(), rel=1e-14)


def test_row_no_component_explains_is_nan_as_in_numpy():
    rng = np.random.default_rng(2)
    joint = _joint(rng, 500, 3)
    joint[:, 9] = -np.inf
    log_resp, loglik, _, _ = kernel.compiled_fused_estep(joint.copy())
    ref_resp, ref_loglik, _, _ = passes.fused_estep(joint.copy())
    assert np.isnan(log_resp[9]).all() and np.isnan(ref_resp[9]).all()
    assert np.isnan(loglik) and np.isnan(ref_loglik)


def test_pass_overwrites_its_input_and_accepts_no_columns():
    joint = _joint(np.random.default_rng(3), 100, 2)
    work = joint.copy()
    log_resp, _, nk, s = kernel.compiled_fused_estep(work)
    assert np.shares_memory(log_resp, work)
    assert s.shape == (0, 2)
    np.testing.assert_allclose(nk.sum(), 100, rtol=1e-13)


def test_two_threads_equal_one():
    """The two halves are summed in a fixed order: same numbers as one thread, up to
    summation order, and the same log-responsibilities bit for bit."""
    rng = np.random.default_rng(4)
    n = 20 * kernel.BLOCK + 5
    joint, cols = _joint(rng, n, 3), rng.normal(size=(2, n))
    serial = kernel.compiled_fused_estep(joint.copy(), cols, workers=1)
    threaded = kernel.compiled_fused_estep(joint.copy(), cols, workers=2)
    np.testing.assert_array_equal(serial[0], threaded[0])
    assert threaded[1] == pytest.approx(serial[1], rel=1e-13)
    np.testing.assert_allclose(threaded[2], serial[2], rtol=1e-13)
    np.testing.assert_allclose(threaded[3], serial[3], rtol=1e-12)


def test_error_in_worker_thread_reaches_the_caller():
    """The pass's halves run through ``run_split``: an error in the second half's
    thread is re-raised in the caller's."""

    def broken(j):
        if j == 1:
            raise RuntimeError("second half failed")
        return 0.0

    with pytest.raises(RuntimeError, match="second half"):
        cores.run_split(broken, 2)


def test_compiled_backend_fit_equals_python_backend():
    """backend="c" runs the numba pass, backend="python" the NumPy one: same fit.
    Closed-form M-steps only: an L-BFGS M-step stops on a tolerance and would blur the
    comparison (its inner iterations differ with the last bits of the statistics)."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-3, 1, 700), rng.normal(0, 0.5, 500), rng.normal(4, 2, 800)])
    start = {"w": np.ones(3) / 3, "mu": [-2.0, 0.0, 2.0], "sigma": np.ones(3)}
    fits = {}
    for backend in ("c", "python"):
        prepared = ppl_em.prepare(_flat_gaussian_mixture(x), backend=backend, mstep="closed")
        # compiled_rows: the E-step runs kernel.compiled_fused_estep, else passes.fused_estep
        assert prepared.functions.compiled_rows is (backend == "c")
        fits[backend] = ppl_em.fit(prepared=prepared, start=start, tol=1e-10, progressbar=False)
    c, py = fits["c"], fits["python"]
    assert c.converged and c.n_iter == py.n_iter
    assert c.loglik == pytest.approx(py.loglik, rel=1e-13)
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(c.params[name], py.params[name], rtol=1e-10)
