"""Regression components: a Normal whose mean is a linear predictor, a Poisson or
Bernoulli whose mean is the inverse of its canonical link (``exp``, the logistic
sigmoid) of one (:func:`glm_predictor`), and a negative binomial whose mean is ``exp`` of
one, with a dispersion per component, shared or known (:func:`nb_block`).

``mu_i = b_0[z_i] + b_1[z_i] c_1i + ... + b_J[z_i] c_Ji``: each term is a per-component
coefficient (``b[z]`` with ``b`` of shape (K,); in a ``pm.Mixture``, ``b`` itself over
batched components or ``b[k]`` in list component ``k``), alone (an intercept) or times a
per-observation covariate ``c`` (a constant or ``pm.Data`` array with the observation
axis first). Its M-step is weighted least squares per component, read off the
weighted sums ``sum_i gamma_ik c_ji c_li``, ``sum_i gamma_ik c_ji y_i`` and
``sum_i gamma_ik y_i^2``. A GLM component's M-step is Newton's method with Q's exact
Hessian (IRLS, :mod:`ppl_em.steps.glm`).
"""

from __future__ import annotations

import numpy as np
from pymc.logprob.transforms import LogTransform
from pytensor.graph.traversal import ancestors
from pytensor.scalar import Add, Exp, Mul, TrueDiv
from pytensor.scalar.math import Sigmoid
from pytensor.tensor import TensorConstant, TensorVariable
from pytensor.tensor.elemwise import Elemwise

from ppl_em.model.blocks import Block, read_parameter, slot_prior
from ppl_em.model.data import DataSpec
from ppl_em.model.graph import MixtureGraph, direct_users
from ppl_em.model.priors import positive_prior
from ppl_em.model.slots import DataRef, Slot, param_slot, strip, value_of


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


def _term(term: TensorVariable, graph: MixtureGraph, data: DataSpec, k: int | None):
    """``(slot, covariate or None)`` of one summand, or None if it is not one."""
    found = param_slot(term, graph, k, data)
    if isinstance(found, tuple):
        return found, None
    factors = _operands(term, Mul)
    if factors is None or len(factors) != 2:
        return None
    first, second = (param_slot(f, graph, k, data) for f in factors)
    if isinstance(first, DataRef):
        first, second = second, first
    if isinstance(first, tuple) and isinstance(second, DataRef):
        return first, second
    return None


def linear_terms(expr, graph: MixtureGraph, data: DataSpec | None, k: int | None = None):
    """The terms ``[(slot, covariate DataRef or None), ...]`` of a linear predictor with
    at least one covariate and per-component coefficients, or None; ``k`` as in
    :func:`~ppl_em.model.slots.param_slot`."""
    if data is None:
        return None
    terms = [_term(t, graph, data, k) for t in _summands(strip(expr))]
    if any(t is None for t in terms) or all(cov is None for _, cov in terms):
        return None
    if any(inverse or axes != ("k",) for (_, inverse, axes), _ in terms):
        return None
    return terms


def _value(ref: DataRef, data: DataSpec) -> np.ndarray:
    return ref.array if ref.name is None else value_of(data.leaves[data.names.index(ref.name)])


def _same_covariate(a: DataRef | None, b: DataRef | None, data: DataSpec) -> bool:
    if a is None or b is None:
        return a is b
    if a.name is not None and a.name == b.name:
        return True
    return bool(np.array_equal(_value(a, data), _value(b, data)))


def joint_terms(exprs: list, graph: MixtureGraph, data: DataSpec | None):
    """The terms of the components' linear predictors (one expression for components
    batched or indexed by the label, else one per list component), each coefficient
    with one element per component. List components must have the same covariates in
    the same order, each coefficient an element of its own."""
    if len(exprs) == 1:
        return linear_terms(exprs[0], graph, data)
    per = [linear_terms(e, graph, data, k) for k, e in enumerate(exprs)]
    if any(t is None for t in per) or len({len(t) for t in per}) != 1:
        return None
    joined = []
    for column in zip(*per, strict=True):
        refs = tuple(r for (found, *_), _ in column for r in found)
        covariates = [cov for _, cov in column]
        if len(set(refs)) != len(exprs):
            return None
        if not all(_same_covariate(c, covariates[0], data) for c in covariates):
            return None
        joined.append(((refs, False, ("k",)), covariates[0]))
    return joined


# The inverse of each GLM family's canonical link, as PyMC writes it (``pm.math.exp``;
# ``pm.math.invlogit`` or ``logit_p=``, which PyMC turns into ``sigmoid``); the negative
# binomial's log link is not canonical, but it is the one its regressions use.
INVERSE_LINKS = {"poisson": Exp, "bernoulli": Sigmoid, "negative_binomial": Exp}


def glm_predictor(expr: TensorVariable, family: str) -> TensorVariable | None:
    """``eta`` where ``expr`` is the family's inverse canonical link of ``eta``, else None."""
    link = INVERSE_LINKS.get(family)
    inner = _operands(strip(expr), link) if link else None
    return inner[0] if inner and len(inner) == 1 else None


def linear_block(graph: MixtureGraph, dists: list, data: DataSpec | None, name: str):
    """Normals whose mean is a linear predictor (:func:`joint_terms`): slots
    ``b0, b1, ...`` (coefficients), ``sigma``; known ``x<j>`` covariates (DataRef)."""
    params = [d.owner.op.dist_params(d.owner) for d in dists]
    terms = joint_terms([p[0] for p in params], graph, data)
    if terms is None:
        return None
    slots, consts = _coefficients(terms)
    made = read_parameter([p[1] for p in params], graph, data, "sigma", "normal")
    if made is None or isinstance(made, DataRef):
        return "its scale is not a per-component parameter or constant"
    if isinstance(made, str):
        return made
    (slots if isinstance(made, Slot) else consts)["sigma"] = made
    priors = {n: slot_prior(slot.refs) for n, slot in slots.items()}
    return Block("normal_linear", name, slots, consts, priors)


def _coefficients(terms: list) -> tuple[dict, dict]:
    """A linear predictor's slots ``b0, b1, ...`` and known covariates ``x<j>``."""
    slots, consts = {}, {}
    for j, ((refs, _, axes), covariate) in enumerate(terms):
        slots[f"b{j}"] = Slot(refs=refs, inverse=False, axes=axes)
        if covariate is not None:
            consts[f"x{j}"] = covariate
    return slots, consts


def glm_block(graph: MixtureGraph, dists: list, data: DataSpec | None, family: str, name: str):
    """Poisson or Bernoulli regressions: the mean is the inverse canonical link of a
    linear predictor (:func:`glm_predictor`)."""
    etas = [glm_predictor(d.owner.op.dist_params(d.owner)[0], family) for d in dists]
    terms = None if None in etas else joint_terms(etas, graph, data)
    if terms is None:
        return None
    slots, consts = _coefficients(terms)
    priors = {n: slot_prior(slot.refs) for n, slot in slots.items()}
    return Block(f"{family}_glm", name, slots, consts, priors)


def _same(a: TensorVariable, b: TensorVariable) -> bool:
    """One value: the same variable, or equal constants (PyMC's ``alpha / (mu + alpha)``
    makes a constant of a plain number at each use)."""
    a, b = strip(a), strip(b)
    if a is b:
        return True
    both = isinstance(a, TensorConstant) and isinstance(b, TensorConstant)
    return both and a.data.shape == b.data.shape and bool((a.data == b.data).all())


def nb_mean(dist) -> tuple[TensorVariable, TensorVariable] | None:
    """``(alpha, mu)`` of a negative binomial, which PyMC stores as ``n = alpha`` and
    ``p = alpha / (mu + alpha)``; None if ``p`` is not of that form."""
    n, p = dist.owner.op.dist_params(dist.owner)
    ratio = _operands(strip(p), TrueDiv)
    total = _operands(ratio[1], Add) if ratio and len(ratio) == 2 else None
    if total is None or len(total) != 2 or not _same(ratio[0], n):
        return None
    means = [t for t in total if not _same(t, n)]
    return (n, means[0]) if len(means) == 1 else None


def _dispersion(alphas: list, graph: MixtureGraph, data: DataSpec | None):
    """The dispersion as a slot in one free variable (per component or shared) or a
    (K,) constant, else None."""
    made = read_parameter(alphas, graph, data, "alpha", "negative_binomial")
    if isinstance(made, Slot):
        one = len({rv for rv, _ in made.refs}) == 1
        return made if one and not made.inverse and made.axes in (("k",), ()) else None
    return made if isinstance(made, np.ndarray) else None


def nb_block(graph: MixtureGraph, dists: list, data: DataSpec | None, name: str):
    """Negative-binomial regressions: ``mu = exp(eta)`` of a linear predictor; slots
    ``b0, b1, ...`` and ``alpha`` (or a known ``alpha`` among the consts), whose prior is
    read by :func:`ppl_em.model.priors.positive_prior`."""
    parts = [nb_mean(d) for d in dists]
    etas = None if None in parts else [glm_predictor(m, "negative_binomial") for _, m in parts]
    terms = None if etas is None or None in etas else joint_terms(etas, graph, data)
    alpha = None if terms is None else _dispersion([a for a, _ in parts], graph, data)
    if alpha is None:
        return None
    slots, consts = _coefficients(terms)
    priors = {n: slot_prior(slot.refs) for n, slot in slots.items()}
    if isinstance(alpha, Slot):
        slots["alpha"] = alpha
        priors["alpha"] = slot_prior(alpha.refs, positive_prior)
    else:
        consts["alpha"] = alpha
    return Block("negative_binomial_glm", name, slots, consts, priors)


GLM = (
    "its mean is the inverse link of a linear predictor, which has no closed form; "
    "Newton's method with the exact Hessian of Q (IRLS) maximises it over the data"
)


def glm_ok(graph: MixtureGraph, block: Block, owners: set, mode: str) -> bool:
    """Coefficients that are untransformed, enter nothing but this family, and have
    Normal or flat priors with constant parameters (or no prior: ``mode="mle"``); a
    negative binomial's free dispersion the same, but fitted on its log (the Hessian is
    in ``log alpha``) with a prior :func:`~ppl_em.model.priors.positive_prior` reads."""
    params = set(graph.params)
    for name, slot in block.slots.items():
        rvs = {r for r, _ in slot.refs}
        wanted = LogTransform if name == "alpha" else type(None)
        if any(type(graph.model.rvs_to_transforms.get(r)) is not wanted for r in rvs):
            return False
        if any(direct_users(graph, r) - owners or params & set(ancestors(r.owner.inputs))
               for r in rvs):  # fmt: skip
            return False
        prior = block.priors[name]
        readable = prior is not None and (name == "alpha" or prior[0] in ("normal", "flat"))
        if mode == "map" and not readable:
            return False
    return True
