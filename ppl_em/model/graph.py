"""Read a PyMC model and find the mixture in it: label, K, observed dependents, parameters.

The result is a frozen :class:`MixtureGraph`; every later stage (E-step graph,
closed-form plan, compiled functions) reads the model only through it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt
from pymc.distributions.mixture import MixtureRV, _HurdleRV
from pymc.exceptions import NotConstantValueError
from pymc.pytensorf import constant_fold
from pymc_extras.model.marginal.distributions import get_domain_of_finite_discrete_rv
from pytensor.graph.traversal import ancestors
from pytensor.tensor import TensorVariable

from ppl_em.errors import DataError, ModelStructureError
from ppl_em.model.missing import observed_whole

SUPPORTED_LABELS = "pm.Categorical or pm.Bernoulli with shape (N,)"


@dataclass(frozen=True)
class MixtureGraph:
    """What ppl_em found in a model.

    ``kind`` is ``"label"`` (an explicit free ``z`` indexes the component parameters)
    or ``"mixture"`` (a ``pm.Mixture``/``pm.NormalMixture`` likelihood). ``label_name``
    is the label's name, or ``"<observed>_component"`` for a Mixture, and names the
    ``lp_<label_name>`` variable in InferenceData. ``n_obs`` counts labels, ``n_rows``
    the data's first axis: they differ for a ``pm.Mixture`` over (N, J) data, which
    mixes each of its N x J elements separately.
    """

    model: pm.Model
    kind: str
    label_name: str
    n_components: int
    n_obs: int
    n_rows: int
    label_rv: TensorVariable | None
    dependents: tuple[TensorVariable, ...]
    other_observed: tuple[TensorVariable, ...]
    params: tuple[TensorVariable, ...]
    observed_masks: tuple[tuple[str, np.ndarray], ...] = ()
    source: pm.Model | None = None

    @property
    def user_model(self) -> pm.Model:
        """The model as the user built it (``model`` is it, or its copy with imputed
        variables observed whole: :mod:`ppl_em.model.missing`)."""
        return self.source or self.model

    def observed_mask(self, name: str) -> np.ndarray | None:
        """True where dependent ``name`` was observed, or None if nothing is missing."""
        return dict(self.observed_masks).get(name)

    @property
    def labels_per_row(self) -> int:
        return self.n_obs // self.n_rows

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(rv.name for rv in self.params)

    def value_var(self, rv: TensorVariable) -> TensorVariable:
        return self.model.rvs_to_values[rv]


def _is_discrete(rv: TensorVariable) -> bool:
    return rv.dtype.startswith(("int", "uint", "bool"))


def _static_shape(var: TensorVariable, model: pm.Model | None = None) -> tuple[int, ...]:
    """``var``'s shape now: a constant, or read off the model's data and coordinate
    lengths (``pm.Data``, ``dims``), which are fixed while the model is being fitted."""
    with contextlib.suppress(NotConstantValueError):
        return tuple(int(s) for s in constant_fold(tuple(var.shape)))
    if model is not None and var in model.observed_RVs:
        return tuple(observed_data(model, var).shape)
    try:
        return tuple(int(s) for s in pt.as_tensor(var.shape).eval())
    except Exception as err:
        name = var.name or "a mixture's weights"
        raise ModelStructureError(
            f"the shape of {name!r} could not be worked out ({type(err).__name__}); give it "
            "a fixed shape (shape=N) so ppl_em can lay out the N x K responsibility matrix."
        ) from None


def _depends_on(rv: TensorVariable, target: TensorVariable) -> bool:
    return target in ancestors(rv.owner.inputs)


def _check_observed_finite(model: pm.Model) -> None:
    for rv in model.observed_RVs:
        data = observed_data(model, rv)
        if np.issubdtype(data.dtype, np.number) and not np.all(np.isfinite(data)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(data))[0])
            raise DataError(
                f"observed data of {rv.name!r} are not finite at index {bad} "
                f"(value {data[bad].item()!r}): remove or replace NaN/inf entries."
            )


def observed_data(model: pm.Model, rv: TensorVariable) -> np.ndarray:
    """The numpy array behind an observed variable (constant or ``pm.Data``)."""
    value = model.rvs_to_values[rv]
    if hasattr(value, "data"):
        return np.asarray(value.data)
    return np.asarray(value.get_value())


def _is_mixture(rv: TensorVariable) -> bool:
    """``pm.Mixture``/``pm.NormalMixture`` (zero-inflated families are such), or a hurdle
    model of counts: the mixture of a point mass at 0 and a zero-truncated count
    distribution, whose joint rows are exactly the hurdle likelihood's terms."""
    op = rv.owner.op
    if isinstance(op, _HurdleRV):
        if not rv.dtype.startswith(("int", "uint")):
            raise ModelStructureError(
                f"{rv.name!r} is a continuous hurdle model; ppl_em fits hurdle models of "
                "counts only (there the zero component is the only source of zeros). Write "
                "it as pm.Mixture of pm.DiracDelta.dist(0.0) and the continuous component "
                "if that is the model you mean."
            )
        return True
    return isinstance(op, MixtureRV)


def _find_target(model: pm.Model, latent: str | None) -> TensorVariable:
    if latent is not None and not isinstance(latent, str):
        raise TypeError(f"latent must be a variable name (str), got {latent!r}.")
    if latent is not None:
        if latent not in model.named_vars:
            raise ModelStructureError(
                f"latent={latent!r} is not a variable of the model; its variables are "
                f"{sorted(model.named_vars)}."
            )
        return model[latent]
    discrete = [rv for rv in model.free_RVs if _is_discrete(rv)]
    if len(discrete) == 1:
        return discrete[0]
    if len(discrete) > 1:
        raise ModelStructureError(
            f"found {len(discrete)} discrete latent variables {[rv.name for rv in discrete]}; "
            "ppl_em fits models with exactly one label: marginalise or fix the others, "
            "or name the label with latent=."
        )
    mixtures = [rv for rv in model.observed_RVs if _is_mixture(rv)]
    if len(mixtures) == 1:
        return mixtures[0]
    if len(mixtures) > 1:
        raise ModelStructureError(
            f"found {len(mixtures)} pm.Mixture likelihoods {[rv.name for rv in mixtures]}; "
            "pass latent=<name> to choose the one EM treats as the mixture."
        )
    raise ModelStructureError(
        "found no mixture in the model: no discrete latent label and no pm.Mixture/"
        f"pm.NormalMixture likelihood. Declare a label ({SUPPORTED_LABELS}) that indexes the "
        "component parameters, or use pm.Mixture."
    )


def _analyse_label(model: pm.Model, label: TensorVariable) -> MixtureGraph:
    if label not in model.free_RVs or not _is_discrete(label):
        raise ModelStructureError(
            f"latent={label.name!r} is not a free finite discrete variable; "
            f"the label must be {SUPPORTED_LABELS}."
        )
    try:
        domain = get_domain_of_finite_discrete_rv(label)
    except NotImplementedError as err:
        raise ModelStructureError(
            f"label {label.name!r} is a {type(label.owner.op).__name__}; "
            f"the label must be {SUPPORTED_LABELS}."
        ) from err
    shape = _static_shape(label)
    if len(shape) != 1:
        raise ModelStructureError(
            f"label {label.name!r} has shape {shape}; it must be one label per observation, "
            "a vector of shape (N,)."
        )
    _check_potentials(model, label)
    others = [rv for rv in model.free_RVs if rv is not label and _is_discrete(rv)]
    if others:
        raise ModelStructureError(
            f"besides the label {label.name!r} the model has discrete latent variables "
            f"{[rv.name for rv in others]}; ppl_em supports exactly one label."
        )
    per_obs = [rv for rv in model.free_RVs if rv is not label and _depends_on(rv, label)]
    if per_obs:
        raise ModelStructureError(
            f"free variables {[rv.name for rv in per_obs]} depend on the label {label.name!r}; "
            "only observed variables may depend on it."
        )
    deps = tuple(rv for rv in model.observed_RVs if _depends_on(rv, label))
    if not deps:
        raise ModelStructureError(
            f"label {label.name!r} has no observed dependent: no observed variable's "
            "parameters are indexed by it, so EM has nothing to explain."
        )
    for dep in deps:
        dep_shape = _static_shape(dep, model)
        if not dep_shape or dep_shape[0] != shape[0]:
            raise ModelStructureError(
                f"observed {dep.name!r} has shape {dep_shape} but label {label.name!r} has "
                f"shape {shape}; the first axis of every dependent must be the observation axis."
            )
    return MixtureGraph(
        model=model,
        kind="label",
        label_name=label.name,
        n_components=len(domain),
        n_obs=shape[0],
        n_rows=shape[0],
        label_rv=label,
        dependents=deps,
        other_observed=tuple(rv for rv in model.observed_RVs if rv not in deps),
        params=tuple(rv for rv in model.free_RVs if rv is not label),
    )


def _analyse_mixture(model: pm.Model, mix: TensorVariable) -> MixtureGraph:
    discrete = [rv for rv in model.free_RVs if _is_discrete(rv)]
    if discrete:
        raise ModelStructureError(
            f"the model has a pm.Mixture likelihood {mix.name!r} and also discrete latent "
            f"variables {[rv.name for rv in discrete]}; ppl_em supports exactly one label."
        )
    _, weights, *components = mix.owner.inputs
    n_comp = len(components) if len(components) > 1 else _static_shape(weights)[-1]
    support_ndim = components[0].owner.op.ndim_supp
    batch = _static_shape(mix, model)[: mix.ndim - support_ndim]
    return MixtureGraph(
        model=model,
        kind="mixture",
        label_name=f"{mix.name}_component",
        n_components=int(n_comp),
        n_obs=int(np.prod(batch)) if batch else 1,
        n_rows=int(batch[0]) if batch else 1,
        label_rv=None,
        dependents=(mix,),
        other_observed=tuple(rv for rv in model.observed_RVs if rv is not mix),
        params=tuple(model.free_RVs),
    )


def analyse_model(model: pm.Model | None = None, latent: str | None = None) -> MixtureGraph:
    """Find the mixture in ``model`` (or the model on the context stack).

    ``latent`` names the label (a free Categorical/Bernoulli) or the observed
    ``pm.Mixture`` variable; without it the single discrete free variable, or else the
    single Mixture likelihood, is used.
    """
    if model is not None and not isinstance(model, pm.Model):
        raise TypeError(f"model must be a pm.Model or None, got {type(model).__name__}.")
    source = pm.modelcontext(model)
    _check_float64()
    model, masks = observed_whole(source)
    _check_observed_finite(model)
    target = _find_target(model, latent)
    if target in model.observed_RVs:
        if not _is_mixture(target):
            raise ModelStructureError(
                f"latent={target.name!r} is an observed {type(target.owner.op).__name__}, "
                f"not a pm.Mixture; name the label ({SUPPORTED_LABELS}) or a Mixture likelihood."
            )
        graph = _analyse_mixture(model, target)
    else:
        graph = _analyse_label(model, target)
    if masks:
        graph = replace(graph, observed_masks=tuple(masks.items()), source=source)
        check_missing(graph)
    if graph.n_components > graph.n_obs:
        raise ModelStructureError(
            f"the mixture has K={graph.n_components} components but only N={graph.n_obs} "
            "observations; use fewer components (n_components <= N)."
        )
    return graph


def _support_ndim(graph: MixtureGraph, rv: TensorVariable) -> int:
    if graph.kind == "mixture":
        rv = rv.owner.inputs[2]
    return getattr(rv.owner.op, "ndim_supp", 0)


def check_missing(graph: MixtureGraph) -> None:
    """Missing entries EM can integrate out: in the label's dependents, each
    observation keeping at least one observed value, and multivariate ones only in an
    MvNormal (whose marginal over the observed coordinates is again an MvNormal)."""
    names = {dep.name: dep for dep in graph.dependents}
    seen = np.zeros(graph.n_rows, dtype=bool)
    for name, mask in graph.observed_masks:
        if name not in names:
            raise DataError(
                f"observed data of {name!r} contain NaN, but {name!r} does not depend on the "
                "mixture's label; ppl_em integrates out missing values only in the label's "
                "observed dependents: drop or fill those entries."
            )
        support = _support_ndim(graph, names[name])
        rows = mask.reshape(graph.n_rows, -1)
        if support == 0 and graph.kind == "mixture":
            # Each element of a pm.Mixture's data is an observation of its own.
            rows = rows.all(axis=1, keepdims=True)
        if support and not _is_mvnormal(graph, names[name]):
            raise ModelStructureError(
                f"observed data of {name!r} contain NaN inside multivariate values; ppl_em "
                "integrates them out for univariate families and MvNormal only: drop or "
                "fill those entries."
            )
        seen |= rows.any(axis=1)
    if len(names) > len(graph.observed_masks):
        return  # a dependent observed whole keeps every observation
    if not seen.all():
        row = int(np.flatnonzero(~seen)[0])
        raise DataError(
            f"observation {row} of {sorted(names)} is missing entirely (NaN in every value "
            f"{'it has' if len(names) == 1 else 'the label explains'}; "
            f"{int((~seen).sum())} such observations): nothing is observed to fit, drop them."
        )


def _is_mvnormal(graph: MixtureGraph, rv: TensorVariable) -> bool:
    comps = rv.owner.inputs[2:] if graph.kind == "mixture" else [rv]
    return all(isinstance(c.owner.op, pm.MvNormal.rv_type) for c in comps)


def _check_float64() -> None:
    """ppl_em's passes, statistics and tolerances are float64 arithmetic; a model built
    under float32 would fail deep inside PyTensor's compiler instead."""
    floatx = pytensor.config.floatX
    if floatx != "float64":
        raise ModelStructureError(
            f"pytensor.config.floatX is {floatx!r}; ppl_em computes in float64. Set "
            "pytensor.config.floatX = 'float64' (or PYTENSOR_FLAGS=floatX=float64) before "
            "building the model."
        )


def _check_potentials(model: pm.Model, label: TensorVariable) -> None:
    """A potential that reads the label is not a sum over observations of per-component
    terms, so EM cannot take its expectation; say so before PyTensor fails on it."""
    for potential in model.potentials:
        if label in ancestors([potential]):
            raise ModelStructureError(
                f"pm.Potential {potential.name!r} uses the label {label.name!r}; EM sums the "
                "label out observation by observation and cannot take a potential's "
                "expectation over it. Move that term into an observed variable's likelihood "
                "or drop it."
            )


def direct_users(graph: MixtureGraph, rv: TensorVariable) -> set:
    """The random variables (and "potential") whose own graph uses ``rv`` directly."""
    model = graph.model
    # Stop at other random variables: only direct uses count, not uses through the label.
    others = [y for y in model.basic_RVs if y is not rv]
    users = {y for y in others if rv in ancestors(y.owner.inputs, blockers=others)}
    if any(rv in ancestors([p]) for p in model.potentials):
        users.add("potential")
    return users
