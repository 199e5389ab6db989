"""Compile an MvNormal block's parameter map ``u -> (mu, Sigma)`` over the flat vector."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytensor.tensor as pt
from pymc.pytensorf import compile as pymc_compile
from pytensor.graph.replace import graph_replace

from ppl_em.compiled.functions import EMFunctions, backend_mode
from ppl_em.compiled.layout import flat_replacements
from ppl_em.model.mvn_spec import MvnSpec


def compile_param_map(functions: EMFunctions, spec: MvnSpec) -> tuple[np.ndarray, Callable]:
    """``(mask, params)``: the block's entries of ``u`` and the compiled
    ``params(u) = concat(mu.ravel(), cov.ravel())``, or ``concat(mu.ravel(),
    L.ravel())`` where the spec has the covariances' factor ``L``.

    C code: the map is called a few dozen times per M-step, and a C call costs a fifth
    of a NumPy-backed one (benchmarks/README.md).
    """
    graph, layout = functions.graph, functions.layout
    flat = pt.vector("u", dtype="float64")
    replace = flat_replacements(graph, layout, flat)
    second = spec.cov if spec.factor is None else spec.factor
    mu, cov = graph_replace([spec.mu, second], replace, strict=False)
    out = pt.concatenate([pt.cast(mu, "float64").ravel(), pt.cast(cov, "float64").ravel()])
    params = pymc_compile([flat], out, mode=backend_mode("c"), on_unused_input="ignore")
    return layout.mask({r.name for r in spec.rvs}), params
