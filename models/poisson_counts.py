"""Mixture of Poisson counts with an explicit component label."""

from __future__ import annotations

import numpy as np
import pymc as pm

DESCRIPTION = "Poisson mixture of counts, 2 rates, explicit label z, N=400 simulated"
K_DEFAULT = 2
WELL_IDENTIFIED = True
TRUE_PARAMS = {"w": np.array([0.65, 0.35]), "mu": np.array([2.0, 9.0])}


def default_data(n: int = 400, seed: int = 202) -> np.ndarray:
    """``n`` counts drawn from ``TRUE_PARAMS`` with a fixed seed."""
    rng = np.random.default_rng(seed)
    z = rng.choice(K_DEFAULT, size=n, p=TRUE_PARAMS["w"])
    return rng.poisson(TRUE_PARAMS["mu"][z])


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``z ~ Categorical(w)``, ``counts ~ Poisson(mu[z])``, Gamma(2, 0.2) rate priors.

    The Gamma prior is conjugate, so ppl_em's M-step is closed form for every parameter.
    """
    x = default_data() if data is None else np.asarray(data)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Gamma("mu", alpha=2.0, beta=0.2, shape=k)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Poisson("counts", mu=mu[z], observed=x)
    return model
