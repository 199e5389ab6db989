"""Latent class analysis: binary answers to J items from K classes of respondents.

Shows a closed-form M-step on a parameter of shape (K, J): each class's probability of
"yes" on each item is its responsibility-weighted share of "yes" answers (with a Beta
prior, shrunk towards it), read from the E-step's statistics: no numeric optimiser.
"""

from __future__ import annotations

import numpy as np
import pymc as pm

DESCRIPTION = "Latent class analysis: 3 classes, 10 binary items, N=1000 simulated"
K_DEFAULT = 3
WELL_IDENTIFIED = True
N_ITEMS = 10
TRUE_PARAMS = {
    "w": np.array([0.5, 0.3, 0.2]),
    "p": np.array(
        [
            [0.9, 0.9, 0.85, 0.8, 0.9, 0.1, 0.15, 0.1, 0.2, 0.1],
            [0.1, 0.2, 0.1, 0.15, 0.1, 0.9, 0.85, 0.9, 0.8, 0.9],
            [0.9, 0.85, 0.9, 0.9, 0.8, 0.9, 0.9, 0.85, 0.9, 0.8],
        ]
    ),
}


def default_data(n: int = 1000, seed: int = 505) -> np.ndarray:
    """``n`` x 10 binary answers drawn from ``TRUE_PARAMS`` with a fixed seed."""
    rng = np.random.default_rng(seed)
    z = rng.choice(K_DEFAULT, size=n, p=TRUE_PARAMS["w"])
    return (rng.random((n, N_ITEMS)) < TRUE_PARAMS["p"][z]).astype(int)


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT) -> pm.Model:
    """``z ~ Categorical(w)``, ``answers[i, j] ~ Bernoulli(p[z_i, j])``, Beta(2, 2) item
    probabilities (conjugate: the whole M-step is closed form)."""
    x = default_data() if data is None else np.asarray(data)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        p = pm.Beta("p", 2.0, 2.0, shape=(k, x.shape[1]))
        z = pm.Categorical("z", p=w, shape=x.shape[0])
        pm.Bernoulli("answers", p=p[z], observed=x)
    return model
