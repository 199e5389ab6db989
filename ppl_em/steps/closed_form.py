"""Closed-form M-step of the family blocks, from the E-step's statistics.

For each block of a :class:`~ppl_em.model.recognise.ClosedFormPlan` the update maximises
``sum_ik gamma_ik log p(x_i | theta_k) + log p(theta)`` exactly:

* weights, Dirichlet(a):   ``w_k ∝ N_k + a_k - 1``                (flat: ``N_k / N``)
* Binomial/Bernoulli, Beta(a, b): ``p_k = (S_k + a - 1) / (n N_k + a + b - 2)``
* Poisson, Gamma(a, rate b):      ``mu_k = (S_k + a - 1) / (N_k + b)``
* Exponential rate, Gamma(a, b):  ``lam_k = (N_k + a - 1) / (S_k + b)``  (the seed's update)
* Normal:  ``mu_k = S_k / N_k``, ``sigma_k^2 = sum_i gamma_ik (x_i - mu_k)^2 / N_k``; with a
  Normal(m0, s0) prior on ``mu`` and a fixed ``sigma`` the precision-weighted mean.

with ``N_k = sum_i gamma_ik`` and ``S_k = sum_i gamma_ik x_i``. In ``mode="mle"`` every
prior term is dropped (``a = b = 1``, ``rate = 0``, flat ``mu``). Everything is read from
:class:`~ppl_em.steps.stats.Stats`; a Normal variance whose moments would cancel (see
:mod:`ppl_em.steps.columns`) is taken about the new mean in a second pass over the
responsibilities, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ppl_em.model.recognise import Block, ClosedFormPlan
from ppl_em.steps.columns import CANCELLATION_LIMIT, StatsRequest
from ppl_em.steps.stats import TINY, DataChunk, Stats

# Responsibilities and data chunk by chunk, for what the statistics cannot give:
# ``batches()`` yields ``(gamma_t, chunk)`` with ``gamma_t`` the K x n responsibilities.
Batches = Callable[[], Iterable[tuple[np.ndarray, DataChunk]]]


def _hyper(block: Block, name: str, mode: str, default: tuple) -> tuple:
    prior = block.priors.get(name)
    if mode == "mle" or prior is None or prior[0] in ("flat",):
        return default
    return tuple(np.asarray(h, dtype=float) for h in prior[1:])


def _weights(block: Block, nk: np.ndarray, mode: str) -> np.ndarray:
    if block.family == "bernoulli_label":
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        return np.clip((nk[1] + a - 1) / (nk.sum() + a + b - 2), TINY, 1 - 1e-16)[None]
    (alpha,) = _hyper(block, "w", mode, (np.ones_like(nk),))
    w = np.maximum(nk + alpha - 1, TINY)
    return w / w.sum()


def _conjugate(block: Block, nk, sk, trials, mode: str) -> dict | None:
    """The count and rate families' updates from ``N_k``, ``S_k`` (and Binomial trials)."""
    fam = block.family
    if fam in ("binomial", "bernoulli"):
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        return {"p": np.clip((sk + a - 1) / (trials + a + b - 2), TINY, 1 - 1e-16)}
    if fam == "poisson":
        a, rate = _hyper(block, "mu", mode, (1.0, 0.0))
        return {"mu": np.maximum((sk + a - 1) / (nk + rate), TINY)}
    if fam == "exponential":
        a, rate = _hyper(block, "scale", mode, (1.0, 0.0))
        lam = np.maximum((nk + a - 1) / (sk + rate), TINY)
        return {"scale": lam if block.slots["scale"].inverse else 1.0 / lam}
    return None


def _normal_mean(block: Block, nk, sk, mode: str) -> tuple[np.ndarray, dict]:
    """``(mu, {"mu": ...} or {})``: with a fixed sigma and a Normal prior on mu the
    precision-weighted mean; otherwise the responsibility-weighted mean (or the fixed
    mean, if mu is constant)."""
    if "sigma" in block.consts:
        sigma = np.asarray(block.consts["sigma"], dtype=float)
        prior = block.priors.get("mu")
        if mode == "map" and prior is not None and prior[0] == "normal":
            m0, s0 = (np.asarray(h, dtype=float) for h in prior[1:])
            mu = (m0 / s0**2 + sk / sigma**2) / (1 / s0**2 + nk / sigma**2)
            return mu, {"mu": mu}
    if "mu" in block.slots:
        mu = sk / nk
        return mu, {"mu": mu}
    return np.asarray(block.consts["mu"], dtype=float), {}


def _variance_from_stats(nk, s1, s2, mu_shift) -> np.ndarray | None:
    """``s2/N_k - (s1/N_k)^2`` plus the squared distance to the new mean, or None when
    float64 cannot give it accurately (cancellation, overflow or underflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        shift = s1 / nk
        moment = s2 / nk
        var = moment - shift**2
        accurate = np.all(np.isfinite(moment)) and np.all((moment > 1e-200) & (moment < 1e200))
        if not (accurate and np.all(shift**2 <= CANCELLATION_LIMIT * var)):
            return None
        # About a mean other than the weighted one (fixed, or shrunk by a prior).
        return var + (shift - mu_shift) ** 2


def _sd_two_pass(batches: Batches, name: str, names, mu, nk) -> np.ndarray:
    """``sqrt(sum_i gamma_ik (x_i - mu_k)^2 / N_k)`` without squaring the data or the
    result: the deviations are scaled by their largest magnitude (squares overflow near
    1e300 and underflow near 1e-300)."""
    col = names.index(name)
    scale = np.zeros_like(mu)
    for gamma_t, chunk in batches():
        dev = np.asarray(chunk.arrays[col], dtype=float).reshape(1, -1) - mu[:, None]
        scale = np.maximum(scale, np.max(np.abs(np.where(gamma_t > 0, dev, 0.0)), axis=1))
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    total = np.zeros_like(mu)
    for gamma_t, chunk in batches():
        dev = np.asarray(chunk.arrays[col], dtype=float).reshape(1, -1) - mu[:, None]
        total += np.einsum("kn,kn->k", gamma_t, (dev / scale[:, None]) ** 2)
    return scale * np.sqrt(total / nk)


def _normal(block: Block, b: int, stats: Stats, request: StatsRequest, mode, batches) -> dict:
    nk = np.maximum(stats.nk, TINY)
    offset = request.offsets[b]
    s1 = stats.s[request.index[(b, "x")]]
    mu, out = _normal_mean(block, nk, s1 + offset * nk, mode)
    if "sigma" not in block.slots:
        return out
    reg_covar = float(block.consts.get("reg_covar", 0.0))
    var = _variance_from_stats(nk, s1, stats.s[request.index[(b, "xx")]], mu - offset)
    if var is None:
        sd = _sd_two_pass(batches, block.data_name, request.names, mu, nk)
        sd = np.hypot(sd, np.sqrt(reg_covar)) if reg_covar > 0 else sd
    else:
        sd = np.sqrt(var + reg_covar)
    # At least the smallest float: data near 1e-300 have legitimately tiny sigma.
    out["sigma"] = np.maximum(sd, TINY)
    return out


def _family(block: Block, b: int, stats: Stats, request: StatsRequest, mode, batches) -> dict:
    if block.family == "normal":
        return _normal(block, b, stats, request, mode, batches)
    nk = np.maximum(stats.nk, TINY)
    sk = stats.s[request.index[(b, "x")]]
    trials = None
    if block.family in ("binomial", "bernoulli"):
        if (b, "n") in request.index:
            trials = stats.s[request.index[(b, "n")]]
        else:
            trials = np.asarray(block.consts.get("n", 1.0), dtype=float) * stats.nk
    return _conjugate(block, nk, sk, trials, mode)


def closed_form_update(
    plan: ClosedFormPlan,
    stats: Stats,
    request: StatsRequest,
    params: dict[str, np.ndarray],
    mode: str,
    batches: Batches | None = None,
) -> dict[str, np.ndarray]:
    """New constrained values of every variable of the plan's family blocks.

    ``params`` maps free-variable names to current constrained values (not mutated);
    ``batches`` gives the responsibilities for a variance whose statistics would cancel.
    """
    new = {name: np.array(value, dtype=float) for name, value in params.items()}
    for b, block in enumerate(plan.blocks):
        if block.data_name is None:
            values = {next(iter(block.slots)): _weights(block, stats.nk, mode)}
        else:
            values = _family(block, b, stats, request, mode, batches)
        for name, per_comp in values.items():
            for (rv, j), v in zip(block.slots[name].refs, per_comp, strict=True):
                new[rv.name].reshape(-1)[j] = v
    return {name: new[name] for name in plan.closed}
