"""Chunked (out-of-core) exact EM: ``ppl_em.fit(data={...})`` on memmap, zarr and dask
arrays equals the in-memory fit.

Every case fits the same data twice: in memory (the model declared with all of it) and
streamed chunk by chunk from a file (the model declared with a sample of 300 rows).
Both start from the same point (the default start's k-means sees all the data up to
10^5 rows), so the iterates agree to round-off: the objective to 1e-10 relative and
the parameters to 1e-8. Cases: a closed-form model, an MvNormal model and a model
with a numeric M-step (a mixture of regressions with a covariate), each as an explicit
label and as ``pm.Mixture``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest

import ppl_em
from models import MODELS
from ppl_em.bigdata import StreamedEMResult
from tests.models_for_tests import (
    gaussian_data,
    gaussian_label,
    gaussian_mixture,
    mvnormal_mixture,
)

N = 3000
SAMPLE = 300


def _flat_gaussian_label(x, k=3):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Flat("mu", shape=k)
        sigma = pm.HalfFlat("sigma", shape=k)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return model


def _regression_data_mixture(data):
    """The regression mixture with its covariate as ``pm.Data``: data name ``"xcov"``."""
    covariate, y = data
    with pm.Model() as model:
        xcov = pm.Data("xcov", covariate)
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Normal("alpha", 0.0, 10.0, shape=2)
        beta = pm.Normal("beta", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 3.0, shape=2)
        comps = [pm.Normal.dist(mu=alpha[k] + beta[k] * xcov, sigma=sigma[k]) for k in range(2)]
        pm.Mixture("y", w=w, comp_dists=comps, observed=y)
    return model


def _regression_label(data):
    return MODELS["regression_mixture"].build_model(data)


def _poisson_regression(data):
    """Poisson regression components: the numeric M-step with IRLS's exact Hessian."""
    x, y = data
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, 5.0, shape=2)
        b = pm.Normal("b", 0.0, 5.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(y))
        pm.Poisson("y", mu=pm.math.exp(a[z] + b[z] * x), observed=y)
    return model


def _gaussian_2d(x):
    return MODELS["gaussian_2d"].build_model(x)


def _data(kind: str):
    if kind == "normal":
        return gaussian_data(N, seed=5)
    if kind == "mvnormal":
        return MODELS["gaussian_2d"].default_data(N, seed=6)
    if kind == "counts":
        rng = np.random.default_rng(8)
        x = rng.uniform(-1.0, 1.0, N)
        return x, rng.poisson(np.exp(np.where(rng.random(N) < 0.4, 0.5 + x, 2.0 - 0.5 * x)))
    return MODELS["regression_mixture"].default_data(N, seed=7)


# (model builder, data kind, mode): closed form, MvNormal closed form, numeric M-step,
# a GLM's numeric M-step with its exact Hessian
CASES = {
    "normal-label": (_flat_gaussian_label, "normal", "mle"),
    "normal-mixture": (gaussian_mixture, "normal", "mle"),
    "mvnormal-label": (_gaussian_2d, "mvnormal", "mle"),
    "mvnormal-mixture": (mvnormal_mixture, "mvnormal", "mle"),
    "numeric-label": (_regression_label, "regression", "map"),
    "numeric-mixture": (_regression_data_mixture, "regression", "map"),
    "glm-label": (_poisson_regression, "counts", "map"),
}


def _head(data, n):
    return tuple(d[:n] for d in data) if isinstance(data, tuple) else data[:n]


def _arrays(prepared, data) -> dict:
    """The data by data name (the covariate under each name the model gives it)."""
    names = prepared.functions.data_names
    if not isinstance(data, tuple):
        return {names[0]: data}
    covariate, y = data
    return {name: (y if name == names[0] else covariate) for name in names}


def _memmaps(arrays: dict, tmp_path) -> dict:
    out = {}
    for name, x in arrays.items():
        path = tmp_path / f"{name}.dat"
        mm = np.memmap(path, dtype=x.dtype, mode="w+", shape=x.shape)
        mm[:] = x
        mm.flush()
        out[name] = np.memmap(path, dtype=x.dtype, mode="r", shape=x.shape)
    return out


OPTIONS = {"tol": 1e-10, "progressbar": False}


@pytest.fixture(scope="module")
def fitted():
    """Per case: the in-memory fit and the sample model (compiled once per module)."""
    cache = {}

    def get(case: str):
        if case not in cache:
            build, kind, mode = CASES[case]
            data = _data(kind)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
                whole = ppl_em.fit(build(data), mode=mode, **OPTIONS)
            sample = ppl_em.prepare(build(_head(data, SAMPLE)), mode=mode, backend="c")
            cache[case] = (whole, sample, data)
        return cache[case]

    return get


def assert_same_fit(result, whole, params_rtol=1e-8):
    assert result.objective == pytest.approx(whole.objective, rel=1e-10, abs=0)
    for name, value in whole.params.items():
        np.testing.assert_allclose(result.params[name], value, rtol=params_rtol, atol=params_rtol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_memmap_equals_in_memory(case, fitted, tmp_path):
    whole, sample, data = fitted(case)
    arrays = _memmaps(_arrays(sample, data), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        result = ppl_em.fit(prepared=sample, data=arrays, chunk_size=701, **OPTIONS)
    assert isinstance(result, StreamedEMResult)
    assert result.n_obs == whole.n_obs == N
    assert_same_fit(result, whole)
    assert result.bic() == pytest.approx(whole.bic(), rel=1e-10)
    assert result.log_resp is None


def test_zarr_and_dask_sources_equal_in_memory(fitted, tmp_path):
    import dask.array as da
    import zarr

    whole, sample, x = fitted("normal-mixture")
    z = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=x.shape, chunks=(400,), dtype="f8")
    z[:] = x
    uneven = da.from_array(x, chunks=((100, 1337, 63, 1500),))
    for source, chunk_size in ((z, None), (z, 999), (uneven, None), (uneven, 250)):
        result = ppl_em.fit(prepared=sample, data={"x": source}, chunk_size=chunk_size, **OPTIONS)
        assert_same_fit(result, whole)


def test_responsibilities_of_any_chunk(fitted, tmp_path):
    whole, sample, x = fitted("normal-label")
    result = ppl_em.fit(prepared=sample, data=_memmaps({"x": x}, tmp_path), **OPTIONS)
    with pytest.raises(AttributeError, match="predict_proba"):
        _ = result.responsibilities
    part = result.predict_proba(data={"x": x[1000:1400]})
    np.testing.assert_allclose(part, whole.responsibilities[1000:1400], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(result.predict(data={"x": x[:50]}), whole.predict()[:50])
    chunks = list(result.log_resp_chunks({"x": x}, chunk_size=1000))
    assert [first for first, _ in chunks] == [0, 1000, 2000]
    assert result.icl() == pytest.approx(whole.icl(), rel=1e-9)
    assert "lp_z" not in result.to_inference_data().posterior


def test_squarem_streamed_equals_in_memory(fitted, tmp_path):
    whole, sample, x = fitted("normal-mixture")
    fast = ppl_em.fit(whole.prepared.functions.graph.model, mode="mle", accelerate="squarem",
                      **OPTIONS)  # fmt: skip
    result = ppl_em.fit(prepared=sample, data={"x": x}, chunk_size=500, accelerate="squarem",
                        **OPTIONS)  # fmt: skip
    assert result.n_iter == fast.n_iter
    assert_same_fit(result, fast)


def _with_nan(x, i, tmp_path):
    bad = x.copy()
    bad[i] = np.nan
    return _memmaps({"x": bad}, tmp_path)


def test_bad_value_names_partition_and_observation(fitted, tmp_path):
    _, sample, x = fitted("normal-label")
    with pytest.raises(ppl_em.DataError, match=r"partition 2 at observation 1234 .*not finite"):
        ppl_em.fit(prepared=sample, data=_with_nan(x, 1234, tmp_path), chunk_size=500, **OPTIONS)


def test_out_of_support_names_partition_and_observation(tmp_path):
    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.poisson(2.0, 1500), rng.poisson(15.0, 1500)])
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 2.0, 0.2, shape=2)
        pm.Mixture("counts", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=counts[:300])
    bad = counts.copy()
    bad[2222] = -3
    where = r"partition 4 \(rows 2000..2499\).*observation 2222"
    with pytest.raises(ppl_em.DataError, match=where):
        ppl_em.fit(model, data={"counts": bad}, chunk_size=500, start={"mu": [2.0, 15.0]},
                   progressbar=False)  # fmt: skip


def test_data_checked_against_the_model(fitted):
    _, sample, data = fitted("numeric-mixture")
    covariate, y = data
    with pytest.raises(ppl_em.DataError, match=r"missing \['xcov'\]"):
        ppl_em.fit(prepared=sample, data={"y": y}, progressbar=False)
    with pytest.raises(ppl_em.DataError, match="not per-observation arrays"):
        ppl_em.fit(prepared=sample, data={"y": y, "xcov": covariate, "other": y}, progressbar=False)
    with pytest.raises(ppl_em.DataError, match="every axis but the first"):
        ppl_em.fit(prepared=sample, data={"y": y[:, None], "xcov": covariate}, progressbar=False)
    with pytest.raises(ppl_em.DataError, match="one row per observation"):
        ppl_em.fit(prepared=sample, data={"y": y, "xcov": covariate[:-1]}, progressbar=False)
    with pytest.raises(TypeError, match="shape, dtype and row slicing"):
        ppl_em.fit(prepared=sample, data={"y": list(y), "xcov": covariate}, progressbar=False)
    with pytest.raises(ValueError, match="chunk_size"):
        ppl_em.fit(prepared=sample, data={"y": y, "xcov": covariate}, chunk_size=0)
    with pytest.raises(ValueError, match="method="):
        ppl_em.fit(prepared=sample, data={"y": y, "xcov": covariate}, method="minibatch")


@pytest.mark.slow
def test_memory_is_bounded_by_the_chunk(tmp_path):
    """A streamed fit's allocations do not grow with N: the peak traced by tracemalloc
    on 4x the data is that on 1x (both above the start's 10^5-row sample)."""
    import tracemalloc

    x = gaussian_data(600_000, seed=9)
    prepared = ppl_em.prepare(gaussian_label(x[:SAMPLE]), backend="c")
    peaks = {}
    for n in (150_000, 600_000):
        path = tmp_path / f"x{n}.dat"
        mm = np.memmap(path, dtype=float, mode="w+", shape=(n,))
        mm[:] = x[:n]
        mm.flush()
        data = {"x": np.memmap(path, dtype=float, mode="r", shape=(n,))}
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
            ppl_em.fit(prepared=prepared, data=data, chunk_size=10_000, max_iter=3,
                       progressbar=False)  # fmt: skip
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 4x the data, not 4x the memory (450,000 more float64 alone would be 3.6 MB).
    assert peaks[600_000] < peaks[150_000] + 1_000_000


def test_marginal_ascents_streamed_equal_in_memory(tmp_path):
    """A logistic-regression mixture, where EM alone crawls: the ascents of
    ``accelerate="auto"`` (an E-step and a Q gradient per evaluation, each a pass over
    the chunks) run on data streamed from disk as on the data in memory."""
    from tests.test_glm import _data, _model

    x, y = _data("bernoulli", n=N)
    whole = ppl_em.fit(_model("bernoulli", x, y), **OPTIONS)
    sample = ppl_em.prepare(_model("bernoulli", x[:SAMPLE], y[:SAMPLE]))
    arrays = _memmaps(_arrays(sample, (x, y)), tmp_path)
    result = ppl_em.fit(prepared=sample, data=arrays, chunk_size=701, **OPTIONS)
    assert whole.converged and result.converged
    assert result.n_iter == whole.n_iter < 100  # EM alone took 1109 iterations at N=1500
    # L-BFGS's path carries the chunked sums' rounding further than EM's steps (2.6e-8
    # apart in one CI run): both stop by EM's rule, within 1e-3 standard errors of the
    # optimum; 1e-6 is below a thousandth of any posterior sd here.
    assert_same_fit(result, whole, params_rtol=1e-6)
