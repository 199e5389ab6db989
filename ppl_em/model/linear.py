"""Regression components: a Normal whose mean is a linear predictor, and a Poisson or
Bernoulli whose mean is the inverse of its canonical link (``exp``, the logistic
sigmoid) of one (:func:`glm_predictor`).

``mu_i = b_0[z_i] + b_1[z_i] c_1i + ... + b_J[z_i] c_Ji``: each term is a per-component
coefficient (``b[z]`` with ``b`` of shape (K,)), alone (an intercept) or times a
per-observation covariate ``c`` (a constant or ``pm.Data`` array with the observation
axis first). Its M-step is weighted least squares per component, read off the
weighted sums ``sum_i gamma_ik c_ji c_li``, ``sum_i gamma_ik c_ji y_i`` and
``sum_i gamma_ik y_i^2``. A GLM component's M-step is Newton's method with Q's exact
Hessian (IRLS, :mod:`ppl_em.steps.glm`).
"""

from __future__ import annotations

from pytensor.graph.traversal import ancestors
from pytensor.scalar import Add, Exp, Mul
from pytensor.scalar.math import Sigmoid
from pytensor.tensor import TensorVariable
from pytensor.tensor.elemwise import Elemwise

from ppl_em.model.blocks import Block, family_const, family_slot
from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph, direct_users
from ppl_em.model.priors import prior_of
from ppl_em.model.slots import DataRef, Slot, param_slot, strip


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


def linear_block(graph: MixtureGraph, dist, data: DataSpec | None) -> Block | str | None:
    """A Normal whose mean is a linear predictor (:func:`linear_terms`): slots
    ``b0, b1, ...`` (coefficients), ``sigma``; known ``x<j>`` covariates (DataRef)."""
    mu, sigma = dist.owner.op.dist_params(dist.owner)
    terms = linear_terms(mu, graph, data)
    if terms is None:
        return None
    slots, consts = _coefficients(terms)
    found = param_slot(sigma, graph, None, data)
    made = family_slot([found], "sigma", "normal") if isinstance(found, tuple) else (
        family_const([found], "sigma", graph, True) if found is not None else None)  # fmt: skip
    if made is None or isinstance(made, DataRef):
        return "its scale is not a per-component parameter or constant"
    if isinstance(made, str):
        return made
    (slots if isinstance(made, Slot) else consts)["sigma"] = made
    priors = {n: prior_of(slot.refs[0][0], "map") for n, slot in slots.items()}
    return Block("normal_linear", dist.name, slots, consts, priors)


def _coefficients(terms: list) -> tuple[dict, dict]:
    """A linear predictor's slots ``b0, b1, ...`` and known covariates ``x<j>``."""
    slots, consts = {}, {}
    for j, ((refs, _, axes), covariate) in enumerate(terms):
        slots[f"b{j}"] = Slot(refs=refs, inverse=False, axes=axes)
        if covariate is not None:
            consts[f"x{j}"] = covariate
    return slots, consts


def glm_block(graph: MixtureGraph, dist, data: DataSpec | None, family: str) -> Block | None:
    """A Poisson or Bernoulli regression: its mean is the inverse canonical link of a
    linear predictor (:func:`glm_predictor`)."""
    (param,) = dist.owner.op.dist_params(dist.owner)
    eta = glm_predictor(param, family)
    terms = None if eta is None else linear_terms(eta, graph, data)
    if terms is None:
        return None
    slots, consts = _coefficients(terms)
    priors = {n: prior_of(slot.refs[0][0], "map") for n, slot in slots.items()}
    return Block(f"{family}_glm", dist.name, slots, consts, priors)


GLM = (
    "its mean is the inverse link of a linear predictor, which has no closed form; "
    "Newton's method with the exact Hessian of Q (IRLS) maximises it over the data"
)


def glm_ok(graph: MixtureGraph, block: Block, owners: set, mode: str) -> bool:
    """Coefficients that are untransformed, enter nothing but this family, and have
    Normal or flat priors with constant parameters (or no prior: ``mode="mle"``)."""
    params = set(graph.params)
    for name, slot in block.slots.items():
        rvs = {r for r, _ in slot.refs}
        if any(graph.model.rvs_to_transforms.get(r) is not None for r in rvs):
            return False
        if any(direct_users(graph, r) - owners or params & set(ancestors(r.owner.inputs))
               for r in rvs):  # fmt: skip
            return False
        prior = block.priors[name]
        if mode == "map" and (prior is None or prior[0] not in ("normal", "flat")):
            return False
    return True
