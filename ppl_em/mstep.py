"""The M-step: closed form where the plan allows it, L-BFGS on Q for the rest.

Q is additive over blocks whose variables are disjoint, so updating the closed-form
blocks exactly and maximising Q numerically over the remaining variables (with the
closed-form ones held fixed) gives the same joint maximiser as a numeric M-step over
everything. ``tests/test_mstep_agreement.py`` checks that on every family.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

from ppl_em.closed_form import closed_form_update
from ppl_em.compile import EMFunctions
from ppl_em.errors import ClosedFormUnavailableError
from ppl_em.recognise import ClosedFormPlan, build_plan

MSTEPS = ("auto", "closed", "numeric")


class MStepConfig(NamedTuple):
    """What the M-step does: the closed-form plan and L-BFGS settings."""

    plan: ClosedFormPlan
    numeric_mask: np.ndarray
    maxiter: int = 500
    gtol: float = 1e-10


def make_mstep_config(functions: EMFunctions, mstep: str = "auto") -> MStepConfig:
    """Choose closed-form and numeric variables for ``mstep`` in ``MSTEPS``."""
    if mstep not in MSTEPS:
        raise ValueError(f"mstep={mstep!r} is not one of {MSTEPS}.")
    plan = build_plan(functions.graph, functions.mode)
    if mstep == "numeric":
        plan = ClosedFormPlan((), frozenset(), dict(plan.reasons))
    if mstep == "closed" and plan.reasons:
        name, why = next(iter(plan.reasons.items()))
        raise ClosedFormUnavailableError(
            f"mstep='closed' but variable {name!r} has no closed-form update: {why}. "
            "Use mstep='auto' (closed form where possible, numeric elsewhere)."
        )
    layout = functions.layout
    mask = np.zeros(layout.size, dtype=bool)
    for name, sl in zip(layout.rv_names, layout.slices, strict=True):
        mask[sl] = name not in plan.closed
    return MStepConfig(plan=plan, numeric_mask=mask)


def closed_step(functions: EMFunctions, config: MStepConfig, u: np.ndarray, gamma: np.ndarray):
    """Replace the closed-form variables' entries of ``u`` by their exact update."""
    if not config.plan.closed:
        return u
    layout = functions.layout
    current = dict(zip(layout.rv_names, functions.constrain(u), strict=True))
    data = dict(zip(functions.data_names, functions.data, strict=True))
    new = closed_form_update(
        config.plan, gamma, data, current, functions.mode, functions.graph.kind
    )
    current.update(new)
    forward = functions.unconstrain(u, *(current[n] for n in layout.rv_names))
    u = u.copy()
    for name, sl, value in zip(layout.rv_names, layout.slices, forward, strict=True):
        if name in config.plan.closed:
            u[sl] = np.reshape(value, -1)
    return u


def numeric_step(functions: EMFunctions, config: MStepConfig, u: np.ndarray, gamma: np.ndarray):
    """Maximise Q over the numeric variables by L-BFGS, warm-started at ``u``."""
    mask = config.numeric_mask
    if not mask.any():
        return u
    full = u.copy()

    def negative_q(sub: np.ndarray):
        full[mask] = sub
        q, grad = functions.q_and_grad(full, gamma, *functions.data)
        if not np.isfinite(q):
            return np.inf, np.zeros_like(sub)
        return -float(q), -grad[mask]

    start = u[mask]
    res = minimize(
        negative_q,
        start,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": config.maxiter, "gtol": config.gtol, "ftol": 1e-15},
    )
    best = res.x if np.isfinite(res.fun) and res.fun <= negative_q(start)[0] else start
    out = u.copy()
    out[mask] = best
    return out


def mstep(functions: EMFunctions, config: MStepConfig, u: np.ndarray, gamma: np.ndarray):
    """One full M-step from responsibilities ``gamma``; returns the new flat ``u``."""
    return numeric_step(functions, config, closed_step(functions, config, u, gamma), gamma)
