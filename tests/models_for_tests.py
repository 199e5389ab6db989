"""Small PyMC models shared by the tests (independent of models/, which users run)."""

import numpy as np
import pymc as pm
import pytensor.tensor as pt


def coin_label(x, n=10):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        p = pm.Beta("p", 1.0, 1.0, shape=3)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Binomial("x", n=n, p=p[z], observed=x)
    return model


def coin_mixture(x, n=10, batched=True):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(3))
        p = pm.Beta("p", 1.0, 1.0, shape=3)
        comps = (
            pm.Binomial.dist(n=n, p=p)
            if batched
            else [pm.Binomial.dist(n=n, p=p[k]) for k in range(3)]
        )
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def gaussian_data(n=600, seed=0):
    rng = np.random.default_rng(seed)
    mu, sd, w = np.array([-4.0, 0.0, 5.0]), np.array([1.0, 0.7, 1.5]), np.array([0.3, 0.3, 0.4])
    z = rng.choice(3, size=n, p=w)
    return rng.normal(mu[z], sd[z])


def gaussian_label(x, k=3):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=k)
        sigma = pm.HalfNormal("sigma", 5.0, shape=k)
        z = pm.Categorical("z", p=w, shape=len(x))
        pm.Normal("x", mu=mu[z], sigma=sigma[z], observed=x)
    return model


def gaussian_mixture(x, k=3):
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(k))
        mu = pm.Normal("mu", 0.0, 10.0, shape=k)
        sigma = pm.HalfNormal("sigma", 5.0, shape=k)
        pm.NormalMixture("x", w=w, mu=mu, sigma=sigma, observed=x)
    return model


def mvnormal_mixture(x):
    """Two 2-D MvNormal components, LKJ Cholesky covariances (a pm.Mixture)."""
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Normal("mu", 0.0, 10.0, shape=(2, 2))
        chol = [
            pm.LKJCholeskyCov(f"chol{k}", n=2, eta=2.0, sd_dist=pm.HalfNormal.dist(3.0))[0]
            for k in range(2)
        ]
        comps = [pm.MvNormal.dist(mu=mu[k], chol=chol[k]) for k in range(2)]
        pm.Mixture("x", w=w, comp_dists=comps, observed=x)
    return model


def stick_breaking(x, k: int):
    """PyMC's stick-breaking example with priors on every variable: Beta(1, 2) sticks,
    Normal(0, 10) means, HalfNormal(5) scales; all maximised from the statistics."""
    with pm.Model() as model:
        v = pm.Beta("v", 1.0, 2.0, shape=k)
        w = v * pt.concatenate([[1.0], pt.extra_ops.cumprod(1 - v)[:-1]])
        mu = pm.Normal("mu", 0.0, 10.0, shape=k)
        sigma = pm.HalfNormal("sigma", 5.0, shape=k)
        pm.NormalMixture("x", w=w / w.sum(), mu=mu, sigma=sigma, observed=x)
    return model
