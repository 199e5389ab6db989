"""What a parameter's prior allows: its kind and hyperparameters, the support an update
may return, and whether the closed form is the prior's conjugate update."""

from __future__ import annotations

import numpy as np
from pymc.distributions.continuous import FlatRV, HalfCauchyRV, HalfFlatRV
from pymc.logprob.transforms import LogTransform
from pymc.pytensorf import constant_fold
from pytensor.tensor import TensorVariable
from pytensor.tensor import random as ptr

from ppl_em.model.graph import MixtureGraph


def prior_of(rv: TensorVariable, mode: str) -> tuple | None:
    """The prior as ``(kind, *hyper)`` with constant hyperparameters, or None."""
    op = rv.owner.op
    try:
        hyper = [np.asarray(h) for h in constant_fold(op.dist_params(rv.owner))]
    except Exception:
        return None
    if isinstance(op, ptr.basic.BetaRV):
        return ("beta", *hyper)
    if isinstance(op, ptr.basic.UniformRV) and np.all(hyper[0] == 0) and np.all(hyper[1] == 1):
        return ("beta", np.ones(()), np.ones(()))
    if isinstance(op, ptr.basic.DirichletRV):
        return ("dirichlet", hyper[0])
    if isinstance(op, ptr.basic.GammaRV):
        return ("gamma", hyper[0], 1.0 / hyper[1])
    if isinstance(op, ptr.basic.ExponentialRV):
        return ("gamma", np.ones(()), 1.0 / hyper[0])
    if isinstance(op, HalfFlatRV):
        return ("gamma", np.ones(()), np.zeros(()))
    if isinstance(op, ptr.basic.NormalRV):
        return ("normal", *hyper)
    if isinstance(op, FlatRV):
        return ("flat",)
    return None


def positive_prior(rv: TensorVariable) -> tuple | None:
    """A positive parameter's prior whose log density's curvature in ``log theta`` is
    written out (:mod:`ppl_em.steps.glm`), as ``(kind, *hyper)`` with constant
    hyperparameters: ``("gamma", shape, rate)`` (Gamma, Exponential, HalfFlat),
    ``("halfnormal", sigma)``, ``("lognormal", mu, sigma)``, ``("halfcauchy", beta)``;
    None for any other."""
    op = rv.owner.op
    prior = prior_of(rv, "map")
    if prior is not None and prior[0] == "gamma":
        return prior
    try:
        hyper = [np.asarray(h, dtype=float) for h in constant_fold(op.dist_params(rv.owner))]
    except Exception:
        return None
    if isinstance(op, ptr.basic.HalfNormalRV) and np.all(hyper[0] == 0):
        return ("halfnormal", hyper[1])
    if isinstance(op, ptr.basic.LogNormalRV):
        return ("lognormal", *hyper)
    if isinstance(op, HalfCauchyRV):
        return ("halfcauchy", hyper[-1])
    return None


def support(rv, graph: MixtureGraph) -> str | None:
    """The support class of a parameter's prior: what an MLE update may return."""
    op = rv.owner.op
    transform = graph.model.rvs_to_transforms.get(rv)
    if isinstance(op, ptr.basic.DirichletRV):
        return "simplex"
    prior = prior_of(rv, "mle")
    if prior and prior[0] == "beta":
        return "unit"
    if isinstance(transform, LogTransform):
        return "positive"
    if transform is None and not rv.dtype.startswith("int"):
        real = (ptr.basic.NormalRV, FlatRV, ptr.basic.StudentTRV, ptr.basic.CauchyRV)
        return "real" if isinstance(op, real) else None
    return None


NEEDED_SUPPORT = {"p": "unit", "mu": "real", "sigma": "positive", "scale": "positive"}


def needed_support(family: str, name: str) -> str:
    if family == "categorical":
        return "simplex"
    if family == "normal_linear":
        return "positive" if name == "sigma" else "real"
    return "positive" if (family, name) == ("poisson", "mu") else NEEDED_SUPPORT[name]


def prior_ok(family: str, name: str, prior, inverse: bool, consts, mode: str) -> str | None:
    """None if a slot's prior admits the closed form, else the reason."""
    if mode == "mle":
        return None
    kind = prior[0] if prior else None
    if kind == "beta" and name == "p" and np.all(prior[1] >= 1) and np.all(prior[2] >= 1):
        return None
    if kind == "dirichlet" and np.all(prior[1] >= 1):
        return None
    if kind == "gamma" and np.all(prior[1] >= 1):
        flat_rate = np.all(prior[2] == 0)
        if inverse and family == "exponential":
            return None  # Gamma prior on the rate of 1 / rate = scale: conjugate
        if not inverse and (family == "poisson" or flat_rate):
            return None
    if name == "mu" and kind == "flat":
        return None
    if family == "normal_linear" and name != "sigma" and kind == "flat":
        return None  # a coefficient of the linear predictor
    if name == "mu" and kind == "normal" and "sigma" in consts:
        return None
    return (
        f"its prior {kind or 'family'} has no conjugate closed-form update for "
        f"{family} parameter {name!r} in mode='map'"
    )
