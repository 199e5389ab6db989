"""Compile an MvNormal block's parameter map ``u -> (mu, Sigma)`` over the flat vector."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytensor.tensor as pt
from pymc.pytensorf import compile as pymc_compile
from pytensor.graph.replace import graph_replace

from ppl_em.compiled.functions import EMFunctions, backend_mode
from ppl_em.compiled.layout import flat_replacements
from ppl_em.model.joint import shared_label_terms
from ppl_em.model.mvn_spec import MvnSpec


class ParamMap(NamedTuple):
    """A block's compiled ``u -> [concat(mu.ravel(), second.ravel()), label]``, the
    label's K terms ``log p(z = k)`` where its probabilities are shared
    (``EMFunctions.shared_label``), else an empty vector: the written rows
    read both from one C call (the label's terms alone took 41 us on NumPy-backed Ops,
    the whole map 15-18 us in C, benchmarks/README.md); the solve reads the first.
    Both the E-step's rows and the M-step's solve call it, so fits of one prepared
    model in several threads take turns on its storage (``lock``), as on
    :class:`ppl_em.compiled.functions.LazyFunction`'s.
    """

    fn: Callable
    lock: threading.Lock

    def __call__(self, u: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.fn(u)[0]

    def with_label(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(params(u), label terms at u)``."""
        with self.lock:
            params, label = self.fn(u)
        return params, label


def compile_param_map(functions: EMFunctions, spec: MvnSpec) -> tuple[np.ndarray, ParamMap]:
    """``(mask, params)``: the block's entries of ``u`` and the compiled
    ``params(u) = concat(mu.ravel(), cov.ravel())``, or ``concat(mu.ravel(),
    L.ravel())`` where the spec has the covariances' factor ``L`` (a :class:`ParamMap`,
    with the label's terms where the model has them shared).

    C code: the map is called a few dozen times per M-step, and a C call costs a fifth
    of a NumPy-backed one (benchmarks/README.md).
    """
    graph, layout = functions.graph, functions.layout
    flat = pt.vector("u", dtype="float64")
    replace = flat_replacements(graph, layout, flat)
    second = spec.cov if spec.factor is None else spec.factor
    mu, cov = graph_replace([spec.mu, second], replace, strict=False)
    out = pt.concatenate([pt.cast(mu, "float64").ravel(), pt.cast(cov, "float64").ravel()])
    shared = shared_label_terms(graph) if functions.shared_label else None
    label = pt.zeros(0) if shared is None else graph_replace(shared, replace, strict=False)
    outputs = [out, pt.cast(label, "float64")]
    fn = pymc_compile([flat], outputs, mode=backend_mode("c"), on_unused_input="ignore")
    params = ParamMap(fn, threading.Lock())
    return layout.mask({r.name for r in spec.rvs}), params
