"""Mixture of linear regressions: each observation follows one of K lines in a covariate."""

from __future__ import annotations

import numpy as np
import pymc as pm

DESCRIPTION = "Mixture of 2 linear regressions y ~ alpha[z] + beta[z] x, N=300 simulated"
K_DEFAULT = 2
WELL_IDENTIFIED = True
TRUE_PARAMS = {
    "w": np.array([0.5, 0.5]),
    "alpha": np.array([1.0, -1.0]),
    "beta": np.array([2.0, -0.5]),
    "sigma": np.array([0.5, 0.8]),
}


def default_data(n: int = 300, seed: int = 404) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: covariate uniform on [-3, 3] and responses from ``TRUE_PARAMS``."""
    rng = np.random.default_rng(seed)
    z = rng.choice(K_DEFAULT, size=n, p=TRUE_PARAMS["w"])
    x = rng.uniform(-3.0, 3.0, size=n)
    mean = TRUE_PARAMS["alpha"][z] + TRUE_PARAMS["beta"][z] * x
    return x, rng.normal(mean, TRUE_PARAMS["sigma"][z])


def build_model(data: tuple[np.ndarray, np.ndarray] | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``z ~ Categorical(w)``, ``y ~ Normal(alpha[z] + beta[z] * x, sigma[z])``.

    ``data`` is ``(x, y)``. Normal(0, 10) intercepts and slopes, HalfNormal(3) noise
    scales. The mean is a linear predictor, so ppl_em's M-step is weighted least
    squares from the E-step's statistics: in closed form with flat priors (or
    ``mode="mle"``), by Newton's method on Q written in those statistics with these
    priors; closed form for the weights.
    """
    x, y = default_data() if data is None else (np.asarray(d, dtype=float) for d in data)
    if x.shape != y.shape:
        raise ValueError(
            f"data=(x, y) must have equal shapes, got x {x.shape} and y {y.shape}; "
            "pass one covariate value per response."
        )
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        alpha = pm.Normal("alpha", 0.0, 10.0, shape=k)
        beta = pm.Normal("beta", 0.0, 10.0, shape=k)
        sigma = pm.HalfNormal("sigma", 3.0, shape=k)
        z = pm.Categorical("z", p=w, shape=len(y))
        pm.Normal("y", mu=alpha[z] + beta[z] * x, sigma=sigma[z], observed=y)
    return model
