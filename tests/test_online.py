"""Online EM (Cappé & Moulines 2009): ``ppl_em.fit(data=..., method="online")``.

One pass over simulated data reaches the batch optimum's log-likelihood within 1e-4
relative; the step sizes ``rho_t = (t + t0)^-kappa`` decrease monotonically; models with
numeric M-steps and bad options are refused with messages that say what to do.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytest

import ppl_em
from models import MODELS
from ppl_em.em.online import OnlineOptions, step_size
from tests.models_for_tests import gaussian_data, gaussian_mixture

N = 200_000
SAMPLE = 500


@pytest.fixture(scope="module")
def gaussian():
    x = gaussian_data(N, seed=11)
    batch = ppl_em.fit(gaussian_mixture(x), mode="mle", progressbar=False)
    sample = ppl_em.prepare(gaussian_mixture(x[:SAMPLE]), mode="mle", backend="c")
    return x, batch, sample


def _gap(result, batch) -> float:
    return (batch.loglik - result.loglik) / abs(batch.loglik)


@pytest.mark.parametrize(
    "online_kwargs",
    [None, {"average": True, "burn_in": 5}, {"kappa": 1.0, "t0": 2.0}, {"warm_start": False}],
)
def test_within_1e4_of_the_batch_optimum(gaussian, online_kwargs):
    x, batch, sample = gaussian
    result = ppl_em.fit(prepared=sample, data={"x": x}, method="online", batch_size=2_000,
                        online_kwargs=online_kwargs)  # fmt: skip
    assert result.method == "online" and result.n_obs == N
    assert result.diagnostics["online"]["loglik"] == "exact"
    # The batch optimum is the maximum: online EM lands just below it.
    assert 0.0 <= _gap(result, batch) < 1e-4
    for name, value in batch.params.items():
        np.testing.assert_allclose(result.params[name], value, rtol=0.05, atol=0.02)


def test_a_stream_is_read_once_and_rebatched(gaussian):
    x, batch, sample = gaussian
    reads = []

    def stream():
        for a in range(0, N, 3_000):
            reads.append(a)
            yield {"x": x[a : a + 3_000]}

    result = ppl_em.fit(prepared=sample, data=stream(), method="online", batch_size=2_000)
    assert reads == list(range(0, N, 3_000))
    assert result.n_obs == N
    assert result.diagnostics["online"]["n_batches"] == N // 2_000
    # A stream's log-likelihood is prequential (each batch's before its update); the
    # estimate's own, evaluated after the fact, is within 1e-4 of the optimum.
    assert result.diagnostics["online"]["loglik"] == "prequential"
    assert result.loglik < batch.loglik
    exact = result.loglik_of({"x": x})
    assert 0.0 <= (batch.loglik - exact) / abs(batch.loglik) < 1e-4


def test_step_sizes_decrease_monotonically(gaussian):
    x, _, sample = gaussian
    kwargs = {"kappa": 0.7, "t0": 3.0}
    result = ppl_em.fit(prepared=sample, data={"x": x[:50_000]}, method="online",
                        batch_size=1_000, online_kwargs=kwargs)  # fmt: skip
    steps = result.diagnostics["online"]["step_sizes"]
    assert len(steps) == 50 and steps[0] == 1.0
    assert np.all(np.diff(steps) < 0)
    t = np.arange(2, 51)
    np.testing.assert_allclose(steps[1:], (t + 3.0) ** -0.7, rtol=1e-15)
    assert step_size(1, OnlineOptions()) == 1.0


def test_mvnormal_online(tmp_path):
    module = MODELS["gaussian_2d"]
    x = module.default_data(60_000, seed=4)
    batch = ppl_em.fit(module.build_model(x), mode="mle", progressbar=False)
    sample = module.build_model(x[:SAMPLE])
    result = ppl_em.fit(sample, mode="mle", data={"x": x}, method="online", batch_size=1_000)
    assert 0.0 <= _gap(result, batch) < 1e-4


def test_refuses_models_with_numeric_m_steps():
    """Poisson regressions have no statistics that give Q (a Gaussian regression has)."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.0, 1.0, 600)
    y = rng.poisson(np.exp(np.where(rng.random(600) < 0.5, 0.5 + x, 2.0 - x)))
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Normal("alpha", 0.0, 5.0, shape=2)
        beta = pm.Normal("beta", 0.0, 5.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(y))
        pm.Poisson("y", mu=pm.math.exp(alpha[z] + beta[z] * x), observed=y)
    with pytest.raises(ppl_em.ClosedFormUnavailableError, match=r"\['alpha', 'beta'\]"):
        ppl_em.fit(model, data={"y": y, "y_const0": x}, method="online")
    regression = MODELS["regression_mixture"].build_model()
    x, y = MODELS["regression_mixture"].default_data()
    with pytest.raises(ppl_em.ClosedFormUnavailableError, match="method='batch'"):
        ppl_em.fit(regression, data={"y": y, "y_const0": x}, method="online", mstep="numeric")


def test_refuses_bad_options(gaussian):
    x, _, sample = gaussian
    data = {"x": x[:1000]}
    with pytest.raises(ValueError, match=r"kappa.*\(0.5, 1\]"):
        ppl_em.fit(prepared=sample, data=data, method="online", online_kwargs={"kappa": 0.5})
    with pytest.raises(ValueError, match="unknown keys"):
        ppl_em.fit(prepared=sample, data=data, method="online", online_kwargs={"rate": 1})
    with pytest.raises(ValueError, match="client= distributes"):
        ppl_em.fit(prepared=sample, data=data, method="online", client=object())
    with pytest.raises(ValueError, match="n_init"):
        ppl_em.fit(prepared=sample, data=data, method="online", n_init=3)


def test_bad_value_in_a_stream_names_batch_and_observation(gaussian):
    x, _, sample = gaussian
    bad = x[:10_000].copy()
    bad[4321] = np.nan

    def stream():
        for a in range(0, 10_000, 1_000):
            yield {"x": bad[a : a + 1_000]}

    with pytest.raises(ppl_em.DataError, match=r"partition 4 at observation 4321"):
        ppl_em.fit(prepared=sample, data=stream(), method="online")


def test_map_mode_priors_weigh_as_in_a_batch_fit():
    """With conjugate priors (mode='map') the statistics are scaled to the observations
    seen, so the priors weigh against N as in batch EM: the same optimum."""
    rng = np.random.default_rng(8)
    # Shuffled: online EM assumes exchangeable batches (sorted data would show it one
    # component first).
    counts = rng.permutation(np.concatenate([rng.poisson(3.0, 40_000), rng.poisson(12.0, 60_000)]))

    def model(data):
        with pm.Model() as m:
            w = pm.Dirichlet("w", a=np.full(2, 5.0))
            mu = pm.Gamma("mu", 2.0, 0.2, shape=2)
            pm.Mixture("counts", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=data)
        return m

    batch = ppl_em.fit(model(counts), progressbar=False)
    result = ppl_em.fit(model(counts[:SAMPLE]), data={"counts": counts}, method="online",
                        batch_size=1_000)  # fmt: skip
    assert 0.0 <= (batch.objective - result.objective) / abs(batch.objective) < 1e-4


def test_blocks_maximised_from_the_statistics_run_online():
    """A Gaussian regression mixture with Normal and HalfNormal priors: no conjugate
    update, but Q is a function of the summed statistics, so online EM applies and ends
    near the batch fit."""
    x, y = MODELS["regression_mixture"].default_data(n=20000, seed=1)
    model = MODELS["regression_mixture"].build_model((x, y))
    batch = ppl_em.fit(model, progressbar=False)
    online = ppl_em.fit(model, data={"y": y, "y_const0": x}, method="online",
                        progressbar=False, random_seed=0)  # fmt: skip
    for name in ("w", "alpha", "beta", "sigma"):
        np.testing.assert_allclose(online.params[name], batch.params[name], atol=2e-3)
