"""A mixture of experts: Poisson regressions whose weights depend on a covariate.

Shows a label whose probabilities vary by observation (a softmax gate on a covariate),
GLM components (log-linear Poisson regressions), and the numeric M-step they need:
Newton steps on Q with a finite-difference Hessian, the IRLS of the classical
mixture-of-experts EM.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt

DESCRIPTION = "Mixture of 2 Poisson regressions with a logistic gate on the covariate, N=800"
K_DEFAULT = 2
WELL_IDENTIFIED = True
# The simulation's parameters (not TRUE_PARAMS: a softmax gate is identified only up to
# a constant, so relabelled estimates are compared through the likelihood instead,
# tests/test_models.py).
SIMULATION = {
    "gate": np.array([0.0, 2.0]),
    "alpha": np.array([0.5, 2.0]),
    "beta": np.array([0.8, -0.6]),
}


def default_data(n: int = 800, seed: int = 707) -> tuple[np.ndarray, np.ndarray]:
    """``(x, counts)``: covariate uniform on [-2, 2]; class 1 more likely for large x."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, n)
    logits = np.outer(x, SIMULATION["gate"])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    z = (rng.random(n) < p[:, 1]).astype(int)
    rate = np.exp(SIMULATION["alpha"][z] + SIMULATION["beta"][z] * x)
    return x, rng.poisson(rate)


def build_model(data: tuple[np.ndarray, np.ndarray] | None = None, k: int = K_DEFAULT):
    """``z_i ~ Categorical(softmax(gate * x_i))`` (the first class's gate is the reference,
    pinned at 0 by a tight prior), ``counts_i ~ Poisson(exp(alpha[z] + beta[z] x_i))``;
    Normal(0, 5) coefficients."""
    x, y = default_data() if data is None else (np.asarray(d) for d in data)
    with pm.Model() as model:
        scale = np.r_[1e-3, np.full(k - 1, 5.0)]
        gate = pm.Normal("gate", 0.0, scale, shape=k)
        alpha = pm.Normal("alpha", 0.0, 5.0, shape=k)
        beta = pm.Normal("beta", 0.0, 5.0, shape=k)
        probs = pt.special.softmax(pt.outer(pt.as_tensor(x), gate), axis=1)
        z = pm.Categorical("z", p=probs, shape=len(y))
        pm.Poisson("counts", mu=pt.exp(alpha[z] + beta[z] * x), observed=y)
    return model
