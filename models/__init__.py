"""Example mixture models users can run.

Each module has ``build_model(data=None, k=K_DEFAULT) -> pm.Model``, ``default_data()``
(fixed seed), ``DESCRIPTION``, ``K_DEFAULT``, ``WELL_IDENTIFIED`` and, when the data are
simulated, ``TRUE_PARAMS`` (free-variable name -> true value, component axis first).
"""

from __future__ import annotations

from types import ModuleType

from models import (
    coin,
    experts,
    exponential,
    gaussian_1d,
    gaussian_2d,
    latent_class,
    poisson_counts,
    regression_mixture,
    student_t,
)

MODELS: dict[str, ModuleType] = {
    "coin": coin,
    "exponential": exponential,
    "gaussian_1d": gaussian_1d,
    "poisson_counts": poisson_counts,
    "gaussian_2d": gaussian_2d,
    "regression_mixture": regression_mixture,
    "latent_class": latent_class,
    "student_t": student_t,
    "experts": experts,
}
