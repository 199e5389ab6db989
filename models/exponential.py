"""The seed's mixture of exponentials (shared/seeds/000): waiting times from two rates."""

from __future__ import annotations

import numpy as np
import pymc as pm

DESCRIPTION = "Mixture of 2 exponential waiting-time distributions (pm.Mixture), N=2000 simulated"
K_DEFAULT = 2
WELL_IDENTIFIED = True
TRUE_RATES = np.array([0.5, 5.0])
TRUE_WEIGHTS = np.array([0.4, 0.6])
TRUE_PARAMS = {"w": TRUE_WEIGHTS, "lam": TRUE_RATES}


def default_data(n: int = 2000, seed: int = 20261121) -> np.ndarray:
    """``n`` waiting times simulated from ``TRUE_PARAMS`` with a fixed seed."""
    rng = np.random.default_rng(seed)
    z = rng.choice(len(TRUE_WEIGHTS), size=n, p=TRUE_WEIGHTS)
    return rng.exponential(1.0 / TRUE_RATES[z])


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``pm.Mixture`` of ``k`` exponentials with Gamma(1, 0.1) rate priors."""
    x = default_data() if data is None else np.asarray(data)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        lam = pm.Gamma("lam", alpha=1.0, beta=0.1, shape=k)
        pm.Mixture("x", w=w, comp_dists=pm.Exponential.dist(lam=lam), observed=x)
    return model
