"""Poisson and logistic regression components: the exact Hessian of Q (IRLS) against
differences of Q's compiled gradient, and fits against SciPy on the marginal log
posterior written by hand (negative-binomial components:
``tests/test_glm_negative_binomial.py``)."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy.optimize import minimize
from scipy.special import expit, gammaln, log_expit, logsumexp
from scipy.stats import norm

import ppl_em
from ppl_em.em import default_start
from ppl_em.steps.estep import q_and_grad
from ppl_em.steps.glm import glm_hessian
from ppl_em.steps.mstep import expectations_from_resp, m_step_from_resp

PRIOR_SD = 5.0


def _data(family: str, n: int = 600, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, n)
    first = rng.random(n) < 0.4
    eta = np.where(first, 0.5 + 1.2 * x, 1.5 - 0.8 * x)
    if family == "poisson":
        return x, rng.poisson(np.exp(eta))
    # opposite slopes make P(y = 1 | x) rise then fall, which no single logistic
    # regression fits: one 0/1 answer per observation then identifies the mixture
    return x, (rng.random(n) < expit(np.where(first, 1.0 + 4.0 * x, 1.0 - 4.0 * x))).astype(int)


def _mixture_of(form: str, w, x, a, b, component, y) -> None:
    """The regression mixture ``y`` as a PyMC user writes it: with a label
    (``a[z] + b[z] * x``), or as a Mixture of batched components (``a + b * x[:, None]``,
    shape (N, 2)) or of list components (``a[k] + b[k] * x``). ``component(eta, k)`` is
    one component's ``(distribution, parameters)``; ``k`` indexes per-component
    parameters: the label, a component's number, or None for batched components."""
    if form == "label":
        z = pm.Categorical("z", p=w, shape=x.size)
        family, params = component(a[z] + b[z] * x, z)
        family("y", observed=y, **params)
        return
    if form == "batched":
        family, params = component(a + b * x[:, None], None)
        comps = family.dist(**params)
    else:
        comps = [(lambda f, p: f.dist(**p))(*component(a[k] + b[k] * x, k)) for k in range(2)]
    pm.Mixture("y", w=w, comp_dists=comps, observed=y)


def _model(family: str, x, y, prior=pm.Normal, form: str = "label") -> pm.Model:
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = prior("b", 0.0, PRIOR_SD, shape=2) if prior is pm.Normal else prior("b", shape=2)
        if family == "poisson":
            _mixture_of(form, w, x, a, b, lambda e, k: (pm.Poisson, {"mu": pt.exp(e)}), y)
        else:
            _mixture_of(form, w, x, a, b, lambda e, k: (pm.Bernoulli, {"logit_p": e}), y)
    return model


def _rows(family: str, x, y, a, b):
    eta = a[None, :] + b[None, :] * x[:, None]
    if family == "poisson":
        return y[:, None] * eta - np.exp(eta) - gammaln(y + 1.0)[:, None]
    return np.where(y[:, None] == 1, log_expit(eta), log_expit(-eta))


def _scipy_map(family: str, x, y, start: np.ndarray):
    """The marginal log posterior (Normal(0, 5) coefficients, Dirichlet(1, 1) weights,
    whose density is 1; no Jacobian: find_MAP's objective) maximised by BFGS."""

    def negative(theta):
        a, b, t = theta[:2], theta[2:4], theta[4]
        logw = np.array([log_expit(-t), log_expit(t)])
        ll = logsumexp(logw[None, :] + _rows(family, x, y, a, b), axis=1).sum()
        return -(ll + norm.logpdf(theta[:4], 0.0, PRIOR_SD).sum())

    found = minimize(negative, start, method="BFGS", options={"gtol": 1e-9})
    return found.x, -found.fun


@pytest.mark.parametrize("family", ["poisson", "bernoulli"])
def test_exact_hessian_equals_differences_of_the_compiled_gradient(family):
    x, y = _data(family)
    functions, config = ppl_em.prepare(_model(family, x, y))
    assert [b.family for b in config.plan.glm] == [f"{family}_glm"]
    mask = config.numeric_mask
    gamma = np.random.default_rng(1).dirichlet(np.ones(2), size=x.size)
    batches = expectations_from_resp(functions, config, gamma).batches
    u = default_start(functions, config, None) + np.random.default_rng(2).normal(0, 0.1, mask.size)

    def evaluate(sub):
        full = u.copy()
        full[mask] = sub
        q, grad = q_and_grad(functions, full, batches())
        return q, grad[mask]

    # central differences of the compiled gradient: error O(h^2), about 1e-8 here
    h, sub = 1e-4, u[mask]
    columns = [(evaluate(sub + h * e)[1] - evaluate(sub - h * e)[1]) / (2 * h)
               for e in np.eye(sub.size)]  # fmt: skip
    reference = np.stack(columns, axis=1)
    np.testing.assert_allclose(glm_hessian(config.glm, u, mask, batches), reference,
                               rtol=1e-6, atol=1e-7 * np.abs(reference).max())  # fmt: skip


@pytest.mark.parametrize(
    "family, accelerate, form",
    [
        ("poisson", "auto", "label"),
        ("bernoulli", "auto", "label"),
        ("bernoulli", "squarem", "label"),
        ("poisson", "auto", "batched"),
        ("bernoulli", "auto", "list"),
    ],
)
def test_regression_mixture_fit_matches_scipy_on_the_marginal_posterior(family, accelerate, form):
    """In each form a user writes it (:func:`_mixture_of`), IRLS fits it."""
    x, y = _data(family, n=1500)
    model = _model(family, x, y, form=form)
    fit = ppl_em.fit(model, progressbar=False, tol=1e-10, accelerate=accelerate)
    assert fit.converged
    assert [b.family for b in fit.prepared.config.plan.glm] == [f"{family}_glm"]
    if family == "bernoulli" and accelerate == "auto":
        # The logistic mixture's posterior is flat along the slopes (posterior sd about
        # 0.5), where EM alone (accelerate=None) took 1109 iterations and SQUAREM 230:
        # L-BFGS on the marginal posterior takes over once EM crawls.
        assert fit.n_iter < 100
    # SciPy starts at EM's estimate with component 1 first, w as its log-odds
    start = np.r_[fit.params["a"], fit.params["b"], np.log(fit.params["w"][1] / fit.params["w"][0])]
    theta, best = _scipy_map(family, x, y, start)
    assert fit.log_posterior == pytest.approx(best, abs=1e-6)
    # within 1e-3: a few thousandths of a posterior sd on the slopes
    np.testing.assert_allclose(np.r_[fit.params["a"], fit.params["b"]], theta[:4], atol=1e-3)


def test_irls_and_finite_difference_newton_reach_the_same_optimum():
    x, y = _data("poisson")
    model = _model("poisson", x, y)
    irls = ppl_em.fit(model, progressbar=False, tol=1e-10)
    numeric = ppl_em.fit(model, progressbar=False, tol=1e-10, mstep="numeric")
    assert irls.log_posterior == pytest.approx(numeric.log_posterior, abs=1e-7)
    for name in ("a", "b", "w"):
        np.testing.assert_allclose(irls.params[name], numeric.params[name], atol=1e-5)


def test_the_start_on_many_observations_is_still_the_exact_m_step_of_all_of_them(monkeypatch):
    """From NEWTON_SAMPLED_FROM observations on, the start's Newton first runs over every s-th
    observation (its iterations far from the answer cost a pass over the data each).
    The start must still be the exact M-step from the partition over all the data: here
    the same M-step taken from PyMC's initial point over all of them, as the start was
    before. Q's calls show that both the sample and the whole data were read. The sizes
    are a tenth of the code's (the same stride): small data keeps Q off C."""
    from ppl_em.em import starts
    from ppl_em.steps import mstep

    monkeypatch.setattr(starts, "NEWTON_SAMPLE", starts.NEWTON_SAMPLE // 10)
    monkeypatch.setattr(starts, "NEWTON_SAMPLED_FROM", starts.NEWTON_SAMPLED_FROM // 10)
    x, y = _data("poisson", n=starts.NEWTON_SAMPLED_FROM, seed=8)
    functions, config = ppl_em.prepare(_model("poisson", x, y))
    sizes = []

    def counted(functions, specs, u, batches, value=True, q=mstep.written_q):
        sizes.append(sum(chunk.n for _, chunk in batches()))
        return q(functions, specs, u, batches, value)

    monkeypatch.setattr(mstep, "written_q", counted)  # Q written out: a regression mixture
    u = default_start(functions, config, None)
    assert set(sizes) == {starts.NEWTON_SAMPLE, starts.NEWTON_SAMPLED_FROM}
    k = functions.graph.n_components
    gamma = starts.soft_responsibilities(
        starts.partition(starts.data_features(functions), k, None), k
    )
    exact = config._replace(grad_reduction=0.0)
    reference = m_step_from_resp(functions, exact, starts.initial_u(functions), gamma)
    np.testing.assert_allclose(u, reference, rtol=0, atol=1e-9)


def test_transformed_coefficients_keep_finite_differences():
    """A coefficient with a positive prior is fitted on its log: not linear in eta."""
    x, y = _data("poisson")
    _, config = ppl_em.prepare(_model("poisson", x, y, prior=pm.HalfFlat))
    assert config.plan.glm == () and config.glm == ()
    assert "inverse link of a linear predictor" in config.plan.reasons["a"]


def test_a_run_cut_short_at_any_iteration_ends_unconverged_with_a_warning():
    """``max_iter`` can end a run right after a marginal ascent, when EM has not yet
    measured a step since: the run ends unconverged, with the warning, below the full
    run's optimum (it once raised an IndexError reading two objectives after the
    ascent)."""
    x, y = _data("bernoulli", n=1500)
    model = _model("bernoulli", x, y)
    prepared = ppl_em.prepare(model)
    full = ppl_em.fit(model, prepared=prepared, progressbar=False, tol=1e-10)
    assert full.converged
    for max_iter in range(1, full.n_iter - 1):
        with pytest.warns(ppl_em.ConvergenceWarning, match=f"max_iter={max_iter} "):
            short = ppl_em.fit(model, prepared=prepared, progressbar=False, tol=1e-10,
                               max_iter=max_iter)  # fmt: skip
        assert not short.converged
        assert short.log_posterior <= full.log_posterior + 1e-9
