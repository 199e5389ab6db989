"""Every example model in models/: the module contract and EM recovery of the truth."""

import numpy as np
import pytest

import ppl_em
from models import MODELS, coin
from ppl_em.inference.relabel import match, permute
from ppl_em.inference.stderr import standard_errors
from ppl_em.model import analyse_model
from tests.conftest import assert_monotone

# The 2-D model's numeric M-step (an MvNormal per observation) takes over a minute on
# the shared test machine, so its recovery test runs with the slow tests.
SIMULATED = [
    pytest.param(name, marks=pytest.mark.slow) if name == "gaussian_2d" else name
    for name in sorted(n for n, mod in MODELS.items() if hasattr(mod, "TRUE_PARAMS"))
]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_module_contract(name):
    mod = MODELS[name]
    assert isinstance(mod.DESCRIPTION, str) and mod.DESCRIPTION
    assert isinstance(mod.WELL_IDENTIFIED, bool)
    assert mod.build_model.__doc__ and mod.default_data.__doc__
    data = mod.default_data()
    again = mod.default_data()
    for a, b in zip(np.atleast_1d(data), np.atleast_1d(again), strict=True):
        np.testing.assert_array_equal(a, b)  # fixed seed
    for k in (mod.K_DEFAULT, mod.K_DEFAULT + 1):
        graph = analyse_model(mod.build_model(k=k))
        assert graph.n_components == k
    if hasattr(mod, "TRUE_PARAMS"):
        graph = analyse_model(mod.build_model())
        assert set(mod.TRUE_PARAMS) == set(graph.param_names)
        model = mod.build_model()
        for pname, value in mod.TRUE_PARAMS.items():
            assert np.shape(value) == tuple(model[pname].type.shape)


@pytest.mark.parametrize("name", SIMULATED)
def test_em_recovers_true_params(name):
    mod = MODELS[name]
    res = ppl_em.fit(mod.build_model(), progressbar=False)
    assert res.converged and res.monotone
    assert_monotone(res.history)
    truth = {n: np.asarray(v, dtype=float) for n, v in mod.TRUE_PARAMS.items()}
    se = standard_errors(res, "gradient")
    perm = match(res.params, truth, mod.K_DEFAULT, se)
    est, se = permute(res.params, perm), permute(se, perm)
    for pname, true in truth.items():
        z = (est[pname] - true) / se[pname]
        # Sampling error: each estimate lies within 4 standard errors of the truth
        # (a 1-in-15,000 event per element for a correct SE; ~40 elements in all).
        assert np.all(np.abs(z) < 4.0), (pname, est[pname], true, se[pname])
        # and the SEs themselves are of the size N makes plausible (not inflated).
        assert np.all(se[pname] < 0.25 * (np.abs(true) + 0.5)), (pname, se[pname])


def test_coin_converges_to_pooled_binomial():
    # The 20 seed counts do not separate three coins: EM from the seed's start ends with
    # equal biases, i.e. the one-coin MLE sum(x) / (10 N), whatever the weights.
    res = ppl_em.fit(coin.build_model(), start=coin.SEED_START, tol=1e-12, progressbar=False)
    assert_monotone(res.history)
    pooled = coin.SEED_DATA.sum() / (10 * coin.SEED_DATA.size)
    np.testing.assert_allclose(res.params["p"], pooled, atol=2e-3)
    np.testing.assert_allclose(res.params["w"].sum(), 1.0)
    assert res.history[-1] > res.history[0]


def test_mixture_of_experts_is_the_maximum_of_the_hand_written_likelihood():
    """The gated Poisson regressions: EM's MAP equals SciPy maximising the marginal log
    posterior written out (softmax gate, Poisson log-linear experts, Normal priors)."""
    from scipy import optimize, stats
    from scipy.special import logsumexp

    from models import experts

    x, y = experts.default_data()
    res = ppl_em.fit(experts.build_model(), tol=1e-14, gap_tol=1e-12, progressbar=False)
    scale = np.array([1e-3, 5.0])

    def negative(theta):
        gate, alpha, beta = theta[:2], theta[2:4], theta[4:]
        logits = np.outer(x, gate)
        log_gate = logits - logsumexp(logits, axis=1, keepdims=True)
        rate = np.exp(alpha[None] + beta[None] * x[:, None])
        loglik = logsumexp(log_gate + stats.poisson.logpmf(y[:, None], rate), axis=1).sum()
        prior = stats.norm.logpdf(gate, 0, scale).sum() + stats.norm.logpdf(theta[2:], 0, 5).sum()
        return -(loglik + prior)

    start = np.concatenate([res.params["gate"], res.params["alpha"], res.params["beta"]])
    ref = optimize.minimize(negative, start + 0.05, method="BFGS", options={"gtol": 1e-8})
    assert -ref.fun == pytest.approx(res.log_posterior, abs=1e-6)
    np.testing.assert_allclose(start, ref.x, atol=1e-4)
