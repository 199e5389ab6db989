"""What an E-step hands the M-step: statistics that add up over observations.

A :class:`Stats` holds, for a run of observations (a chunk), the log-likelihood, the
expected counts ``nk[k] = sum_i gamma_ik`` and the weighted sums
``s[m, k] = sum_i gamma_ik v_mi`` of the statistics columns ``v_m`` the closed-form
M-step asks for (:mod:`ppl_em.steps.columns`), and, only when asked, the chunk's
log-responsibilities. Two chunks' statistics combine with ``+``: the E-step over the
whole data is the sum over its chunks, whatever the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# The smallest normal float: the floor of counts, weights and rates, so that a component
# that owns no observation maps back to a finite unconstrained value (1e-300 would not
# do: data near 1e300 have legitimate rates below it).
TINY = float(np.finfo(np.float64).tiny)


class DataChunk(NamedTuple):
    """A run of observations: the per-observation arrays (in ``EMFunctions.data_names``
    order), the index of its first observation in the whole data, its statistics
    columns (M x n, or None when no statistics are asked for), and optionally a weight
    per observation (it counts that many times) and known labels (-1 where unknown)."""

    arrays: tuple[np.ndarray, ...]
    start: int = 0
    columns: np.ndarray | None = None
    weights: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.arrays[0].shape[0])


@dataclass(frozen=True)
class Stats:
    """Additive E-step statistics of ``n_obs`` observations (see the module docstring)."""

    n_obs: int
    loglik: float
    nk: np.ndarray
    s: np.ndarray
    log_resp: np.ndarray | None = None

    def __add__(self, other: Stats) -> Stats:
        both = self.log_resp is not None and other.log_resp is not None
        return Stats(
            n_obs=self.n_obs + other.n_obs,
            loglik=self.loglik + other.loglik,
            nk=self.nk + other.nk,
            s=self.s + other.s,
            log_resp=np.concatenate([self.log_resp, other.log_resp]) if both else None,
        )


def stats_from_resp(gamma: np.ndarray, columns: np.ndarray | None) -> Stats:
    """The statistics of given N x K responsibilities (no log-likelihood: NaN)."""
    gamma = np.asarray(gamma, dtype=float)
    s = np.zeros((0, gamma.shape[1])) if columns is None else columns @ gamma
    return Stats(gamma.shape[0], float("nan"), gamma.sum(axis=0), s, None)


def total(parts) -> Stats:
    """The sum of an iterable of statistics (at least one)."""
    parts = iter(parts)
    out = next(parts)
    for part in parts:
        out = out + part
    return out
