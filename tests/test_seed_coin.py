"""Golden test: one EM step of the seed's 3-coin example reproduces Tables 6.1-6.4."""

import numpy as np
import pytest

import ppl_em
from ppl_em.compiled import build_em_functions
from ppl_em.em import apply_start, em_init, em_step
from ppl_em.model import analyse_model, build_plan, data_spec
from ppl_em.steps import make_mstep_config
from tests.conftest import EXACT
from tests.models_for_tests import coin_label, coin_mixture

BUILDERS = {
    "label": coin_label,
    "mixture": coin_mixture,
    "mixture_list": lambda x: coin_mixture(x, batched=False),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def coin_functions(request, seed_coin):
    model = BUILDERS[request.param](np.array(seed_coin["data"]))
    graph = analyse_model(model)
    return build_em_functions(graph, mode="map")


@pytest.mark.parametrize("mstep", ["closed", "numeric"])
def test_one_em_step_matches_seed_tables(coin_functions, seed_coin, mstep):
    functions = coin_functions
    plan = build_plan(functions.graph, "map", data_spec(functions.graph))
    config = make_mstep_config(functions, plan, mstep, grad_reduction=EXACT)
    if mstep == "closed":
        assert config.plan.closed == {"w", "p"}
    x = np.array(seed_coin["data"])
    init = seed_coin["initial"]
    u0 = apply_start(functions, {"w": init["w"], "p": init["phi"]}, np.zeros(functions.layout.size))
    state = em_init(functions, u0)
    gamma = np.exp(state.log_resp)
    ref = seed_coin["after_one_em_step"]

    for outcome, row in ref["posterior_per_outcome_table_6_1"].items():
        rows = gamma[x == int(outcome)]
        np.testing.assert_allclose(rows, np.tile(row, (len(rows), 1)), atol=1e-6)
    np.testing.assert_allclose(
        gamma.sum(axis=0), ref["expected_component_counts_eq_6_10"], atol=1e-6
    )
    np.testing.assert_allclose(
        gamma.T @ x, ref["expected_heads_per_component_table_6_3"], atol=1e-5
    )

    new = em_step(functions, config, state)
    w, p = functions.constrain(new.u)
    np.testing.assert_allclose(w, ref["w_eq_6_14"], atol=1e-6)
    np.testing.assert_allclose(p, ref["phi_table_6_4"], atol=1e-6)
    assert new.objective > state.objective


def test_fit_public_api_on_coin(seed_coin):
    x = np.array(seed_coin["data"])
    with coin_label(x), pytest.warns(ppl_em.ConvergenceWarning):
        res = ppl_em.fit(
            start={"w": seed_coin["initial"]["w"], "p": seed_coin["initial"]["phi"]},
            max_iter=1,
            tol=1e-300,
            progressbar=False,
        )
    np.testing.assert_allclose(
        res.params["p"], seed_coin["after_one_em_step"]["phi_table_6_4"], atol=1e-6
    )
    assert set(res.params) == {"w", "p"}
    assert res.n_iter == 1 and not res.converged and res.history.shape == (2,)
    assert res.responsibilities.shape == (20, 3)
    np.testing.assert_allclose(res.responsibilities.sum(axis=1), 1.0, atol=1e-12)
