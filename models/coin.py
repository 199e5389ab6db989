"""The seed's 3-coin binomial mixture (shared/seeds/001, section 6.3).

Each observation is the number of heads in ``n_trials`` tosses of one of three coins.
"""

from __future__ import annotations

import numpy as np
import pymc as pm

SEED_DATA = np.array([6, 5, 4, 2, 2, 6, 5, 5, 4, 2, 5, 2, 4, 4, 6, 4, 5, 6, 3, 3])
SEED_START = {"w": [0.25, 0.5, 0.25], "p": [0.4, 0.5, 0.65]}

DESCRIPTION = "The seed's 3-coin binomial mixture: 20 counts of heads in 10 tosses (real data)"
K_DEFAULT = 3
# Twenty counts cannot tell three coins apart: the MAP has nearly equal biases and a
# flat, multimodal posterior, so EM need not sit inside NUTS' HDIs.
WELL_IDENTIFIED = False


def default_data() -> np.ndarray:
    """The seed's 20 observed head counts (not simulated: there is no TRUE_PARAMS)."""
    return SEED_DATA.copy()


def build_model(data: np.ndarray | None = None, k: int = K_DEFAULT, n_trials: int = 10) -> pm.Model:
    """Explicit-label form: ``z ~ Categorical(w)``, ``heads ~ Binomial(n_trials, p[z])``.

    Flat priors (Dirichlet(1), Beta(1, 1)) make the MAP equal to the seed's MLE.
    """
    x = default_data() if data is None else np.asarray(data)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        p = pm.Beta("p", 1.0, 1.0, shape=k)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Binomial("heads", n=n_trials, p=p[z], observed=x)
    return model
