"""The log density of an observation with missing entries: the marginal density of the
entries that were observed (:mod:`ppl_em.model.missing` says which).

For independent entries (a univariate family over an observation's values) the
marginal drops the missing entries' factors. For an MvNormal it is the MvNormal of the
observed coordinates, ``N(x_o; mu_o, Sigma_oo)``. With ``m`` the 0/1 vector of observed
coordinates, the covariance ``S = diag(m) Sigma diag(m) + diag(1 - m)`` and the
difference ``(x - mu) * m`` give, up to ``(D - |o|) log(2 pi) / 2``, that same density with
one D x D factorisation per observation; the Cholesky factor is written out over the
(static) D, element by element over the chunk, so it runs as vectorised elementwise
loops instead of one LAPACK call per observation.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt
from pytensor.tensor import TensorVariable

from ppl_em.errors import ModelStructureError

LOG_2PI = float(np.log(2 * np.pi))


def _mvnormal_observed(rv: TensorVariable, value, observed) -> TensorVariable:
    _, _, mu, cov = rv.owner.inputs
    d = int(value.type.shape[-1])
    m = pt.cast(observed, "float64")
    diff = [(value[:, i] - mu[..., i]) * m[:, i] for i in range(d)]
    chol: dict = {}
    logdet, solved, quad = 0.0, [], 0.0
    for j in range(d):
        s = cov[..., j, j] * m[:, j] + (1 - m[:, j])
        s = s - sum((chol[j, k] ** 2 for k in range(j)), start=pt.zeros_like(s))
        chol[j, j] = pt.sqrt(s)
        for i in range(j + 1, d):
            c = cov[..., i, j] * m[:, i] * m[:, j]
            c = c - sum((chol[i, k] * chol[j, k] for k in range(j)), start=pt.zeros_like(c))
            chol[i, j] = c / chol[j, j]
        y = diff[j] - sum((chol[j, k] * solved[k] for k in range(j)), start=pt.zeros_like(s))
        solved.append(y / chol[j, j])
        logdet = logdet + 2 * pt.log(chol[j, j])
        quad = quad + solved[j] ** 2
    return -0.5 * (m.sum(axis=1) * LOG_2PI + logdet + quad)


def masked_logp(rv: TensorVariable, value, observed, term: TensorVariable) -> TensorVariable:
    """``rv``'s log density at ``value`` over the entries where ``observed`` is true;
    ``term`` is its logp with every entry counted."""
    support = getattr(rv.owner.op, "ndim_supp", 0)
    if support == 0:
        return pt.switch(observed, term, 0.0)
    if isinstance(rv.owner.op, pm.MvNormal.rv_type) and value.ndim == 2:
        return _mvnormal_observed(rv, value, observed)
    raise ModelStructureError(
        f"missing entries in a {type(rv.owner.op).__name__} observation of shape "
        f"{value.type.shape}: ppl_em integrates them out for univariate families and for "
        "an MvNormal over (N, D) data; drop or fill those entries."
    )
