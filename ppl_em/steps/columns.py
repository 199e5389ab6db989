"""The statistics columns: per-observation values whose responsibility-weighted sums
give the closed-form M-step.

For a Normal block: the data centred on a fixed offset (the mean of the whole data)
and their squares; for a Binomial block with per-observation trials: the trials; for
a Categorical block: one indicator per item and category; for
a Gaussian regression block: the products of its covariates (1 for an intercept) with
each other and with the response, and the squared response; for an MvNormal block:
the centred data and all pairwise products. The offsets are fixed
once per dataset, so the columns of any chunk are those rows of the whole data's
columns, and the weighted sums add up across chunks.

Second moments about the data mean lose ``eps * (shift^2 / var + 1)`` of a variance to
cancellation, ``shift`` being a component's offset from that mean: with
``CANCELLATION_LIMIT`` on ``shift^2 / var`` at most 2e-12 relative; beyond it the
M-step takes the moments about the component's own mean in a second pass.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ppl_em.model.blocks import Block
from ppl_em.model.recognise import ClosedFormPlan
from ppl_em.model.slots import DataRef

CANCELLATION_LIMIT = 1e4


class StatsRequest(NamedTuple):
    """Which columns the fused E-step sums, for a plan and a dataset.

    ``index`` maps ``(block number, role, item)`` (role ``"x"``, ``"xx"`` or ``"n"``)
    and ``("mvn", i, *name)`` to the column's row; ``offsets[b]`` holds the Normal
    block b's centre per item, ``mvn_means[i]`` the MvNormal block i's; ``names`` are
    the data names the chunks' arrays follow.
    """

    plan: ClosedFormPlan
    names: tuple[str, ...]
    index: dict[tuple, int]
    offsets: dict[int, np.ndarray]
    mvn_means: tuple[np.ndarray, ...]
    labels_per_row: int = 1

    def columns(self, arrays) -> np.ndarray:
        """The M x n columns of a chunk's arrays (n labels: rows x labels per row)."""
        data = dict(zip(self.names, arrays, strict=True))
        n = np.shape(arrays[0])[0] * self.labels_per_row
        out = np.empty((len(self.index), n))
        for b, block in enumerate(self.plan.all_blocks):
            if block.data_name is not None:
                offset = self.offsets.get(b, np.zeros(block.items))
                _block_columns(out, self.index, b, block, data, offset)
        for i, spec in enumerate(self.plan.mvn):
            if spec.missing:
                continue  # its moments are conditional on each row's observed part
            x = np.asarray(data[spec.data_name], dtype=float).reshape(n, -1) - self.mvn_means[i]
            for a in range(x.shape[1]):
                out[self.index[("mvn", i, "x", a)]] = x[:, a]
                for c in range(a, x.shape[1]):
                    np.multiply(x[:, a], x[:, c], out=out[self.index[("mvn", i, "xx", a, c)]])
        return out


def trials_source(block: Block):
    """A Binomial block's per-observation trials (:class:`DataRef`), or None."""
    n = block.consts.get("n")
    return n if isinstance(n, DataRef) else None


def coefficients(block: Block) -> list[str]:
    """A linear-predictor block's coefficient slots ``b0, b1, ...`` in order."""
    return sorted((n for n in block.slots if n != "sigma"), key=lambda n: int(n[1:]))


def covariate(block: Block, name: str, data: dict, n: int) -> np.ndarray:
    """Coefficient ``name``'s covariate over the chunk (ones for an intercept)."""
    ref = block.consts.get(f"x{name[1:]}")
    if ref is None:
        return np.ones(n)
    values = ref.array if ref.name is None else data[ref.name]
    return np.asarray(values, dtype=float).reshape(n)


def _linear_columns(out, index, b: int, block: Block, data: dict) -> None:
    n = out.shape[1]
    y = np.asarray(data[block.data_name], dtype=float).reshape(n)
    cov = [covariate(block, name, data, n) for name in coefficients(block)]
    for j, cj in enumerate(cov):
        np.multiply(cj, y, out=out[index[(b, "cy", j)]])
        for m in range(j, len(cov)):
            np.multiply(cj, cov[m], out=out[index[(b, "cc", j, m)]])
    np.multiply(y, y, out=out[index[(b, "yy", 0)]])


def _categorical_columns(out, index, b: int, block: Block, data: dict) -> None:
    x = np.asarray(data[block.data_name]).reshape(out.shape[1], block.items)
    for d in range(block.items):
        for c in range(int(block.consts["n_categories"])):
            np.equal(x[:, d], c, out=out[index[(b, "c", d, c)]], casting="unsafe")


def _block_columns(out, index, b: int, block: Block, data: dict, offset: np.ndarray) -> None:
    if block.family == "categorical":
        _categorical_columns(out, index, b, block, data)
        return
    if block.family == "normal_linear":
        _linear_columns(out, index, b, block, data)
        return
    x = np.asarray(data[block.data_name], dtype=float).reshape(out.shape[1], block.items)
    source = trials_source(block)
    trials = None
    if source is not None:
        trials = source.array if source.name is None else data[source.name]
        trials = np.asarray(trials, dtype=float).reshape(out.shape[1], -1)
    for d in range(block.items):
        if block.family == "normal":
            dev = np.subtract(x[:, d], offset[d], out=out[index[(b, "x", d)]])
            # Data near 1e300 overflow here; the M-step sees the non-finite moment and
            # takes the second pass instead, so the warning is noise.
            with np.errstate(over="ignore"):
                np.multiply(dev, dev, out=out[index[(b, "xx", d)]])
            continue
        out[index[(b, "x", d)]] = x[:, d]
        if trials is not None:
            out[index[(b, "n", d)]] = trials[:, d if trials.shape[1] > 1 else 0]


def _roles(plan: ClosedFormPlan, dims: dict[int, int]) -> list[tuple]:
    keys = []
    for b, block in enumerate(plan.all_blocks):
        if block.data_name is None:
            continue
        if block.family == "categorical":
            cats = int(block.consts["n_categories"])
            keys += [(b, "c", d, c) for d in range(block.items) for c in range(cats)]
            continue
        if block.family == "normal_linear":
            j = len(coefficients(block))
            keys += [(b, "cy", a) for a in range(j)]
            keys += [(b, "cc", a, c) for a in range(j) for c in range(a, j)]
            keys.append((b, "yy", 0))
            continue
        for d in range(block.items):
            keys.append((b, "x", d))
            if block.family == "normal":
                keys.append((b, "xx", d))
            elif trials_source(block) is not None:
                keys.append((b, "n", d))
    for i, d in dims.items():
        keys += [("mvn", i, "x", a) for a in range(d)]
        keys += [("mvn", i, "xx", a, c) for a in range(d) for c in range(a, d)]
    return keys


def stats_request(plan: ClosedFormPlan, names, arrays, labels_per_row: int = 1) -> StatsRequest:
    """The request for ``plan``, centred on the means of ``arrays`` (the whole data, or
    for data too large for memory, a representative chunk)."""
    data = dict(zip(names, arrays, strict=True))
    offsets = {}
    for b, block in enumerate(plan.all_blocks):
        if block.family == "normal" and block.data_name is not None:
            x = np.asarray(data[block.data_name], dtype=float).reshape(-1, block.items)
            offsets[b] = x.mean(axis=0)
    means, dims = [], {}
    for i, spec in enumerate(plan.mvn):
        x = np.asarray(data[spec.data_name], dtype=float)
        x = x.reshape(x.shape[0] * labels_per_row, -1)
        means.append(x.mean(axis=0))
        if not spec.missing:
            dims[i] = x.shape[1]
    index = {key: row for row, key in enumerate(_roles(plan, dims))}
    return StatsRequest(plan, tuple(names), index, offsets, tuple(means), labels_per_row)
