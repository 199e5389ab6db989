"""EMResult.to_inference_data against pymc-extras' recover_marginals at the EM estimate."""

import numpy as np
import pymc_extras as pmx
import pytest

import ppl_em
from tests.models_for_tests import coin_label

X = np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2, 5, 2, 4, 4, 6, 4, 5, 6, 3, 3])


def test_lp_label_matches_recover_marginals():
    model = coin_label(X)
    start = {"w": [0.25, 0.5, 0.25], "p": [0.3, 0.45, 0.6]}
    with pytest.warns(ppl_em.ConvergenceWarning, match="max_iter=3"):
        res = ppl_em.fit(model, start=start, max_iter=3, tol=1e-300, progressbar=False)
    idata = res.to_inference_data()
    post = idata.posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 1
    np.testing.assert_allclose(post["p"].values[0, 0], res.params["p"])
    np.testing.assert_allclose(post["lp_z"].values[0, 0], res.log_resp)

    marginal = pmx.marginalize(model, ["z"])
    estimate_only = idata.copy()
    estimate_only.posterior = estimate_only.posterior.drop_vars("lp_z")
    recovered = pmx.recover_marginals(
        estimate_only, model=marginal, var_names=["z"], return_samples=False
    )
    # An independent E-step: pymc-extras' own vectorised marginal logp
    np.testing.assert_allclose(
        recovered.posterior["lp_z"].values[0, 0], res.log_resp, rtol=1e-10, atol=1e-12
    )
