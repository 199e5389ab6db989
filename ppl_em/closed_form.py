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

from typing import NamedTuple

import numpy as np

from ppl_em.mvnormal import CANCELLATION_LIMIT, mvn_columns
from ppl_em.recognise import Block, ClosedFormPlan

# A component that owns no observation would get a weight or a rate of exactly 0 or
# inf, which no transform maps back to a finite unconstrained value. The smallest normal
# float, not 1e-300: data near 1e300 have legitimate rates below 1e-300.
_TINY = float(np.finfo(np.float64).tiny)


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
    return _weights_from_nk(block, gamma.sum(axis=0), mode)


def _weights_from_nk(block: Block, nk: np.ndarray, mode: str) -> np.ndarray:
    if block.family == "bernoulli_label":
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        return np.clip((nk[1] + a - 1) / (nk.sum() + a + b - 2), _TINY, 1 - 1e-16)[None]
    (alpha,) = _hyper(block, "w", mode, (np.ones_like(nk),))
    w = np.maximum(nk + alpha - 1, _TINY)
    return w / w.sum()


def _conjugate(block: Block, nk, sk, trials, mode: str) -> dict | None:
    """The count and rate families' updates from ``N_k``, ``S_k`` (and Binomial trials)."""
    fam = block.family
    if fam in ("binomial", "bernoulli"):
        a, b = _hyper(block, "p", mode, (1.0, 1.0))
        return {"p": np.clip((sk + a - 1) / (trials + a + b - 2), _TINY, 1 - 1e-16)}
    if fam == "poisson":
        a, rate = _hyper(block, "mu", mode, (1.0, 0.0))
        return {"mu": np.maximum((sk + a - 1) / (nk + rate), _TINY)}
    if fam == "exponential":
        a, rate = _hyper(block, "scale", mode, (1.0, 0.0))
        lam = np.maximum((nk + a - 1) / (sk + rate), _TINY)
        return {"scale": lam if block.slots["scale"].inverse else 1.0 / lam}
    return None


def _family(block: Block, gamma: np.ndarray, x: np.ndarray, mode: str, kind: str) -> dict:
    n_obs, n_comp = gamma.shape
    nk = np.maximum(gamma.sum(axis=0), _TINY)
    sk = gamma.T @ x
    trials = None
    if block.family in ("binomial", "bernoulli"):
        n = _per_cell(block.consts.get("n", 1.0), n_obs, n_comp, kind)
        trials = np.einsum("ik,ik->k", gamma, n)
    out = _conjugate(block, nk, sk, trials, mode)
    if out is not None:
        return out
    return _normal(block, gamma, x, nk, sk, mode, kind)


def _normal_mean(block, nk, sk, mode, kind, shape) -> tuple[np.ndarray, dict]:
    """The Normal mean update shared by both M-step paths: ``(mu, {"mu": ...} or {})``.

    With a fixed sigma and a Normal prior on mu it is the precision-weighted mean;
    otherwise the responsibility-weighted mean (or the fixed mean, if mu is constant).
    """
    if "sigma" in block.consts:
        sigma = _per_cell(block.consts["sigma"], *shape, kind)[0]
        prior = block.priors.get("mu")
        if mode == "map" and prior is not None and prior[0] == "normal":
            m0, s0 = (np.asarray(h, dtype=float) for h in prior[1:])
            mu = (m0 / s0**2 + sk / sigma**2) / (1 / s0**2 + nk / sigma**2)
            return mu, {"mu": mu}
    if "mu" in block.slots:
        mu = sk / nk
        return mu, {"mu": mu}
    return _per_cell(block.consts["mu"], *shape, kind)[0], {}


def _normal(block, gamma, x, nk, sk, mode, kind) -> dict:
    mu, out = _normal_mean(block, nk, sk, mode, kind, gamma.shape)
    if "sigma" in block.slots:
        out["sigma"] = _normal_sigma(gamma, x, mu, nk, float(block.consts.get("reg_covar", 0.0)))
    return out


def _normal_sigma(gamma, x, mu, nk, reg_covar) -> np.ndarray:
    """``sqrt(sum_i gamma_ik (x_i - mu_k)^2 / N_k + reg_covar)`` without squaring the data.

    Squaring overflows for data near 1e300 and underflows near 1e-300, so the deviations
    are scaled by their largest magnitude first. ``reg_covar`` is scikit-learn's floor
    on each component variance (set by ``fit(reg_covar=...)``); it keeps a component
    that owns a single point from collapsing to sigma = 0.
    """
    dev = x[:, None] - mu[None, :]
    scale = np.max(np.abs(np.where(gamma > 0, dev, 0.0)), axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    sd = scale * np.sqrt(np.einsum("ik,ik->k", gamma, (dev / scale) ** 2) / nk)
    if reg_covar > 0:
        sd = np.hypot(sd, np.sqrt(reg_covar))
    # The smallest normal float, not _TINY: data near 1e-300 have legitimately tiny sigma.
    return np.maximum(sd, np.finfo(float).tiny)


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


class StatsRequest(NamedTuple):
    """What the fused E-step must accumulate for the closed-form blocks.

    ``columns`` is an M x N float64 array, one per-observation column per row: the
    observed values (for a Normal block centred on ``offsets[b]``, their mean, plus the
    squares of the centred values), per-observation Binomial trials, and the MvNormal
    blocks' centred values and products (:func:`ppl_em.mvnormal.mvn_columns`). ``index``
    maps ``(block number, role)`` (role ``"x"``, ``"xx"`` or ``"n"``) and
    ``("mvn", i, *name)`` to the row. It depends on the data only, so
    :class:`RequestCache` builds it once per dataset.
    """

    columns: np.ndarray
    index: dict[tuple, int]
    offsets: dict[int, float]
    mvn_means: tuple[np.ndarray, ...] = ()


def _block_columns(block: Block, b: int, x: np.ndarray, n_obs: int, n_comp: int, kind: str):
    """``(named columns, offset)`` of one closed-form block, or None if the statistics
    cannot express its update (trials neither per observation nor per component)."""
    if block.family == "normal":
        offset = float(np.mean(x))
        dev = x - offset
        # Data near 1e300 overflow here; the M-step sees the non-finite moment and uses
        # the full responsibilities instead, so the warning is noise.
        with np.errstate(over="ignore"):
            return [((b, "x"), dev), ((b, "xx"), dev * dev)], offset
    named = [((b, "x"), x)]
    if block.family == "binomial":
        n = np.asarray(block.consts["n"], dtype=float)
        if n.ndim == 1 and n.shape[0] == n_obs and kind == "label":
            named.append(((b, "n"), n))
        elif n.size not in (1, n_comp):
            return None
    return named, 0.0


def stats_request(
    plan: ClosedFormPlan, data: dict[str, np.ndarray], n_obs: int, n_comp: int, kind: str
) -> StatsRequest | None:
    """The columns :func:`closed_form_from_stats` needs summed, or None when some block
    needs more than per-component weighted sums (then the M-step uses full gamma)."""
    named, offsets = [], {}
    for b, block in enumerate(plan.blocks):
        if block.data_name is None:
            continue
        if block.data_name not in data or np.size(data[block.data_name]) != n_obs:
            return None
        x = np.asarray(data[block.data_name], dtype=float).reshape(n_obs)
        found = _block_columns(block, b, x, n_obs, n_comp, kind)
        if found is None:
            return None
        named += found[0]
        offsets[b] = found[1]
    means = []
    for i, spec in enumerate(plan.mvn):
        raw = np.asarray(data[spec.data_name], dtype=float).reshape(n_obs, -1)
        mean, cols = mvn_columns(raw)
        means.append(mean)
        named += [(("mvn", i, *name), col) for name, col in cols]
    columns = np.empty((len(named), n_obs))
    for row, (_, col) in enumerate(named):
        columns[row] = col
    index = {key: row for row, (key, _) in enumerate(named)}
    return StatsRequest(columns, index, offsets, tuple(means))


class RequestCache:
    """:func:`stats_request` for the last data seen. The compiled functions' data are
    read-only copies (``ppl_em.compile``), fixed for a fit and replaced, not written, by
    ``with_data``; so the columns are built once per dataset, not once per E-step
    (building them takes 83 ms at N=10^6, D=4, more than the 57 ms of a whole iteration
    in ``make bench``). Writable arrays are never trusted."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._value: StatsRequest | None = None

    def __call__(
        self, plan: ClosedFormPlan, data: dict[str, np.ndarray], n_obs: int, n_comp: int,
        kind: str,
    ) -> StatsRequest | None:  # fmt: skip
        # The plan too: fit(reg_covar=...) hands a new plan with the same data.
        key = (plan, *data.values())
        same = len(key) == len(self._key) and all(
            a is b for a, b in zip(key, self._key, strict=True)
        )
        trusted = all(isinstance(a, np.ndarray) and not a.flags.writeable for a in key[1:])
        if not (same and trusted):
            self._key = key
            self._value = stats_request(plan, data, n_obs, n_comp, kind)
        return self._value


def _normal_from_stats(block: Block, nk, s1, s2, offset, mode, shape, kind) -> dict | None:
    """``_normal`` from the weighted sums of the centred data ``s1`` and of its squares
    ``s2``: the variance about the new mean is ``s2/N_k - (s1/N_k)^2``, exact unless the
    component sits more than 100 of its standard deviations from the data mean, where
    the subtraction would cancel.

    Returns None when that is not accurate in float64 (also when the moment overflowed or
    underflowed); the caller then uses ``_normal`` on the full responsibilities.
    """
    mu, out = _normal_mean(block, nk, s1 + offset * nk, mode, kind, shape)
    if "sigma" in block.slots:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            shift = s1 / nk
            moment = s2 / nk
            var = moment - shift**2
            accurate = np.all(np.isfinite(moment)) and np.all((moment > 1e-200) & (moment < 1e200))
            if not (accurate and np.all(shift**2 <= CANCELLATION_LIMIT * var)):
                return None
            # About a mean other than the weighted one (fixed, or shrunk by a prior).
            var = var + (shift - (mu - offset)) ** 2
        # Same floors as _normal_sigma: sqrt(var + reg_covar), at least the smallest float.
        var = var + float(block.consts.get("reg_covar", 0.0))
        out["sigma"] = np.maximum(np.sqrt(var), np.finfo(float).tiny)
    return out


def _family_from_stats(block, nk_raw, stats, request, b, mode, shape, kind) -> dict | None:
    nk = np.maximum(nk_raw, _TINY)
    sk = stats.s[request.index[(b, "x")]]
    if block.family == "normal":
        s2 = stats.s[request.index[(b, "xx")]]
        return _normal_from_stats(block, nk, sk, s2, request.offsets[b], mode, shape, kind)
    trials = None
    if block.family in ("binomial", "bernoulli"):
        if (b, "n") in request.index:
            trials = stats.s[request.index[(b, "n")]]
        else:
            trials = np.asarray(block.consts.get("n", 1.0), dtype=float).reshape(-1) * nk_raw
    return _conjugate(block, nk, sk, trials, mode)


def closed_form_from_stats(
    plan: ClosedFormPlan,
    stats,
    request: StatsRequest,
    params: dict[str, np.ndarray],
    mode: str,
    kind: str,
    n_obs: int,
) -> dict[str, np.ndarray] | None:
    """:func:`closed_form_update` from a fused E-step's :class:`~ppl_em.estep.EStepStats`;
    None when the statistics cannot give it accurately (use the full-gamma update)."""
    new = {name: np.array(value, dtype=float) for name, value in params.items()}
    shape = (n_obs, stats.nk.shape[0])
    for b, block in enumerate(plan.blocks):
        if block.data_name is None:
            values = {next(iter(block.slots)): _weights_from_nk(block, stats.nk, mode)}
        else:
            values = _family_from_stats(block, stats.nk, stats, request, b, mode, shape, kind)
            if values is None:
                return None
        for name, per_comp in values.items():
            for (rv, j), v in zip(block.slots[name].refs, per_comp, strict=True):
                new[rv.name].reshape(-1)[j] = v
    return {name: new[name] for name in plan.closed}
