"""Regression components: a Normal whose mean is a linear predictor, and a Poisson or
Bernoulli whose mean is the inverse of its canonical link (``exp``, the logistic
sigmoid) of one (:func:`glm_predictor`).

``mu_i = b_0[z_i] + b_1[z_i] c_1i + ... + b_J[z_i] c_Ji``: each term is a per-component
coefficient (``b[z]`` with ``b`` of shape (K,)), alone (an intercept) or times a
per-observation covariate ``c`` (a constant or ``pm.Data`` array with the observation
axis first). Its M-step is weighted least squares per component, read off the
weighted sums ``sum_i gamma_ik c_ji c_li``, ``sum_i gamma_ik c_ji y_i`` and
``sum_i gamma_ik y_i^2``.
"""

from __future__ import annotations

from pytensor.scalar import Add, Exp, Mul
from pytensor.scalar.math import Sigmoid
from pytensor.tensor import TensorVariable
from pytensor.tensor.elemwise import Elemwise

from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph
from ppl_em.model.slots import DataRef, param_slot, strip


def _operands(expr: TensorVariable, scalar_op: type) -> list[TensorVariable] | None:
    node = expr.owner
    if node and isinstance(node.op, Elemwise) and isinstance(node.op.scalar_op, scalar_op):
        return [strip(v) for v in node.inputs]
    return None


def _summands(expr: TensorVariable) -> list[TensorVariable]:
    parts = _operands(expr, Add)
    if parts is None:
        return [expr]
    return [term for part in parts for term in _summands(part)]


def _term(term: TensorVariable, graph: MixtureGraph, data: DataSpec):
    """``(slot, covariate or None)`` of one summand, or None if it is not one."""
    found = param_slot(term, graph, None, data)
    if isinstance(found, tuple):
        return found, None
    factors = _operands(term, Mul)
    if factors is None or len(factors) != 2:
        return None
    first, second = (param_slot(f, graph, None, data) for f in factors)
    if isinstance(first, DataRef):
        first, second = second, first
    if isinstance(first, tuple) and isinstance(second, DataRef):
        return first, second
    return None


def linear_terms(expr: TensorVariable, graph: MixtureGraph, data: DataSpec | None):
    """The terms ``[(slot, covariate DataRef or None), ...]`` of a linear predictor with
    at least one covariate and per-component coefficients, or None."""
    if data is None or graph.kind != "label":
        return None
    terms = [_term(t, graph, data) for t in _summands(strip(expr))]
    if any(t is None for t in terms) or all(cov is None for _, cov in terms):
        return None
    if any(inverse or axes != ("k",) for (_, inverse, axes), _ in terms):
        return None
    return terms


# The inverse of each GLM family's canonical link, as PyMC writes it (``pm.math.exp``;
# ``pm.math.invlogit`` or ``logit_p=``, which PyMC turns into ``sigmoid``).
INVERSE_LINKS = {"poisson": Exp, "bernoulli": Sigmoid}


def glm_predictor(expr: TensorVariable, family: str) -> TensorVariable | None:
    """``eta`` where ``expr`` is the family's inverse canonical link of ``eta``, else None."""
    link = INVERSE_LINKS.get(family)
    inner = _operands(strip(expr), link) if link else None
    return inner[0] if inner and len(inner) == 1 else None
