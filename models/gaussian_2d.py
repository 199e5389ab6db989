"""Two-dimensional Gaussian mixture with a full covariance matrix per component.

Each component's covariance is built from its two standard deviations and its
correlation as the Cholesky factor ``[[s1, 0], [rho s2, s2 sqrt(1 - rho^2)]]``. The
prior on ``rho`` is LKJ(eta=2), which for 2 x 2 matrices is ``p(rho) ∝ 1 - rho^2``
(added as a Potential on a Uniform(-1, 1)). ``pm.LKJCholeskyCov`` would do the same,
but its logp is not batched over components, and a batched parameter (component axis
first) is what lets ``ppl_em.relabel`` permute components of posterior draws.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt

DESCRIPTION = "2-D Gaussian mixture, 2 components with full covariance (MvNormal), N=300"
K_DEFAULT = 2
WELL_IDENTIFIED = True
TRUE_PARAMS = {
    "w": np.array([0.4, 0.6]),
    "mu": np.array([[-2.0, 0.0], [2.0, 1.0]]),
    "sigma": np.array([[1.0, 0.5], [0.6, 1.2]]),
    "rho": np.array([0.6, -0.4]),
}


def _chol(sigma, rho, lib=np):
    """Cholesky factors, shape (K, 2, 2), from sds (K, 2) and correlations (K,)."""
    zero = rho * 0.0
    row0 = lib.stack([sigma[:, 0], zero], axis=-1)
    row1 = lib.stack([rho * sigma[:, 1], sigma[:, 1] * lib.sqrt(1.0 - rho**2)], axis=-1)
    return lib.stack([row0, row1], axis=-2)


def default_data(n: int = 300, seed: int = 303) -> np.ndarray:
    """``n`` x 2 points drawn from ``TRUE_PARAMS`` with a fixed seed."""
    rng = np.random.default_rng(seed)
    z = rng.choice(K_DEFAULT, size=n, p=TRUE_PARAMS["w"])
    chol = _chol(TRUE_PARAMS["sigma"], TRUE_PARAMS["rho"])
    eps = rng.standard_normal((n, 2))
    return TRUE_PARAMS["mu"][z] + np.einsum("nij,nj->ni", chol[z], eps)


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``z ~ Categorical(w)``, ``x ~ MvNormal(mu[z], chol=L[z])`` with L from (sigma, rho).

    Priors: Dirichlet(1) weights, Normal(0, 10) means, HalfNormal(3) standard deviations,
    LKJ(2) correlations. With these priors ppl_em's M-step is numeric (L-BFGS on Q);
    with ``mode="mle"`` (or flat priors) its closed-form MvNormal block takes the
    weighted means and covariances and maps them back to (mu, sigma, rho).
    """
    x = default_data() if data is None else np.asarray(data, dtype=float)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(k, 2))
        sigma = pm.HalfNormal("sigma", 3.0, shape=(k, 2))
        rho = pm.Uniform("rho", -1.0, 1.0, shape=k)
        pm.Potential("lkj_eta2", pt.sum(pt.log1p(-(rho**2))))
        z = pm.Categorical("z", p=w, shape=len(x))
        chol = _chol(sigma, rho, lib=pt)
        pm.MvNormal("x", mu=mu[z], chol=chol[z], observed=x)
    return model
