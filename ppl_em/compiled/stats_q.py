"""Compile Q of a family block as a function of the E-step's statistics, with its exact
gradient in the block's unconstrained values (Newton differences the gradient for the
Hessian: an exact symbolic one took 14-33 s to compile cold, benchmarks/README.md).

For the families of :mod:`ppl_em.model.recognise` the expected complete-data
log-likelihood depends on the data only through ``N_k`` and the weighted column sums
(:mod:`ppl_em.steps.columns`). Per component k and item d, with ``S`` the weighted sum
of ``x`` (a Normal's centred on ``c``, one per component, with ``S2`` the centred
squares) and ``T`` the weighted trials:

* Normal:      ``-N (log 2 pi / 2 + log sigma) - (S2 - 2 (mu - c) S + N (mu - c)^2) / (2 sigma^2)``
* Poisson:     ``S log mu - N mu``   (without ``log x!``, constant in the parameters)
* Binomial:    ``S log p + (T - S) log(1 - p)``   (Bernoulli: ``T = N``)
* Exponential: ``N log lam - lam S``
* weights that are a function of free variables (stick-breaking): ``sum_k N_k log w_k``
* Gaussian regression: ``-N (log 2 pi / 2 + log sigma) - RSS(b) / (2 sigma^2)``, with
  ``RSS(b) = yy - 2 b'r + b'A b`` from the sums of covariate products ``A``, covariates
  times response ``r`` and squared responses ``yy``

plus, in mode="map", the log prior of the block's variables (no Jacobian, the
find_MAP convention).
So a block whose prior is not conjugate is still maximised without touching the data.
The graph reads only the block's own variables, so it is small.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace

from ppl_em.compiled.functions import EMFunctions, LazyFunction, SwitchingFunction, backend_mode
from ppl_em.model.blocks import Block
from ppl_em.model.slots import DataRef

LOG_2PI = float(np.log(2 * np.pi))


class StatsQ(NamedTuple):
    """A block's entries of ``u`` and ``q(sub, nk, *statistics) -> (value, gradient in
    sub)``, ``sub`` being the values of those entries."""

    index: np.ndarray
    q: object

    def restarted(self) -> StatsQ:
        """This block for a new fit (see :class:`SwitchingFunction`)."""
        if isinstance(self.q, SwitchingFunction):
            return self._replace(q=self.q.restarted())
        return self


def _grid(values, axes: tuple[str, ...], k: int, d: int):
    return values.reshape((k if "k" in axes else 1, d if "d" in axes else 1))


def _params(block: Block, constrained: dict, k: int) -> dict:
    """Each family parameter on the (K, D) grid: its slot's values, or known per
    component (a (K,) array; per-observation trials come from the statistics)."""
    out = {}
    for name, slot in block.slots.items():
        vec = pt.stack([constrained[rv.name].reshape((-1,))[j] for rv, j in slot.refs])
        out[name] = _grid(vec, slot.axes, k, block.items)
    for name, value in block.consts.items():
        if not isinstance(value, DataRef) and name != "reg_covar":
            out[name] = pt.as_tensor(np.asarray(value, dtype=float).reshape(-1, 1))
    return out


def _inputs(block: Block) -> list:
    """The statistics a family's Q reads (:func:`ppl_em.steps.stats_newton.block_statistics`)."""
    if block.family == "weights_graph":
        return []
    if block.family == "normal_linear":
        return [pt.tensor3("a", dtype="float64"), pt.matrix("r", dtype="float64"),
                pt.vector("yy", dtype="float64")]  # fmt: skip
    matrices = [pt.matrix(name, dtype="float64") for name in ("s", "s2", "trials")]
    return [*matrices, pt.matrix("centre", dtype="float64")]


def _linear_q(block: Block, p: dict, nk, a, r, yy):
    names = sorted((n for n in block.slots if n != "sigma"), key=lambda n: int(n[1:]))
    beta = pt.concatenate([p[name] for name in names], axis=1)  # (K, J)
    rss = yy - 2 * (beta * r).sum(axis=1) + (beta[:, :, None] * a * beta[:, None, :]).sum((1, 2))
    sigma = p["sigma"][:, 0]
    return (-nk * (0.5 * LOG_2PI + pt.log(sigma)) - rss / (2 * sigma**2)).sum()


def _weights_q(block: Block, model, nk):
    """``sum_k N_k log w_k`` with the weights a graph of the block's variables."""
    (w,) = model.replace_rvs_by_values([block.consts["weights"]])
    if block.consts["of"] == "bernoulli_label":
        p = w.reshape(())
        return nk[0] * pt.log1p(-p) + nk[1] * pt.log(p)
    return (nk * pt.log(w.reshape((-1,)))).sum()


def _family_q(block: Block, p: dict, nk, *stats):
    if block.family == "normal_linear":
        return _linear_q(block, p, nk, *stats)
    s, s2, trials, centre = stats
    n = nk[:, None]
    if block.family == "normal":
        dev = p["mu"] - centre
        m2 = s2 - 2 * dev * s + n * dev**2
        sigma = p["sigma"]
        return (-n * (0.5 * LOG_2PI + pt.log(sigma)) - m2 / (2 * sigma**2)).sum()
    if block.family == "poisson":
        return (s * pt.log(p["mu"]) - n * p["mu"]).sum()
    if block.family in ("binomial", "bernoulli"):
        if block.family == "bernoulli":
            trials = n
        elif not isinstance(block.consts.get("n"), DataRef):
            trials = p["n"] * n
        return (s * pt.log(p["p"]) + (trials - s) * pt.log1p(-p["p"])).sum()
    theta = p["scale"]
    lam = theta if block.slots["scale"].inverse else 1.0 / theta
    return (n * pt.log(lam) - lam * s).sum()


def compile_stats_q(functions: EMFunctions, block: Block) -> StatsQ:
    """Q of ``block`` plus its variables' log prior, from the statistics, as a function
    of the block's own unconstrained values only (a small graph: quick to compile)."""
    graph, layout = functions.graph, functions.layout
    model = graph.model
    names = {r.name for slot in block.slots.values() for r, _ in slot.refs}
    rvs = [rv for rv in graph.params if rv.name in names]  # in the order of u
    sub = pt.vector("sub", dtype="float64")
    replace, start = {}, 0
    for rv in rvs:
        shape = layout.shapes[layout.rv_names.index(rv.name)]
        size = int(np.prod(shape))
        value = graph.value_var(rv)
        replace[value] = sub[start : start + size].reshape(shape).astype(value.dtype)
        start += size
    constrained = dict(zip([rv.name for rv in rvs], model.replace_rvs_by_values(rvs), strict=True))
    nk = pt.vector("nk", dtype="float64")
    stats = _inputs(block)
    if block.family == "weights_graph":
        total = _weights_q(block, model, nk)
    else:
        total = _family_q(block, _params(block, constrained, graph.n_components), nk, *stats)
    if functions.mode == "map":
        total = total + model.logp(vars=rvs, jacobian=False, sum=True)
    total = graph_replace(pt.cast(total, "float64"), replace, strict=False)
    grad = pt.grad(total, sub)
    inputs, outputs = [sub, nk, *stats], [total, grad]
    # Where the rows are C (a large problem), so is Q from the start.
    if functions.compiled_rows:
        q = LazyFunction(inputs, outputs, backend_mode("c"))
    else:
        q = SwitchingFunction.of(inputs, outputs)
    return StatsQ(np.flatnonzero(layout.mask(names)), q)
