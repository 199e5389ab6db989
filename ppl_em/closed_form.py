"""Closed-form M-step from expected sufficient statistics (pure NumPy).

For each block of a :class:`~ppl_em.recognise.ClosedFormPlan` the update maximises
``sum_ik gamma_ik log p(x_i | theta_k) + log p(theta)`` exactly:

* weights, Dirichlet(a):   ``w_k ∝ N_k + a_k - 1``                (flat: ``N_k / N``)
* Binomial/Bernoulli, Beta(a, b): ``p_k = (S_k + a - 1) / (n N_k + a + b - 2)``
* Poisson, Gamma(a, rate b):      ``mu_k = (S_k + a - 1) / (N_k + b)``
* Exponential rate, Gamma(a, b):  ``lam_k = (N_k + a - 1) / (S_k + b)``  (the seed's update)
* Normal:  ``mu_k = S_k / N_k``, ``sigma_k^2 = sum_i gamma_ik (x_i - mu_k)^2 / N_k``; with a
  Normal(m0, s0) prior on ``mu`` and a fixed ``sigma`` the precision-weighted mean.

with ``N_k = sum_i gamma_ik`` and ``S_k = sum_i gamma_ik x_i``. In ``mode="mle"`` every
prior term is dropped (``a = b = 1``, ``rate = 0``, flat ``mu``).
"""

from __future__ import annotations

import numpy as np

from ppl_em.recognise import Block, ClosedFormPlan

# A component that owns no observation would get a weight or a rate of exactly 0 or
# inf, which no transform maps back to a finite unconstrained value.
_TINY = 1e-300


def _hyper(block: Block, name: str, mode: str, default: tuple) -> tuple:
    prior = block.priors.get(name)
    if mode == "mle" or prior is None or prior[0] in ("flat",):
        return default
    return tuple(np.asarray(h, dtype=float) for h in prior[1:])


def _per_cell(value: np.ndarray, n_obs: int, n_comp: int, kind: str) -> np.ndarray:
    """Broadcast a constant parameter to (N, K): per observation or per component."""
    value = np.asarray(value, dtype=float)
    if value.ndim == 1 and value.shape[0] == n_obs and kind == "label":
        return np.broadcast_to(value[:, None], (n_obs, n_comp))
    return np.broadcast_to(value, (n_obs, n_comp))


def _weights(block: Block, gamma: np.ndarray, mode: str) -> np.ndarray:
    nk = gamma.sum(axis=0)
    if block.family == "bernoulli_label":
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        return np.clip((nk[1] + a - 1) / (nk.sum() + a + b - 2), _TINY, 1 - 1e-16)[None]
    (alpha,) = _hyper(block, "w", mode, (np.ones_like(nk),))
    w = np.maximum(nk + alpha - 1, _TINY)
    return w / w.sum()


def _family(block: Block, gamma: np.ndarray, x: np.ndarray, mode: str, kind: str) -> dict:
    n_obs, n_comp = gamma.shape
    nk = np.maximum(gamma.sum(axis=0), _TINY)
    sk = gamma.T @ x
    fam = block.family
    if fam in ("binomial", "bernoulli"):
        n = _per_cell(block.consts.get("n", 1.0), n_obs, n_comp, kind)
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        trials = np.einsum("ik,ik->k", gamma, n)
        return {"p": np.clip((sk + a - 1) / (trials + a + b - 2), _TINY, 1 - 1e-16)}
    if fam == "poisson":
        a, rate = _hyper(block, "mu", mode, (1.0, 0.0))
        return {"mu": np.maximum((sk + a - 1) / (nk + rate), _TINY)}
    if fam == "exponential":
        a, rate = _hyper(block, "scale", mode, (1.0, 0.0))
        lam = np.maximum((nk + a - 1) / (sk + rate), _TINY)
        return {"scale": lam if block.slots["scale"].inverse else 1.0 / lam}
    return _normal(block, gamma, x, nk, sk, mode, kind)


def _normal(block, gamma, x, nk, sk, mode, kind) -> dict:
    out = {}
    if "sigma" in block.consts:
        sigma = _per_cell(block.consts["sigma"], *gamma.shape, kind)[0]
        prior = block.priors.get("mu")
        if mode == "map" and prior is not None and prior[0] == "normal":
            m0, s0 = (np.asarray(h, dtype=float) for h in prior[1:])
            prec = 1 / s0**2 + nk / sigma**2
            out["mu"] = (m0 / s0**2 + sk / sigma**2) / prec
            return out
    mu = sk / nk
    if "mu" in block.slots:
        out["mu"] = mu
    else:
        mu = _per_cell(block.consts["mu"], *gamma.shape, kind)[0]
    if "sigma" in block.slots:
        var = np.einsum("ik,ik->k", gamma, (x[:, None] - mu[None, :]) ** 2) / nk
        out["sigma"] = np.sqrt(np.maximum(var, _TINY))
    return out


def closed_form_update(
    plan: ClosedFormPlan,
    gamma: np.ndarray,
    data: dict[str, np.ndarray],
    params: dict[str, np.ndarray],
    mode: str,
    kind: str,
) -> dict[str, np.ndarray]:
    """New constrained values of every closed-form variable; ``params`` is not mutated.

    ``data`` maps observed names to arrays, ``params`` free-variable names to current
    constrained values; ``kind`` is the MixtureGraph kind.
    """
    new = {name: np.array(value, dtype=float) for name, value in params.items()}
    for block in plan.blocks:
        if block.data_name is None:
            values = {next(iter(block.slots)): _weights(block, gamma, mode)}
        else:
            x = np.asarray(data[block.data_name], dtype=float).reshape(gamma.shape[0])
            values = _family(block, gamma, x, mode, kind)
        for name, per_comp in values.items():
            for (rv, j), v in zip(block.slots[name].refs, per_comp, strict=True):
                new[rv.name].reshape(-1)[j] = v
    return {name: new[name] for name in plan.closed}
