"""Q and the E-step's rows of regression mixtures written out
(``ppl_em.steps.glm_q.written_q``: the numeric M-step's Q, the ascents' gradient;
``ppl_em.steps.glm_rows``: every E-step's rows) against Q and the rows compiled from
the model's graph, differences of the marginal objective and a SciPy joint, and the
models they must not be used for."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import pytest
from scipy.special import gammaln

import ppl_em
from models import experts
from ppl_em.em import default_start
from ppl_em.errors import DataError
from ppl_em.steps.estep import e_step, joint, q_and_grad, split, whole_data
from ppl_em.steps.glm_q import scores_cover, written_q
from ppl_em.steps.glm_rows import WrittenRows, log_gamma_ratio, with_written_rows
from ppl_em.steps.mstep import expectations_from_resp
from tests.test_glm import PRIOR_SD, _data, _model, _rows
from tests.test_glm_negative_binomial import _nb_data, _nb_model


def _stick_breaking_poisson(x, y, k: int = 3) -> pm.Model:
    """Poisson regressions whose weights are stick-breaking (a function of Beta sticks)."""
    with pm.Model() as model:
        v = pm.Beta("v", 1.0, 2.0, shape=k - 1)
        rest = pt.concatenate([[1.0], pt.extra_ops.cumprod(1.0 - v)])
        w = pm.Deterministic("w", pt.concatenate([v, [1.0]]) * rest)
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=k)
        b = pm.Normal("b", 0.0, PRIOR_SD, shape=k)
        z = pm.Categorical("z", p=w, shape=x.size)
        pm.Poisson("y", mu=pt.exp(a[z] + b[z] * x), observed=y)
    return model


def _with_a_normal_dependent(x, y) -> pm.Model:
    """A Poisson regression and a Normal measurement per observation, one label."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = pm.Normal("b", 0.0, PRIOR_SD, shape=2)
        m = pm.Normal("m", 0.0, 10.0, shape=2)
        z = pm.Categorical("z", p=w, shape=x.size)
        pm.Poisson("y", mu=pt.exp(a[z] + b[z] * x), observed=y)
        pm.Normal("h", mu=m[z], sigma=1.0, observed=x + (y > 3))
    return model


def _two_poisson_dependents(x, y) -> pm.Model:
    """Two Poisson regressions sharing one label: the written terms add up per row."""
    y2 = np.random.default_rng(5).poisson(np.exp(0.3 + 0.5 * x))
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = pm.Normal("b", 0.0, PRIOR_SD, shape=2)
        c = pm.Normal("c", 0.0, PRIOR_SD, shape=2)
        d = pm.Normal("d", 0.0, PRIOR_SD, shape=2)
        z = pm.Categorical("z", p=w, shape=x.size)
        pm.Poisson("y", mu=pt.exp(a[z] + b[z] * x), observed=y)
        pm.Poisson("v", mu=pt.exp(c[z] + d[z] * x), observed=y2)
    return model


MODELS = {
    "poisson label map": (lambda: _model("poisson", *_data("poisson")), "map"),
    "poisson batched mle": (lambda: _model("poisson", *_data("poisson"), form="batched"), "mle"),
    "bernoulli list": (lambda: _model("bernoulli", *_data("bernoulli"), form="list"), "map"),
    "negative binomial gamma": (lambda: _nb_model(*_nb_data(), "gamma"), "map"),
    "negative binomial shared": (lambda: _nb_model(*_nb_data(), "halfnormal_shared"), "map"),
    "negative binomial known mle": (lambda: _nb_model(*_nb_data(), "known"), "mle"),
    "stick-breaking weights": (lambda: _stick_breaking_poisson(*_data("poisson")), "map"),
    "two poisson dependents": (lambda: _two_poisson_dependents(*_data("poisson")), "map"),
}


@pytest.fixture(scope="module")
def prepared():
    """``prepared(name)``: MODELS[name] prepared once for this module's tests."""
    cache = {}

    def get(name: str):
        if name not in cache:
            build, mode = MODELS[name]
            cache[name] = ppl_em.prepare(build(), mode=mode)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_the_written_q_equals_the_compiled_q_and_its_gradient(name, prepared):
    """At a point off the optimum, with responsibilities that are not those of that point
    (the numeric M-step and the curvature's differences hold them): the value, and the
    gradient in every entry (coefficients, log dispersions, weights)."""
    functions, config = prepared(name)
    assert scores_cover(functions, config.plan, config.glm) and config.written_q
    k = functions.graph.n_components
    gamma = np.random.default_rng(1).dirichlet(np.ones(k), size=functions.graph.n_obs)
    batches = expectations_from_resp(functions, config, gamma).batches
    u = default_start(functions, config, None)
    u = u + np.random.default_rng(2).normal(0, 0.1, u.size)
    q, reference = q_and_grad(functions, u, batches())
    value, written = written_q(functions, config.glm, u, batches)
    assert value == pytest.approx(float(q), rel=1e-13)
    # the point is off Q's maximum in every entry, so no entry is compared with ~0
    assert np.abs(reference).min() > 1e-3 * np.abs(reference).max()
    np.testing.assert_allclose(written, reference, rtol=1e-9, atol=1e-10 * np.abs(reference).max())


def test_it_is_the_marginal_gradient_where_the_responsibilities_are_the_points_own():
    """Fisher's identity: with the responsibilities at ``u``, the written gradient is
    the marginal log posterior's, here by central differences of the E-step's objective."""
    from ppl_em.em.step import em_data, em_init

    x, y = _nb_data()
    functions, config = ppl_em.prepare(_nb_model(x, y, "gamma"))
    data = em_data(functions, config)
    u = default_start(functions, config, None)
    u = u + np.random.default_rng(4).normal(0, 0.05, u.size)
    state = em_init(functions, u, config, data, keep_resp=True)
    _, q_functions, batches = data.expectations(functions, state, keep=False)
    written = written_q(q_functions, config.glm, u, batches, value=False)[1]
    h = 1e-5
    objective = lambda v: em_init(functions, v, config, data).objective  # noqa: E731
    differences = [(objective(u + h * e) - objective(u - h * e)) / (2 * h) for e in np.eye(u.size)]
    np.testing.assert_allclose(written, differences, rtol=1e-6, atol=1e-5)


def test_a_second_dependent_with_terms_of_its_own_keeps_the_compiled_gradient():
    """A Normal measurement beside the Poisson regression adds per-observation terms in
    its mean ``m``, which the written path would count as the weights' (``N_k`` times
    one observation's): the guard refuses it, and the written gradient is indeed wrong
    there."""
    x, y = _data("poisson")
    functions, config = ppl_em.prepare(_with_a_normal_dependent(x, y))
    assert [b.family for b in config.plan.glm] == ["poisson_glm"]
    assert not scores_cover(functions, config.plan, config.glm) and not config.written_q
    gamma = np.random.default_rng(1).dirichlet(np.ones(2), size=x.size)
    batches = expectations_from_resp(functions, config, gamma).batches
    u = default_start(functions, config, None)
    reference = q_and_grad(functions, u, batches())[1]
    written = written_q(functions, config.glm, u, batches)[1]
    m = functions.layout.mask({"m"})
    np.testing.assert_allclose(written[~m], reference[~m], rtol=1e-9, atol=1e-9)
    assert np.abs(written[m] - reference[m]).min() > 1.0


def test_gated_weights_are_not_covered():
    """A mixture of experts' weights vary by observation: not a weights block."""
    functions, config = ppl_em.prepare(experts.build_model())
    assert not scores_cover(functions, config.plan, config.glm) and not config.written_q


@pytest.mark.parametrize("alpha", [0.3, 2.0, 50.0, 1e6])
def test_tabulated_log_gamma_ratios_of_counts_equal_scipys_special_functions(alpha):
    """``gammaln(y + a) - gammaln(a) - y log(a)`` by the table, against SciPy's log
    gamma (whose own rounding, some 1e-16 of ``y log(a)``, bounds the comparison), and
    for non-integer values the same special functions."""
    y = np.r_[0.0, 1.0, 2.0, 7.0, 40.0, 513.0]
    reference = gammaln(y + alpha) - gammaln(alpha) - y * np.log(alpha)
    tolerance = 1e-14 * (np.abs(gammaln(y + alpha)) + np.abs(gammaln(alpha)) + 1.0)
    np.testing.assert_allclose(log_gamma_ratio(y, alpha), reference, rtol=0, atol=tolerance.max())
    half = y + 0.5
    direct = gammaln(half + alpha) - gammaln(alpha) - half * np.log(alpha)
    np.testing.assert_array_equal(log_gamma_ratio(half, alpha), direct)


def test_weighted_regression_fits_equal_fits_of_repeated_rows():
    """Observation weights reach the written Q inside the responsibilities (and its
    ``N_k``): integer weights fit a Poisson regression mixture as repeated rows do."""
    x, y = _data("poisson", n=300)
    counts = np.random.default_rng(9).integers(1, 4, size=x.size)
    start = {"w": [0.4, 0.6], "a": [0.5, 1.5], "b": [1.2, -0.8]}
    options = {"start": start, "progressbar": False, "tol": 1e-10}
    weighted = ppl_em.fit(_model("poisson", x, y), weights=counts, **options)
    repeated = ppl_em.fit(_model("poisson", np.repeat(x, counts), np.repeat(y, counts)), **options)
    assert weighted.converged and repeated.converged
    assert weighted.prepared.config.glm and scores_cover(
        weighted.prepared.functions, weighted.prepared.config.plan, weighted.prepared.config.glm
    )
    assert weighted.log_posterior == pytest.approx(repeated.log_posterior, abs=1e-7)
    for name in ("w", "a", "b"):
        np.testing.assert_allclose(weighted.params[name], repeated.params[name], atol=1e-4)


def _off_optimum(functions, config, seed: int = 2) -> np.ndarray:
    u = default_start(functions, config, None)
    return u + np.random.default_rng(seed).normal(0, 0.1, u.size)


def _compiled_joint(functions, u) -> np.ndarray:
    rows = functions.rows.graph_rows(u, *functions.data)
    return np.stack([np.array(r) for r in rows], axis=1)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_written_rows_equal_the_compiled_rows(name, prepared):
    """Every observation's ``log p(y_i, z_i = k)`` at a point off the optimum, and the
    E-step over uneven chunks (each length its own buffers) adds up to the whole
    data's, as the compiled rows' E-step does."""
    functions, config = prepared(name)
    assert isinstance(functions.rows, WrittenRows)
    u = _off_optimum(functions, config)
    compiled = _compiled_joint(functions, u)
    np.testing.assert_allclose(joint(functions, u), compiled, rtol=1e-12, atol=1e-12)
    reference = e_step(functions._replace(rows=functions.rows.graph_rows), u, whole_data(functions))
    parts = [e_step(functions, u, chunk) for chunk in split(functions, 233)]
    assert sum(p.loglik for p in parts) == pytest.approx(reference.loglik, rel=1e-13)
    np.testing.assert_allclose(sum(p.nk for p in parts), reference.nk, rtol=1e-11)


@pytest.mark.parametrize("family", ["poisson", "bernoulli"])
def test_the_written_rows_are_the_weights_and_scipys_densities(family):
    """Against the joint written in the test: ``log w_k`` plus the Poisson or Bernoulli
    log density of ``a_k + b_k x`` (``tests.test_glm._rows``, SciPy's special functions)."""
    x, y = _data(family)
    functions, config = ppl_em.prepare(_model(family, x, y))
    assert isinstance(functions.rows, WrittenRows)
    u = _off_optimum(functions, config, seed=5)
    params = dict(zip(functions.layout.rv_names, functions.constrain(u), strict=True))
    reference = np.log(params["w"])[None, :] + _rows(family, x, y, params["a"], params["b"])
    np.testing.assert_allclose(joint(functions, u), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["poisson", "bernoulli"])
def test_a_value_outside_the_support_is_impossible_in_every_component(family):
    """A negative count, or a Bernoulli answer of 2, is ``-inf`` in every row as in the
    compiled rows, and the fit names it as it does there."""
    x, y = _data(family)
    bad = y.copy()
    bad[7] = -1 if family == "poisson" else 2
    functions, config = ppl_em.prepare(_model(family, x, y))
    assert isinstance(functions.rows, WrittenRows)
    u = _off_optimum(functions, config)
    arrays = list(functions.data)
    arrays[functions.spec.names.index("y")] = bad
    written = np.stack(functions.rows(u, *arrays), axis=1)
    compiled = np.stack([np.array(r) for r in functions.rows.graph_rows(u, *arrays)], axis=1)
    assert np.all(np.isneginf(written[7])) and np.all(np.isneginf(compiled[7]))
    np.testing.assert_allclose(np.delete(written, 7, 0), np.delete(compiled, 7, 0), rtol=1e-12)
    with pytest.raises(DataError, match=r"observation 7 of 'y' has value"):
        ppl_em.fit(_model(family, x, bad), progressbar=False)


class _Shifted:
    """Compiled rows plus ``shift(x)`` per observation: a stand-in for a graph whose
    rows hold a term the written densities do not."""

    def __init__(self, rows, shift) -> None:
        self.rows, self.shift, self.lock = rows, shift, rows.lock

    def __call__(self, u, *arrays):
        return [np.array(r) + self.shift(arrays) for r in self.rows(u, *arrays)]


def test_rows_that_differ_by_more_than_one_constant_per_component_stay_compiled():
    """``prepare`` swaps the rows only where compiled and written rows differ by one
    constant per component (the label's term) on the data held (a sample of it): a
    term that varies by observation, even by 1e-6, keeps the compiled rows."""
    x, y = _data("poisson")
    functions, config = ppl_em.prepare(_model("poisson", x, y))
    compiled = functions._replace(rows=functions.rows.graph_rows)
    u = _off_optimum(functions, config)
    at = functions.spec.names.index("y")
    for shift, swapped in [(lambda a: 0.3, True), (lambda a: 1e-6 * a[at], False)]:
        shifted = compiled._replace(rows=_Shifted(compiled.rows, shift))
        out = with_written_rows(shifted, config.glm, u)
        assert isinstance(out.rows, WrittenRows) is swapped
        if swapped:
            np.testing.assert_allclose(joint(out, u), joint(shifted, u), rtol=1e-12)


def test_label_probabilities_that_vary_by_observation_are_not_written():
    """Known per-observation label probabilities (not one set of weights): neither Q nor
    the rows are written, and the joint is the one written here."""
    x, y = _data("poisson")
    probs = np.random.default_rng(9).dirichlet(np.ones(2), size=x.size)
    with pm.Model() as model:
        a = pm.Normal("a", 0.0, PRIOR_SD, shape=2)
        b = pm.Normal("b", 0.0, PRIOR_SD, shape=2)
        z = pm.Categorical("z", p=probs, shape=x.size)
        pm.Poisson("y", mu=pt.exp(a[z] + b[z] * x), observed=y)
    functions, config = ppl_em.prepare(model)
    assert not config.written_q and not isinstance(functions.rows, WrittenRows)
    u = _off_optimum(functions, config)
    params = dict(zip(functions.layout.rv_names, functions.constrain(u), strict=True))
    eta = params["a"][None, :] + params["b"][None, :] * x[:, None]
    reference = np.log(probs) + y[:, None] * eta - np.exp(eta) - gammaln(y + 1.0)[:, None]
    np.testing.assert_allclose(joint(functions, u), reference, rtol=1e-12, atol=1e-12)
