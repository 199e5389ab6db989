"""Starting points: the user's ``start`` or a data-driven, non-symmetric default.

Identical components are a fixed point of EM, and PyMC's default initial point makes
all components identical. The default start therefore partitions the observations by
k-means on their standardised features (scikit-learn's default initialisation;
restarts draw other k-means++ seeds), turns the partition into soft responsibilities
and takes one exact M-step from them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from ppl_em.compiled.functions import EMFunctions
from ppl_em.em.kmeans import kmeans
from ppl_em.errors import DataError, StartError
from ppl_em.steps.estep import joint
from ppl_em.steps.mstep import MStepConfig, expectations_from_resp, m_step, m_step_from_resp
from ppl_em.steps.stats import DataChunk

# Soft partition: the assigned component gets 1 - EPS of each observation, so no
# component starts with zero weight.
EPS = 0.1
# A numeric exact M-step is Newton from PyMC's initial point, which knows nothing of the
# data's units: most of its iterations are far from the answer, each a pass over the
# data. From NEWTON_SAMPLED_FROM observations on, they are first taken on every s-th
# observation (about NEWTON_SAMPLE of them; not the k-means sample of data beyond memory,
# ppl_em.em.sources.START_SAMPLE), and the exact M-step over all the data starts there:
# the negative-binomial regression at N=10^5 took 0.36-0.42 s against 1.35-1.48 s,
# landing on the same point to 1e-11 (benchmarks/README.md).
NEWTON_SAMPLE = 10_000
NEWTON_SAMPLED_FROM = 5 * NEWTON_SAMPLE
# The start's Newton stops once its decrement is below this many standard errors (under
# Q) of Q's maximum, where EM's exact M-steps go on to newton.DECREMENT_TOL. Q's
# gradient is a sum over the data whose rounding alone is some 1e-9 of them at N=10^5
# (the negative-binomial regression's start: 2.5e-9, 5e-10, 9.3e-10 in its last three
# Newton steps), and each step there costs a Hessian and a gradient over the data.
START_DECREMENT = 1e-8


def data_features(functions: EMFunctions) -> np.ndarray:
    """The observed values the label explains, one row per observation, standardised."""
    x = functions.observed_columns()
    # Scale by the largest deviation before taking moments: x.std() overflows for data
    # near 1e300 (and would turn every feature into 0, so the partition ignored the data).
    centred = x - np.median(x, axis=0)
    spread = np.max(np.abs(centred), axis=0)
    z = centred / np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
    sd = z.std(axis=0)
    return (z - z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def partition(features: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """Hard labels by k-means (k-means++ seeds, Lloyd's iterations) on the standardised
    features; ``rng`` None seeds k-means++ with 0, so the default start is reproducible.
    The features are put in a canonical (sorted) order first: the start, and so the
    estimate, then do not depend on the order of the observations."""
    order = np.lexsort(features.T[::-1])
    labels = np.empty(features.shape[0], dtype=int)
    labels[order] = kmeans(features[order], k, np.random.default_rng(0) if rng is None else rng)
    return labels


def _with_known(labels: np.ndarray, known: np.ndarray, k: int) -> np.ndarray:
    """The partition's clusters renamed to agree most with the known labels (an optimal
    assignment on their contingency table), then the known labels themselves."""
    given = known >= 0
    if given.any():
        table = np.zeros((k, k))
        np.add.at(table, (labels[given], known[given]), 1.0)
        clusters, names = linear_sum_assignment(-table)
        rename = np.empty(k, dtype=int)
        rename[clusters] = names
        labels = rename[labels]
    return np.where(given, known, labels)


def soft_responsibilities(labels: np.ndarray, k: int) -> np.ndarray:
    gamma = np.full((labels.size, k), EPS / k)
    gamma[np.arange(labels.size), labels] += 1.0 - EPS
    return gamma


def initial_u(functions: EMFunctions) -> np.ndarray:
    """PyMC's initial point, flattened; non-finite entries (e.g. ordered) set to 0. Where
    PyMC cannot make one (an ``LKJCholeskyCov`` over ``HalfFlat`` scales: its support
    point samples them), 0 in the unconstrained space: the start's exact M-step moves
    from there."""
    layout = functions.layout
    try:
        point = functions.initial_point()
    except NotImplementedError:
        return np.zeros(layout.size)
    u = np.concatenate([np.reshape(point[n], -1) for n in layout.value_names] or [[]])
    return np.where(np.isfinite(u), u, 0.0).astype(float)


def default_start(
    functions: EMFunctions, config: MStepConfig, rng: np.random.Generator | None
) -> np.ndarray:
    """One M-step from a partition of the data (deterministic when ``rng`` is None).

    An exact M-step (to ``START_DECREMENT`` standard errors of Q's maximum where it is
    numeric): PyMC's initial point knows nothing of the data's units (a Flat
    mean starts at 0, a HalfFlat scale at 1), so a generalised step from it can stop
    far from the partition's parameters and start EM near a symmetric saddle. With
    numeric variables and at least ``NEWTON_SAMPLED_FROM`` observations, its Newton starts from
    the same M-step over a sample of them.
    """
    k = functions.graph.n_components
    labels = partition(data_features(functions), k, rng)
    if functions.labels is not None:
        labels = _with_known(labels, functions.labels, k)
    gamma = soft_responsibilities(labels, k)
    exact = config._replace(grad_reduction=0.0, decrement_tol=START_DECREMENT)
    u = initial_u(functions)
    n = functions.data[0].shape[0]
    if config.numeric_mask.any() and n >= NEWTON_SAMPLED_FROM:
        chunk, rows = _every(functions, n // NEWTON_SAMPLE)
        sampled = expectations_from_resp(functions, exact, gamma[rows], chunk)
        u = m_step(functions, exact, u, sampled)
    return m_step_from_resp(functions, exact, u, gamma)


def _every(functions: EMFunctions, stride: int) -> tuple[DataChunk, np.ndarray]:
    """Every ``stride``-th observation as a chunk, and the rows of the labels' values
    (``labels_per_row`` of them an observation) it holds."""
    per_row = functions.graph.labels_per_row
    n = functions.data[0].shape[0]
    rows = (np.arange(0, n, stride)[:, None] * per_row + np.arange(per_row)).reshape(-1)
    pick = lambda v: None if v is None else v[rows]  # noqa: E731
    arrays = tuple(x[::stride] for x in functions.data)
    return DataChunk(arrays, 0, None, pick(functions.weights), pick(functions.labels)), rows


def _start_value(functions: EMFunctions, name: str, value, current: dict) -> np.ndarray:
    layout = functions.layout
    if name not in current:
        hint = ""
        if name in layout.value_names:
            rv = layout.rv_names[layout.value_names.index(name)]
            hint = f" Give it by its constrained name {rv!r}, in the constrained space."
        elif name == functions.graph.label_name:
            hint = " The label is marginalised out by EM and takes no start value."
        raise StartError(
            f"start has unknown variable {name!r}; the free parameters are "
            f"{list(layout.rv_names)}.{hint}"
        )
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise StartError(f"start[{name!r}] = {value!r} is not numeric: {err}.") from err
    if arr.shape != np.shape(current[name]):
        raise StartError(
            f"start[{name!r}] has shape {arr.shape} but {name!r} has shape "
            f"{np.shape(current[name])}."
        )
    if not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise StartError(f"start[{name!r}] is not finite at index {bad}; give finite values.")
    return arr


def apply_start(functions: EMFunctions, start: Mapping, u: np.ndarray) -> np.ndarray:
    """Overwrite ``u`` with user values given in the constrained space by variable name.

    A value outside the support either maps to a non-finite unconstrained value (p=1.5,
    sigma<0) or does not map back to itself (weights not summing to 1); both raise.
    """
    layout = functions.layout
    if not isinstance(start, Mapping):
        raise StartError(
            f"start must be a dict of variable name -> value, got {type(start).__name__}."
        )
    current = dict(zip(layout.rv_names, functions.constrain(u), strict=True))
    given = {name: _start_value(functions, name, value, current) for name, value in start.items()}
    current.update(given)
    with np.errstate(all="ignore"):
        forward = functions.unconstrain(u, *(current[n] for n in layout.rv_names))
        out = np.concatenate([np.reshape(f, -1) for f in forward]).astype(float)
        back = dict(zip(layout.rv_names, functions.constrain(out), strict=True))
    for name, sl in zip(layout.rv_names, layout.slices, strict=True):
        if name not in given:
            continue
        round_trip = np.all(np.isfinite(out[sl])) and np.allclose(
            back[name], given[name], rtol=1e-6, atol=1e-12
        )
        if not round_trip:
            raise StartError(
                f"start[{name!r}] = {given[name].tolist()} is outside the support of {name!r} "
                f"(its prior is {functions.graph.model[name].owner.op.name}); give a value "
                "strictly inside it (probabilities in (0, 1), weights positive and summing "
                "to 1, scales > 0)."
            )
    return out


def _family_names(functions: EMFunctions) -> str:
    graph, ops = functions.graph, []
    for rv in graph.dependents:
        comps = rv.owner.inputs[2:] if graph.kind == "mixture" else [rv]
        ops += [type(c.owner.op).__name__.removesuffix("RV") for c in comps]
    return "/".join(dict.fromkeys(ops))


def check_support(functions: EMFunctions, u: np.ndarray) -> None:
    """Raise if some observation has log-likelihood -inf (or NaN) under every component.

    Evaluated at the starting point ``u`` (by default one M-step from a partition of the
    data, so the parameters are fitted to it): an impossible row there means the value
    is outside the components' support (a negative count, heads above n, a negative
    waiting time, ...) or, with a user ``start``, that the start is far from the data.
    """
    with np.errstate(all="ignore"):
        rows = joint(functions, u)
    bad = np.flatnonzero(~np.any(np.isfinite(rows) & (rows > -np.inf), axis=1))
    if not bad.size:
        return
    i = int(bad[0])
    row = functions.observed_columns()[i].tolist()
    value = row[0] if len(row) == 1 else row
    names = ", ".join(repr(name) for name in functions.spec.observed)
    raise DataError(
        f"observation {i} of {names} has value {value!r}, which no component "
        f"({_family_names(functions)}) can produce at the starting parameters: its "
        f"log-likelihood is -inf for every component ({bad.size} such observations, "
        f"indices {bad[:10].tolist()}). Remove or correct values outside the support, "
        "choose a family whose support contains them, or give a start closer to the data."
        + _wrapped_hint(functions, row)
    )


def _wrapped_hint(functions: EMFunctions, row: list) -> str:
    """PyMC stores integer observations as int32 (``pymc.pytensorf.smarttypeX``), so
    counts above 2**31 - 1 arrive wrapped, often negative; say so where it may be why."""
    integer = any(np.issubdtype(a.dtype, np.integer) for a in functions.observed().values())
    if not (integer and any(v < 0 for v in row)):
        return ""
    return (
        " If the data held integers above 2**31 - 1, PyMC's int32 conversion of integer "
        "observations wrapped them: pass them as a float64 array (np.asarray(x, float))."
    )
