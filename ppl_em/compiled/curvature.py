"""Compile the exact curvature of the marginal objective (for standard errors)."""

from __future__ import annotations

from collections.abc import Callable

import pytensor.tensor as pt
from pymc.pytensorf import compile as pymc_compile
from pytensor.gradient import grad, jacobian
from pytensor.graph.replace import graph_replace

from ppl_em.compiled.functions import EMFunctions, backend_mode
from ppl_em.compiled.layout import flat_replacements
from ppl_em.model.joint import fixed_terms, joint_rows


def compile_curvature(functions: EMFunctions) -> Callable:
    """``u -> (objective, gradient, Hessian, d theta_flat / du)`` over all the data
    (``(u, *data, *fixed_data)`` in), with the PyTensor Hessian graph.

    The function is evaluated once, so it runs on NumPy-backed Ops: C would compile a
    module for each of the Hessian graph's many distinct Ops (49 s cold for a
    two-component Normal mixture, against 5 s here), and one evaluation does not repay
    it."""
    graph, layout, spec = functions.graph, functions.layout, functions.spec
    flat = pt.vector("u", dtype="float64")
    replace = flat_replacements(graph, layout, flat)
    rows = graph_replace(joint_rows(graph, spec), replace, strict=False)
    extra, logprior = graph_replace(list(fixed_terms(graph, spec)), replace, strict=False)
    objective = pt.sum(pt.logsumexp(pt.stack(rows, axis=1), axis=1)) + extra
    if functions.mode == "map":
        objective = objective + logprior
    gradient = grad(objective, flat)
    hessian = jacobian(gradient, flat, vectorize=True)
    constrained = graph_replace(
        graph.model.replace_rvs_by_values(list(graph.params)), replace, strict=False
    )
    theta = pt.concatenate([pt.cast(c, "float64").flatten() for c in constrained])
    jac = jacobian(theta, flat, vectorize=True)
    inputs = [flat, *spec.inputs, *spec.fixed_inputs]
    outputs = [objective, gradient, hessian, jac]
    return pymc_compile(inputs, outputs, mode=backend_mode("python"), on_unused_input="ignore")
