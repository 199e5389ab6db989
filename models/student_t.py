"""A Gaussian cluster contaminated by heavy-tailed noise: Normal + Student-t mixture.

Shows a numeric M-step (the Student-t has no closed form) taken by Newton steps on Q
with a finite-difference Hessian, independent of the data's units, and a default start
(k-means on standardised data, then one exact M-step) that finds the contamination.
"""

from __future__ import annotations

import numpy as np
import pymc as pm

DESCRIPTION = "Normal cluster + Student-t(3) contamination, N=600 simulated"
K_DEFAULT = 2
WELL_IDENTIFIED = True
NU = 3.0
TRUE_PARAMS = {
    "w": np.array([0.8, 0.2]),
    "mu": np.array([0.0, 3.0]),
    "sigma": np.array([1.0, 5.0]),
}


def default_data(n: int = 600, seed: int = 606) -> np.ndarray:
    """``n`` points: 80% Normal(0, 1), 20% 3 + 5 t(3), fixed seed."""
    rng = np.random.default_rng(seed)
    wide = rng.random(n) < TRUE_PARAMS["w"][1]
    return np.where(wide, 3.0 + 5.0 * rng.standard_t(NU, n), rng.normal(0.0, 1.0, n))


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``pm.Mixture`` of one Normal and ``k - 1`` Student-t(3) components; Normal(0, 10)
    locations, HalfNormal(10) scales."""
    x = default_data() if data is None else np.asarray(data, dtype=float)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=k)
        sigma = pm.HalfNormal("sigma", 10.0, shape=k)
        comps = [pm.Normal.dist(mu[0], sigma[0])]
        comps += [pm.StudentT.dist(nu=NU, mu=mu[j], sigma=sigma[j]) for j in range(1, k)]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model
