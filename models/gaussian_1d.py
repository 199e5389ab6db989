"""One-dimensional Gaussian mixture written with ``pm.NormalMixture``."""

from __future__ import annotations

import numpy as np
import pymc as pm

DESCRIPTION = "1-D Gaussian mixture of 3 components (pm.NormalMixture), N=500 simulated"
K_DEFAULT = 3
WELL_IDENTIFIED = True
TRUE_PARAMS = {
    "w": np.array([0.3, 0.3, 0.4]),
    "mu": np.array([-4.0, 0.0, 5.0]),
    "sigma": np.array([1.0, 0.7, 1.5]),
}


def default_data(n: int = 500, seed: int = 101) -> np.ndarray:
    """``n`` draws from ``TRUE_PARAMS`` with a fixed seed."""
    rng = np.random.default_rng(seed)
    z = rng.choice(K_DEFAULT, size=n, p=TRUE_PARAMS["w"])
    return rng.normal(TRUE_PARAMS["mu"][z], TRUE_PARAMS["sigma"][z])


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``x ~ NormalMixture(w, mu, sigma)`` with weakly informative priors.

    Dirichlet(1) weights, Normal(0, 10) means and HalfNormal(5) scales; no ordering
    constraint (label switching is undone after sampling by ``ppl_em.relabel``).
    """
    x = default_data() if data is None else np.asarray(data, dtype=float)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=k)
        sigma = pm.HalfNormal("sigma", 5.0, shape=k)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model
