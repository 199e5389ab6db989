"""Missing values in the observations, integrated out by EM, against independent
references: SciPy maximising the observed-data likelihood written by hand here, the
same model in the other form, and complete-case analysis on data missing completely
at random."""

import numpy as np
import pymc as pm
import pytest
from scipy import optimize, special, stats

import ppl_em
from ppl_em.em import default_start
from ppl_em.errors import DataError
from ppl_em.steps import m_step_from_resp

TIGHT = {"tol": 1e-13, "gap_tol": 1e-11, "progressbar": False, "mode": "mle"}
MEANS = np.array([[-2.0, 0.0, 1.0], [2.0, 3.0, -1.0]])


def _data(n: int, d: int, missing: float, seed: int, cov=None):
    """Two groups of D-dimensional data, entries missing completely at random, each row
    keeping at least one value; the true labels."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n)
    cov = np.eye(d) if cov is None else cov
    x = MEANS[z, :d] + rng.multivariate_normal(np.zeros(d), cov, size=n)
    gone = rng.random((n, d)) < missing
    gone[gone.all(axis=1), 0] = False
    return np.where(gone, np.nan, x), z


def _independent(x):
    n, d = x.shape
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        z = pm.Categorical("z", w, shape=n)
        mu = pm.Flat("mu", shape=(2, d), initval=MEANS[:, :d])
        s = pm.HalfFlat("s", shape=(2, d), initval=np.ones((2, d)))
        pm.Normal("x", mu[z], s[z], observed=x)
    return model


def _loglik_independent(x, w, mu, s):
    seen = ~np.isnan(x)
    terms = stats.norm.logpdf(np.where(seen, x, 0.0)[:, None], mu[None], s[None])
    rows = np.log(w)[None] + (terms * seen[:, None]).sum(axis=2)
    return special.logsumexp(rows, axis=1).sum()


def _by_first_mean(params: dict, mu_name: str = "mu") -> dict:
    """Components in the order of their first mean (EM's labels may be swapped)."""
    order = np.argsort(np.asarray(params[mu_name])[:, 0] if np.ndim(params[mu_name]) > 1
                       else params[mu_name])  # fmt: skip
    return {k: (np.asarray(v)[order] if np.shape(v)[:1] == (2,) and k != "c" else v)
            for k, v in params.items()}  # fmt: skip


def _scipy_mle(loglik, start: np.ndarray) -> tuple[np.ndarray, float]:
    """The observed-data MLE by SciPy from ``start``, independent of EM."""
    found = optimize.minimize(lambda v: -loglik(v), start, method="BFGS",
                              options={"gtol": 1e-9, "maxiter": 10_000})  # fmt: skip
    return found.x, -found.fun


def test_independent_features_match_scipy_observed_likelihood():
    x, _ = _data(300, 2, 0.2, seed=1)

    def unpack(v):
        return special.softmax([0.0, v[0]]), v[1:5].reshape(2, 2), np.exp(v[5:]).reshape(2, 2)

    start = np.concatenate([[0.0], MEANS[:, :2].ravel(), np.zeros(4)])
    v, best = _scipy_mle(lambda v: _loglik_independent(x, *unpack(v)), start)
    result = ppl_em.fit(_independent(x), **TIGHT)
    assert result.converged
    assert result.loglik == pytest.approx(best, abs=1e-6)
    w, mu, s = unpack(v)
    ref, got = _by_first_mean({"w": w, "mu": mu, "s": s}), _by_first_mean(result.params)
    for name in ("w", "mu", "s"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4)
    # Each observation's log-likelihood is its observed entries' marginal.
    own = _loglik_independent(x, result.params["w"], result.params["mu"], result.params["s"])
    assert result.loglik == pytest.approx(own, abs=1e-8)


def _chol(packed: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros((d, d))
    out[np.tril_indices(d)] = packed
    return out


def _loglik_mvn(y, w, mu, cov):
    """Each row's mixture density over its observed coordinates, rows grouped by which
    coordinates they have."""
    seen = ~np.isnan(y)
    total = 0.0
    for pattern in np.unique(seen, axis=0):
        rows = y[(seen == pattern).all(axis=1)][:, pattern]
        terms = [np.log(w[k]) + stats.multivariate_normal.logpdf(
                     rows, mu[k, pattern], cov[np.ix_(pattern, pattern)]).reshape(-1)
                 for k in range(2)]  # fmt: skip
        total += special.logsumexp(np.stack(terms, axis=1), axis=1).sum()
    return total


def _mvnormal(y, form: str):
    n, d = y.shape
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        mu = pm.Flat("mu", shape=(2, d), initval=MEANS[:, :d])
        chol, _, _ = pm.LKJCholeskyCov(
            "c", n=d, eta=1.0, sd_dist=pm.HalfNormal.dist(5.0), compute_corr=True
        )
        if form == "label":
            z = pm.Categorical("z", w, shape=n)
            pm.MvNormal("y", mu[z], chol=chol, observed=y)
        else:
            comps = [pm.MvNormal.dist(mu[k], chol=chol) for k in range(2)]
            pm.Mixture("y", w=w, comp_dists=comps, observed=y)
    return model


COV = np.array([[1.0, 0.6, 0.3], [0.6, 1.5, 0.4], [0.3, 0.4, 0.8]])


def test_mvnormal_marginal_over_observed_coordinates_matches_scipy():
    """Tied full covariance, 25 % of the coordinates missing: EM's optimum is SciPy's
    optimum of the observed-data likelihood (each row's MvNormal over its observed
    coordinates), in both model forms."""
    y, _ = _data(150, 3, 0.25, seed=2, cov=COV)
    d = 3

    def unpack(v):
        chol = _chol(v[7:], d)
        return special.softmax([0.0, v[0]]), v[1:7].reshape(2, d), chol @ chol.T

    start = np.concatenate([[0.0], MEANS.ravel(), np.eye(d)[np.tril_indices(d)]])
    v, best = _scipy_mle(lambda v: _loglik_mvn(y, *unpack(v)), start)
    fits = {form: ppl_em.fit(_mvnormal(y, form), **TIGHT) for form in ("label", "mixture")}
    w, mu, cov = unpack(v)
    for result in fits.values():
        assert result.converged
        assert result.loglik == pytest.approx(best, abs=1e-6)
        chol = _chol(result.params["c"], d)
        got, ref = _by_first_mean(result.params), _by_first_mean({"w": w, "mu": mu})
        np.testing.assert_allclose(got["mu"], ref["mu"], atol=1e-4)
        np.testing.assert_allclose(got["w"], ref["w"], atol=1e-5)
        np.testing.assert_allclose(chol @ chol.T, cov, atol=1e-4)
        own = _loglik_mvn(y, result.params["w"], result.params["mu"], chol @ chol.T)
        assert result.loglik == pytest.approx(own, abs=1e-8)


def test_a_missing_observed_variable_among_several_sharing_the_label():
    """A Normal feature missing for some observations and a Poisson count that is always
    there: the missing feature's factor drops out of those rows."""
    rng = np.random.default_rng(3)
    n = 250
    z = rng.integers(0, 2, n)
    x = rng.normal(np.array([-1.5, 1.5])[z], 1.0)
    counts = rng.poisson(np.array([2.0, 7.0])[z])
    x[rng.random(n) < 0.3] = np.nan
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        label = pm.Categorical("z", w, shape=n)
        mu = pm.Flat("mu", shape=2, initval=[-1.0, 1.0])
        rate = pm.HalfFlat("rate", shape=2, initval=[1.0, 5.0])
        pm.Normal("x", mu[label], 1.0, observed=x)
        pm.Poisson("counts", rate[label], observed=counts)
    seen = ~np.isnan(x)

    def loglik(v):
        rows = np.log(special.softmax([0.0, v[0]]))[None] + stats.poisson.logpmf(
            counts[:, None], np.exp(v[3:5])[None]
        )
        rows += stats.norm.logpdf(np.where(seen, x, 0.0)[:, None], v[1:3][None]) * seen[:, None]
        return special.logsumexp(rows, axis=1).sum()

    v, best = _scipy_mle(loglik, np.array([0.0, -1.0, 1.0, 0.0, np.log(5.0)]))
    result = ppl_em.fit(model, **TIGHT)
    assert result.loglik == pytest.approx(best, abs=1e-6)
    got = _by_first_mean(result.params)
    ref = _by_first_mean({"mu": v[1:3], "rate": np.exp(v[3:5])})
    np.testing.assert_allclose(got["mu"], ref["mu"], atol=1e-4)
    np.testing.assert_allclose(got["rate"], ref["rate"], atol=1e-4)


@pytest.mark.slow  # two fits and two sets of standard errors on a cold compile cache
def test_agrees_with_complete_case_analysis_and_uses_more_data():
    """Missing completely at random: EM on every row and EM on the complete rows estimate
    the same means (within the complete-case standard errors), and EM's standard
    errors are smaller, because it also uses the incomplete rows."""
    x, _ = _data(400, 2, 0.3, seed=4)
    complete = x[~np.isnan(x).any(axis=1)]
    em = ppl_em.fit(_independent(x), **TIGHT)
    cc = ppl_em.fit(_independent(complete), **TIGHT)
    se_em = ppl_em.standard_errors(em)
    se_cc = ppl_em.standard_errors(cc)
    order_em = np.argsort(em.params["mu"][:, 0])
    order_cc = np.argsort(cc.params["mu"][:, 0])
    mu_em, se_em = em.params["mu"][order_em], se_em["mu"][order_em]
    mu_cc, se_cc = cc.params["mu"][order_cc], se_cc["mu"][order_cc]
    assert np.all(np.abs(mu_em - mu_cc) < 3 * se_cc)
    assert np.all(se_em < se_cc)
    assert np.all(np.abs(mu_em - MEANS[:, :2]) < 4 * se_em)


@pytest.mark.slow  # the gradient check compiles PyTensor's gradient of the rows
def test_standard_errors_with_missing_entries_match_the_gradient_check():
    y, _ = _data(120, 3, 0.2, seed=5, cov=COV)
    result = ppl_em.fit(_mvnormal(y, "label"), **TIGHT)
    louis = ppl_em.standard_errors(result)
    check = ppl_em.standard_errors(result, method="gradient")
    for name in louis:
        np.testing.assert_allclose(louis[name], check[name], rtol=1e-4)


def test_an_observation_missing_entirely_is_refused():
    x, _ = _data(40, 2, 0.2, seed=6)
    x[7] = np.nan
    with pytest.raises(DataError, match=r"observation 7 of \['x'\] is missing entirely"):
        ppl_em.fit(_independent(x), progressbar=False)


def test_missing_values_outside_the_label_dependents_are_refused():
    x, _ = _data(40, 2, 0.0, seed=7)
    other = np.array([1.0, np.nan, 2.0])
    with _independent(x) as model:
        pm.Normal("other", pm.Flat("m0"), 1.0, observed=other)
    with pytest.raises(DataError, match=r"'other' contain NaN, but 'other' does not depend"):
        ppl_em.fit(model, progressbar=False)


def test_an_element_of_an_elementwise_mixture_is_an_observation_of_its_own():
    x, _ = _data(40, 2, 0.1, seed=8)
    with pm.Model() as model:
        w = pm.Dirichlet("w", np.ones(2))
        pm.NormalMixture("x", w=w, mu=pm.Flat("mu", shape=2), sigma=1.0, observed=x[:, 0])
    with pytest.raises(DataError, match="missing entirely"):
        ppl_em.fit(model, progressbar=False)


def test_compare_refuses_missing_values_before_fitting():
    x, _ = _data(40, 2, 0.2, seed=9)
    with pytest.raises(ValueError, match=r"\['x'\] contain NaN.*find_MAP would maximise"):
        ppl_em.compare(_independent(x))


def test_the_result_shows_missing_entries_as_nan_and_keeps_the_user_model():
    x, _ = _data(60, 2, 0.2, seed=10)
    model = _independent(x)
    prepared = ppl_em.prepare(model, mode="mle")
    result = ppl_em.fit(model, prepared=prepared, progressbar=False)
    np.testing.assert_array_equal(np.isnan(result.observed["x"]), np.isnan(x))
    np.testing.assert_array_equal(result.observed["x"][~np.isnan(x)], x[~np.isnan(x)])
    assert "x_unobserved" not in result.params
    with pytest.raises(DataError, match="only in the data the model was built with"):
        ppl_em.with_data(prepared, x=x)
    with pytest.raises(ValueError, match=r"fit\(data=...\) streams complete arrays"):
        ppl_em.fit(prepared=prepared, data={"x": np.nan_to_num(x)})


def test_little_rubin_m_step_matches_a_numpy_update():
    """With missing coordinates the MvNormal block stays closed-form: Little and Rubin's
    update (rows completed by their conditional means under the current parameters,
    plus the conditional covariances), checked against the same update written here."""
    y, _ = _data(120, 3, 0.3, seed=11, cov=COV)
    functions, config = ppl_em.prepare(_mvnormal(y, "label"), mode="mle")
    assert [spec.missing for spec in config.plan.mvn] == [True]
    assert {"mu", "c"} <= config.plan.closed
    names = functions.layout.rv_names
    u0 = default_start(functions, config, rng=None)
    start = dict(zip(names, functions.constrain(u0), strict=True))
    mu0, chol0 = start["mu"], _chol(start["c"], 3)
    cov0 = chol0 @ chol0.T
    gamma = np.random.default_rng(12).dirichlet(np.ones(2), size=len(y))
    new = dict(zip(names, functions.constrain(m_step_from_resp(functions, config, u0, gamma)),
                   strict=True))  # fmt: skip
    sums, second = np.zeros((2, 3)), np.zeros((2, 3, 3))
    for i, row in enumerate(y):
        o = ~np.isnan(row)
        m = ~o
        for k in range(2):
            full, extra = row.copy(), np.zeros((3, 3))
            if m.any():
                gain = cov0[np.ix_(m, o)] @ np.linalg.inv(cov0[np.ix_(o, o)])
                full[m] = mu0[k, m] + gain @ (row[o] - mu0[k, o])
                extra[np.ix_(m, m)] = cov0[np.ix_(m, m)] - gain @ cov0[np.ix_(o, m)]
            sums[k] += gamma[i, k] * full
            second[k] += gamma[i, k] * (np.outer(full, full) + extra)
    nk = gamma.sum(axis=0)
    mu1 = sums / nk[:, None]
    cov1 = sum(second[k] - nk[k] * np.outer(mu1[k], mu1[k]) for k in range(2)) / len(y)
    chol1 = _chol(new["c"], 3)
    np.testing.assert_allclose(new["mu"], mu1, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(chol1 @ chol1.T, cov1, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(new["w"], nk / len(y), rtol=1e-10)
