"""Closed-form M-step of the family blocks, from the E-step's statistics.

For each block of a :class:`~ppl_em.model.recognise.ClosedFormPlan` the update maximises
``sum_ik gamma_ik log p(x_i | theta_k) + log p(theta)`` exactly. With ``N_k = sum_i
gamma_ik`` and ``S_kd = sum_i gamma_ik x_id`` (item d of observation i), per value of a
parameter, its sums pooled over the axes it is shared along (items for ``theta[z]``
of shape (K,) on (N, D) data; components for a tied parameter):

* weights, Dirichlet(a):   ``w_k ∝ N_k + a_k - 1``                (flat: ``N_k / N``)
* Binomial/Bernoulli, Beta(a, b): ``p = (S + a - 1) / (T + a + b - 2)``, T the trials
  (latent class analysis: one ``p`` per class and item)
* Categorical items, Dirichlet(a): ``p_kdc ∝ S_kdc + a_c - 1``, S the weighted count of
  category c in item d
* Poisson, Gamma(a, rate b):      ``mu = (S + a - 1) / (N + b)``
* Exponential rate, Gamma(a, b):  ``lam = (N + a - 1) / (S + b)``  (the seed's update)
* Normal: ``mu = S / N`` (with known scales, precision-weighted, and with a Normal
  prior, shrunk to it); ``sigma^2 = sum gamma (x - mu)^2 / N``, pooled over items for a
  spherical scale and over components for a tied one (diagonal covariances: one pair
  per class and item).
* Gaussian regression (a linear predictor ``mu = C b[z]``), flat priors: weighted
  least squares ``b_k = (sum gamma C C')^-1 sum gamma C y`` and ``sigma_k^2`` the
  weighted residual sum of squares over ``N_k``.

In ``mode="mle"`` every prior term is dropped (``a = b = 1``, ``rate = 0``, flat
``mu``). Everything is read from :class:`~ppl_em.steps.stats.Stats`; a Normal variance
whose moments would cancel (see :mod:`ppl_em.steps.columns`) is taken about the new
mean in a second pass over the responsibilities, chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ppl_em.model.blocks import Block
from ppl_em.model.recognise import ClosedFormPlan
from ppl_em.model.slots import Slot
from ppl_em.steps.columns import CANCELLATION_LIMIT, StatsRequest, coefficients, covariate
from ppl_em.steps.stats import TINY, DataChunk, Stats

# A residual sum of squares below this fraction of the squared responses' sum has lost
# more than 1e-10 of itself to cancellation: it is then summed from the data.
CANCELLATION_RSS = 1e-6

# Responsibilities and data chunk by chunk, for what the statistics cannot give:
# ``batches()`` yields ``(gamma_t, chunk)`` with ``gamma_t`` the K x n responsibilities.
Batches = Callable[[], Iterable[tuple[np.ndarray, DataChunk]]]


def _hyper(block: Block, name: str, mode: str, default: tuple) -> tuple:
    """A slot's prior hyperparameters, one per value of the slot
    (:func:`ppl_em.model.blocks.slot_prior`), or the ``default`` scalars."""
    prior = block.priors.get(name)
    if mode == "mle" or prior is None or prior[0] in ("flat",):
        return default
    return tuple(np.asarray(h, dtype=float).reshape(len(block.slots[name].refs)) for h in prior[1:])


def _pool(arr: np.ndarray, axes: tuple[str, ...]) -> np.ndarray:
    """Sum a (K, D) array over the axes a parameter is shared along; its values in the
    slot's order."""
    if "d" not in axes:
        arr = arr.sum(axis=1, keepdims=True)
    if "k" not in axes:
        arr = arr.sum(axis=0, keepdims=True)
    return arr.reshape(-1)


def _spread(values: np.ndarray, axes: tuple[str, ...], shape: tuple[int, int]) -> np.ndarray:
    """A slot's values back on the (K, D) grid."""
    k, d = shape
    return np.broadcast_to(np.reshape(values, (k if "k" in axes else 1, d if "d" in axes else 1)),
                           shape)  # fmt: skip


def _weights(block: Block, nk: np.ndarray, mode: str) -> np.ndarray:
    if block.family == "bernoulli_label":
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        return np.clip((nk[1] + a - 1) / (nk.sum() + a + b - 2), TINY, 1 - 1e-16).reshape(1)
    (alpha,) = _hyper(block, "w", mode, (np.ones_like(nk),))
    w = np.maximum(nk + alpha - 1, TINY)
    return w / w.sum()


def role_sums(stats: Stats, request: StatsRequest, b: int, role: str, items: int) -> np.ndarray:
    """The (K, D) weighted sums of a block's column ``role`` (zeros if it has none)."""
    if (b, role, 0) not in request.index:
        return np.zeros((stats.nk.size, items))
    return np.stack([stats.s[request.index[(b, role, d)]] for d in range(items)], axis=1)


def _conjugate(block: Block, b: int, stats: Stats, request: StatsRequest, mode: str) -> dict:
    """The count and rate families' updates."""
    nk = np.broadcast_to(stats.nk[:, None], (stats.nk.size, block.items))
    sk = role_sums(stats, request, b, "x", block.items)
    slot = next(iter(block.slots.values()))
    pool = lambda arr: _pool(arr, slot.axes)  # noqa: E731
    if block.family in ("binomial", "bernoulli"):
        if (b, "n", 0) in request.index:
            trials = role_sums(stats, request, b, "n", block.items)
        else:
            trials = np.asarray(block.consts.get("n", 1.0), dtype=float).reshape(-1, 1) * nk
        a, bb = _hyper(block, "p", mode, (1.0, 1.0))
        return {"p": np.clip((pool(sk) + a - 1) / (pool(trials) + a + bb - 2), TINY, 1 - 1e-16)}
    if block.family == "poisson":
        a, rate = _hyper(block, "mu", mode, (1.0, 0.0))
        return {"mu": np.maximum((pool(sk) + a - 1) / (pool(nk) + rate), TINY)}
    a, rate = _hyper(block, "scale", mode, (1.0, 0.0))
    lam = np.maximum((pool(nk) + a - 1) / (pool(sk) + rate), TINY)
    return {"scale": lam if block.slots["scale"].inverse else 1.0 / lam}


def _normal_mean(block: Block, nk, sk, mode: str) -> tuple[np.ndarray, dict]:
    """``(mu on the (K, D) grid, {"mu": slot values} or {})``: the weighted mean, by
    precision where the scales are known, shrunk by a Normal prior."""
    shape = nk.shape
    if "mu" not in block.slots:
        return np.broadcast_to(np.asarray(block.consts["mu"], dtype=float)[:, None], shape), {}
    slot = block.slots["mu"]
    known = "sigma" in block.consts
    w = 1.0 / np.asarray(block.consts["sigma"], dtype=float)[:, None] ** 2 if known else 1.0
    num, den = _pool(w * sk, slot.axes), _pool(w * nk, slot.axes)
    prior = block.priors.get("mu")
    if known and mode == "map" and prior is not None and prior[0] == "normal":
        m0, s0 = _hyper(block, "mu", mode, (0.0, np.inf))
        num, den = num + m0 / s0**2, den + 1 / s0**2
    mu = num / den
    return _spread(mu, slot.axes, shape), {"mu": mu}


def second_moments(nk, s1, s2, mu_shift) -> np.ndarray | None:
    """``sum gamma (x - mu)^2`` per (k, d) from the centred sums, or None when float64
    cannot give it accurately (cancellation, overflow or underflow)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        shift = s1 / nk
        moment = s2 / nk
        var = moment - shift**2
        live = nk > TINY
        accurate = np.all(np.isfinite(moment)) and np.all(
            ~live | ((moment > 1e-200) & (moment < 1e200))
        )
        if not (accurate and np.all(~live | (shift**2 <= CANCELLATION_LIMIT * var))):
            return None
        return nk * (var + (shift - mu_shift) ** 2)


def _sd_two_pass(batches: Batches, block: Block, names, mu: np.ndarray, slot: Slot, nk):
    """The pooled ``sqrt(sum gamma (x - mu)^2 / N)`` without squaring the data: each
    group's deviations are scaled by their largest magnitude (squares overflow near
    1e300 and underflow near 1e-300)."""
    col = names.index(block.data_name)
    scale = np.zeros_like(mu)
    for gamma_t, chunk in batches():
        x = np.asarray(chunk.arrays[col], dtype=float).reshape(-1, block.items)
        dev = np.abs(x[None, :, :] - mu[:, None, :]) * (gamma_t[:, :, None] > 0)
        scale = np.maximum(scale, dev.max(axis=1))
    group = _spread(_pool_max(scale, slot.axes), slot.axes, mu.shape)
    group = np.where(np.isfinite(group) & (group > 0), group, 1.0)
    total = np.zeros_like(mu)
    for gamma_t, chunk in batches():
        x = np.asarray(chunk.arrays[col], dtype=float).reshape(-1, block.items)
        dev = (x[None, :, :] - mu[:, None, :]) / group[:, None, :]
        total += np.einsum("kn,knd->kd", gamma_t, dev**2)
    # one scale per pooled group, so the group's sums add up in the same units
    return _pool_max(group, slot.axes) * np.sqrt(_pool(total, slot.axes) / _pool(nk, slot.axes))


def _pool_max(arr: np.ndarray, axes: tuple[str, ...]) -> np.ndarray:
    if "d" not in axes:
        arr = arr.max(axis=1, keepdims=True)
    if "k" not in axes:
        arr = arr.max(axis=0, keepdims=True)
    return arr.reshape(-1)


def _normal(block: Block, b: int, stats: Stats, request: StatsRequest, mode, batches) -> dict:
    nk = np.broadcast_to(np.maximum(stats.nk, TINY)[:, None], (stats.nk.size, block.items))
    offset = request.offsets[b][None, :]
    s1 = role_sums(stats, request, b, "x", block.items)
    mu, out = _normal_mean(block, nk, s1 + offset * nk, mode)
    if "sigma" not in block.slots:
        return out
    slot = block.slots["sigma"]
    reg_covar = float(block.consts.get("reg_covar", 0.0))
    m2 = second_moments(nk, s1, role_sums(stats, request, b, "xx", block.items), mu - offset)
    if m2 is None:
        sd = _sd_two_pass(batches, block, request.names, mu, slot, nk)
        sd = np.hypot(sd, np.sqrt(reg_covar)) if reg_covar > 0 else sd
    else:
        sd = np.sqrt(_pool(m2, slot.axes) / _pool(nk, slot.axes) + reg_covar)
    # At least the smallest float: data near 1e-300 have legitimately tiny sigma.
    out["sigma"] = np.maximum(sd, TINY)
    return out


def linear_moments(stats: Stats, request: StatsRequest, b: int, j: int):
    """``(A, r, yy)`` of a linear-predictor block: per component the weighted sums of
    covariate products (K, J, J), of covariates times response (K, J), and of squared
    responses (K,)."""
    k = stats.nk.size
    a, r = np.empty((k, j, j)), np.empty((k, j))
    for p in range(j):
        r[:, p] = stats.s[request.index[(b, "cy", p)]]
        for q in range(p, j):
            a[:, p, q] = a[:, q, p] = stats.s[request.index[(b, "cc", p, q)]]
    return a, r, stats.s[request.index[(b, "yy", 0)]]


def least_squares(a: np.ndarray, r: np.ndarray, yy: np.ndarray):
    """Per component, the coefficients minimising the weighted residual sum of squares
    ``yy - 2 b'r + b'A b``, and that sum (from the sums, so it may cancel)."""
    beta = np.stack([np.linalg.lstsq(a[k], r[k], rcond=None)[0] for k in range(len(a))])
    return beta, yy - 2 * (beta * r).sum(axis=1) + np.einsum("kj,kjl,kl->k", beta, a, beta)


def _rss_two_pass(batches: Batches, block: Block, names, beta: np.ndarray) -> np.ndarray:
    """``sum_i gamma_ik (y_i - mu_ik)^2`` per component from the data: used where the
    sums of squares would cancel (residuals far smaller than the response)."""
    total = np.zeros(beta.shape[0])
    for gamma_t, chunk in batches():
        data = dict(zip(names, chunk.arrays, strict=True))
        n = gamma_t.shape[1]
        y = np.asarray(data[block.data_name], dtype=float).reshape(n)
        design = np.stack([covariate(block, c, data, n) for c in coefficients(block)])
        total += np.einsum("kn,kn->k", gamma_t, (y[None, :] - beta @ design) ** 2)
    return total


def _linear(block: Block, b: int, stats: Stats, request: StatsRequest, batches) -> dict:
    """Weighted least squares per component; the scale from the weighted residuals."""
    names = coefficients(block)
    a, r, yy = linear_moments(stats, request, b, len(names))
    beta, rss = least_squares(a, r, yy)
    out = {name: beta[:, j] for j, name in enumerate(names)}
    if "sigma" in block.slots:
        if not np.all(rss > CANCELLATION_RSS * yy):
            rss = _rss_two_pass(batches, block, request.names, beta)
        axes = block.slots["sigma"].axes
        nk = np.maximum(stats.nk, TINY)[:, None]
        out["sigma"] = np.maximum(np.sqrt(_pool(rss[:, None], axes) / _pool(nk, axes)), TINY)
    return out


def _categorical(block: Block, b: int, stats: Stats, request: StatsRequest, mode: str) -> dict:
    """``p_kdc = (S_kdc + a_c - 1) / sum_c (S_kdc + a_c - 1)``, S the weighted count of
    category c in item d (Dirichlet(a) prior; a = 1 in mode="mle")."""
    k, d, cats = stats.nk.size, block.items, int(block.consts["n_categories"])
    counts = np.empty((k, d, cats))
    for j in range(d):
        for c in range(cats):
            counts[:, j, c] = stats.s[request.index[(b, "c", j, c)]]
    prior = block.priors.get("p")
    alpha = prior[1] if mode == "map" and prior and prior[0] == "dirichlet" else 1.0
    num = np.maximum(counts + np.broadcast_to(alpha, counts.shape) - 1, 0.0)
    p = np.maximum(num / np.maximum(num.sum(axis=2, keepdims=True), TINY), TINY)
    return {"p": (p / p.sum(axis=2, keepdims=True)).reshape(-1)}


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
        elif block.family == "normal":
            values = _normal(block, b, stats, request, mode, batches)
        elif block.family == "normal_linear":
            values = _linear(block, b, stats, request, batches)
        elif block.family == "categorical":
            values = _categorical(block, b, stats, request, mode)
        else:
            values = _conjugate(block, b, stats, request, mode)
        for name, flat in values.items():
            for (rv, j), v in zip(block.slots[name].refs, np.reshape(flat, -1), strict=True):
                new[rv.name].reshape(-1)[j] = v
    return {name: new[name] for name in plan.closed}
