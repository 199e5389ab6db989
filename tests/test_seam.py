"""The E-step seam: statistics add up over chunks of observations, whatever the split.

For every family of ``models/`` in both model forms (explicit label and ``pm.Mixture``),
and for both passes over the joint (the NumPy pass of ``backend="python"`` and the
numba kernel of compiled backends), the E-step over the whole data must equal the sum
of E-steps over any split of it into chunks, to round-off: log-likelihood, expected
counts, weighted statistics and responsibilities. So must Q and its gradient (what a
numeric M-step sums), and a whole EM fit run chunk by chunk.

The rows are NumPy-backed in every case: ``compiled_rows`` alone picks the pass
(:func:`ppl_em.steps.estep.e_step`), and compiling the rows and Q of seven models to C
(83 s of the 174 s this file took alone on a cold cache) would change the rows'
arithmetic, not what is summed over chunks. ``tests/test_kernel.py`` checks a fit on C
rows (the numba pass) against one on NumPy-backed rows (the NumPy pass).
"""

import itertools
import warnings

import numpy as np
import pymc as pm
import pytest

import ppl_em
from models import MODELS
from ppl_em.em import default_start, em_data, run_em
from ppl_em.model import analyse_model
from ppl_em.steps import DataChunk, e_step, estep, q_and_grad, whole_data
from ppl_em.steps.columns import stats_request
from ppl_em.steps.mstep import restarted
from ppl_em.steps.stats import total
from tests.models_for_tests import coin_mixture, gaussian_label, mvnormal_mixture

RNG = np.random.default_rng(12)


def _exponential_label(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", 1.0, 0.1, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Exponential("x", lam=lam[z], observed=x)
    return model


def _poisson_mixture(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 2.0, 0.2, shape=2)
        pm.Mixture("counts", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=x)
    return model


def _regression_mixture(data):
    covariate, y = data
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        alpha = pm.Normal("alpha", 0.0, 10.0, shape=2)
        beta = pm.Normal("beta", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 3.0, shape=2)
        comps = [
            pm.Normal.dist(mu=alpha[k] + beta[k] * covariate, sigma=sigma[k]) for k in range(2)
        ]
        pm.Mixture("y", w=w, comp_dists=comps, observed=y)
    return model


def _student_t_label(x):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=2)
        sigma = pm.HalfNormal("sigma", 10.0, shape=2)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.StudentT("x", nu=3.0, mu=mu[z], sigma=sigma[z], observed=x)
    return model


# family -> (the models/ example, the same family in the other form, or None where the
# other form is another model: answers to J items share one label, which a pm.Mixture
# over (N, J) data would not; a gate on covariates is a label's distribution)
FORMS = {
    "binomial": ("coin", coin_mixture),
    "exponential": ("exponential", _exponential_label),
    "normal": ("gaussian_1d", gaussian_label),
    "poisson": ("poisson_counts", _poisson_mixture),
    "mvnormal": ("gaussian_2d", mvnormal_mixture),
    "regression": ("regression_mixture", _regression_mixture),
    "student_t": ("student_t", _student_t_label),
    "latent_class": ("latent_class", None),
    "experts": ("experts", None),
}
CASES = [
    (f, form) for f in FORMS for form in ("models", "other") if form == "models" or FORMS[f][1]
]


def _model(family: str, form: str) -> pm.Model:
    name, other = FORMS[family]
    module = MODELS[name]
    return module.build_model() if form == "models" else other(module.default_data())


def _splits(n: int) -> list[list[int]]:
    """Chunk boundaries: single observations at the start, uneven runs, a random cut."""
    cuts = sorted(set(RNG.choice(np.arange(2, n - 1), size=3, replace=False).tolist()))
    return [[0, n], [0, 1, 2, 9, n], [0, *cuts, n], [0, n // 2, n]]


def _chunks(functions, request, bounds):
    out = []
    for a, b in itertools.pairwise(bounds):
        arrays = tuple(x[a:b] for x in functions.data)
        out.append(DataChunk(arrays, a, request.columns(arrays)))
    return out


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    family, form = request.param
    model = _model(family, form)
    functions, config = ppl_em.prepare(model, backend="python")
    if form == "other":
        # the numba kernel's pass (kernel.compiled_fused_estep), which C rows take
        functions = functions._replace(compiled_rows=True)
    prepared = ppl_em.PreparedEM(functions, config)
    u = default_start(functions, config, np.random.default_rng(0))
    return family, form, prepared, u


@pytest.mark.parametrize("family", sorted(f for f in FORMS if FORMS[f][1]))
def test_each_family_is_covered_in_both_forms(family):
    kinds = {analyse_model(_model(family, form)).kind for form in ("models", "other")}
    assert kinds == {"label", "mixture"}


def test_estep_adds_up_over_any_split(case, monkeypatch):
    _, form, (functions, config), u = case
    passes = set()
    for name in ("fused_estep", "compiled_fused_estep"):
        run = getattr(estep, name)
        monkeypatch.setattr(
            estep, name, lambda *a, _r=run, _n=name, **k: passes.add(_n) or _r(*a, **k)
        )
    request = stats_request(config.plan, functions.data_names, functions.data)
    whole = e_step(functions, u, whole_data(functions, request), keep_resp=True)
    assert whole.s.shape == (len(request.index), functions.graph.n_components)
    for bounds in _splits(functions.data[0].shape[0]):
        chunks = _chunks(functions, request, bounds)
        summed = total(e_step(functions, u, c, keep_resp=True) for c in chunks)
        assert summed.n_obs == whole.n_obs
        assert summed.loglik == pytest.approx(whole.loglik, rel=1e-12)
        np.testing.assert_allclose(summed.nk, whole.nk, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(summed.s, whole.s, rtol=1e-11, atol=1e-9)
        np.testing.assert_allclose(summed.log_resp, whole.log_resp, rtol=1e-12, atol=1e-12)
    assert passes == {"compiled_fused_estep" if form == "other" else "fused_estep"}


def test_q_and_gradient_add_up_over_chunks(case):
    _, _, (functions, config), u = case
    request = stats_request(config.plan, functions.data_names, functions.data)
    whole_chunk = whole_data(functions, request)
    log_resp = e_step(functions, u, whole_chunk, keep_resp=True).log_resp
    gamma_t = np.ascontiguousarray(np.exp(log_resp.T))
    q, grad = q_and_grad(functions, u, [(gamma_t, whole_chunk)])
    bounds = [0, 3, 40, functions.data[0].shape[0]]
    batches = [(np.ascontiguousarray(gamma_t[:, c.start : c.start + c.n]), c)
               for c in _chunks(functions, request, bounds)]  # fmt: skip
    q_sum, grad_sum = q_and_grad(functions, u, batches)
    assert q_sum == pytest.approx(q, rel=1e-12)
    np.testing.assert_allclose(grad_sum, grad, rtol=1e-10, atol=1e-9)


def test_chunked_fit_equals_whole_fit(case):
    """Six EM iterations over chunks of 97 observations land where as many over the
    whole data do (iterate by iterate the same arithmetic up to summation order); so
    do six iterations with the default marginal ascents (for the ``models/`` forms:
    an ascent is the same code over any backend's chunk sums, which the tests above
    check for both). An ascent can bring a run to the optimum to rounding within them,
    and a run then stops at the first iteration whose objective repeats exactly, which
    the summation order decides: there the runs agree iterate by iterate while both
    run and in where they end, not in how many iterations they count."""
    _, form, (functions, config), u = case
    chunks = em_data(functions, config, 97)

    def run(**kwargs):
        # each run counts its own calls of Q, as ppl_em.fit's do (SwitchingFunction)
        options = {"tol": 1e-300, "max_iter": 6, **kwargs}
        return run_em(functions.restarted(), restarted(config), u, **options)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        whole = run(accelerate=None)
        chunked = run(data=chunks, accelerate=None)
        if form == "models":
            whole_auto = run()
            chunked_auto = run(data=chunks)
    assert chunked.n_iter == whole.n_iter == 6
    np.testing.assert_allclose(chunked.history, whole.history, rtol=1e-10)
    np.testing.assert_allclose(chunked.state.u, whole.state.u, rtol=1e-7, atol=1e-8)
    if form != "models":
        return
    # Entry by entry the same while both run; a run that stopped at an exact repeat
    # ended at the objective the other one still repeats to rounding.
    both = min(len(chunked_auto.history), len(whole_auto.history))
    np.testing.assert_allclose(chunked_auto.history[:both], whole_auto.history[:both], rtol=1e-10)
    longer = max(chunked_auto.history, whole_auto.history, key=len)
    np.testing.assert_allclose(longer[both - 1 :], longer[-1], rtol=1e-13)
    assert chunked_auto.state.objective == pytest.approx(whole_auto.state.objective, rel=1e-10)
    np.testing.assert_allclose(chunked_auto.state.u, whole_auto.state.u, rtol=1e-7, atol=1e-8)
