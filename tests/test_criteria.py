"""BIC/AIC/ICL against a hand computation and scikit-learn; select_k on 3 clear clusters."""

import numpy as np
import pytest
from models_for_tests import coin_label, gaussian_data, gaussian_mixture
from scipy import stats
from sklearn.mixture import GaussianMixture

import ppl_em
from ppl_em import select_k
from ppl_em.criteria import classification_entropy

COIN = np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2, 5, 2, 4, 4, 6, 4, 5, 6, 3, 3])


@pytest.fixture(scope="module")
def coin_fit():
    start = {"w": [0.25, 0.5, 0.25], "p": [0.4, 0.5, 0.65]}
    return ppl_em.fit(coin_label(COIN), start=start, mode="mle", progressbar=False)


@pytest.fixture(scope="module")
def gauss():
    x = gaussian_data(n=400, seed=3)
    return x, ppl_em.fit(
        gaussian_mixture(x, 3), mode="mle", n_init=3, random_seed=1, progressbar=False
    )


def test_coin_criteria_match_hand_computation(coin_fit):
    w, p = coin_fit.params["w"], coin_fit.params["p"]
    joint = np.log(w) + stats.binom.logpmf(COIN[:, None], 10, p)  # N x K
    loglik = np.logaddexp.reduce(joint, axis=1)
    resp = np.exp(joint - loglik[:, None])
    n_par = 2 + 3  # simplex of 3 weights has 2 free dimensions, plus 3 probabilities
    bic = -2 * loglik.sum() + n_par * np.log(20)
    entropy = -(resp * np.log(resp)).sum()

    assert coin_fit.n_parameters == n_par
    assert coin_fit.loglik == pytest.approx(loglik.sum(), rel=1e-10)
    assert coin_fit.bic() == pytest.approx(bic, rel=1e-10)
    assert coin_fit.aic() == pytest.approx(-2 * loglik.sum() + 2 * n_par, rel=1e-10)
    assert classification_entropy(coin_fit.log_resp) == pytest.approx(entropy, rel=1e-8)
    assert coin_fit.icl() == pytest.approx(bic + 2 * entropy, rel=1e-10)
    # Overlapping coins: memberships are uncertain, so ICL is clearly above BIC.
    assert coin_fit.icl() - coin_fit.bic() > 5.0


def _sklearn_at(weights, means, sigmas):
    gm = GaussianMixture(n_components=len(weights), covariance_type="full")
    gm.weights_ = np.asarray(weights)
    gm.means_ = np.asarray(means)[:, None]
    gm.covariances_ = (np.asarray(sigmas) ** 2)[:, None, None]
    gm.precisions_cholesky_ = (1.0 / np.asarray(sigmas))[:, None, None]
    return gm


def test_gaussian_bic_aic_equal_sklearn_at_same_parameters(gauss):
    x, result = gauss
    assert result.n_parameters == 3 * 3 - 1
    gm = _sklearn_at(result.params["w"], result.params["mu"], result.params["sigma"])
    assert gm._n_parameters() == result.n_parameters
    assert result.bic() == pytest.approx(gm.bic(x[:, None]), rel=1e-10)
    assert result.aic() == pytest.approx(gm.aic(x[:, None]), rel=1e-10)


def test_gaussian_bic_matches_independent_sklearn_fit(gauss):
    x, result = gauss
    gm = GaussianMixture(3, tol=1e-12, max_iter=5000, reg_covar=0.0, n_init=3, random_state=0)
    gm.fit(x[:, None])
    # Both find the same MLE, so the criteria agree to the optimisers' tolerance.
    assert result.bic() == pytest.approx(gm.bic(x[:, None]), rel=1e-6)
    assert result.aic() == pytest.approx(gm.aic(x[:, None]), rel=1e-6)
    order = np.argsort(result.params["mu"])
    np.testing.assert_allclose(
        result.params["mu"][order], np.sort(gm.means_.ravel()), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_select_k_prefers_three_clusters():
    x = gaussian_data(n=400, seed=3)
    table = select_k(gaussian_mixture, [1, 2, 3, 4], data=x, mode="mle", n_init=2, random_seed=0)
    assert list(table.index) == [1, 2, 3, 4]
    assert list(table["n_params"]) == [2, 5, 8, 11]
    assert table["bic"].idxmin() == 3
    assert table["icl"].idxmin() == 3
    assert bool(table.loc[3, "best_bic"]) and table["best_bic"].sum() == 1
    # K = 1 has no membership uncertainty: ICL equals BIC exactly.
    assert table.loc[1, "icl"] == pytest.approx(table.loc[1, "bic"], rel=1e-12)
    # Log-likelihood can only grow with K at the MLE (nested models, best of restarts).
    assert table["loglik"].is_monotonic_increasing


def test_select_k_two_ks_table_contents():
    x = gaussian_data(n=400, seed=3)
    table = select_k(gaussian_mixture, [2, 3], data=x, mode="mle", n_init=2, random_seed=0)
    assert table["bic"].idxmin() == 3 and bool(table.loc[3, "best_bic"])
    assert table.loc[3, "bic"] == pytest.approx(
        -2 * table.loc[3, "loglik"] + 8 * np.log(400), rel=1e-12
    )
    assert set(table.columns) >= {"aic", "icl", "converged", "n_iter", "seconds", "warnings"}


@pytest.mark.parametrize("ks", [[], [0, 2], [1.5]])
def test_select_k_rejects_bad_ks(ks):
    with pytest.raises(ValueError, match="ks="):
        select_k(gaussian_mixture, ks, data=np.zeros(5))
