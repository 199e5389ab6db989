"""The names of every option ppl_em takes, and declarative checks of ``fit``'s arguments.

Each argument has a constraint (as scikit-learn's ``_parameter_constraints``): one
place says what is allowed, and every refusal names the argument, the value given and
what would be accepted, before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral, Real
from typing import Any, NamedTuple

import numpy as np

MODES = ("map", "mle")
MSTEPS = ("auto", "closed", "numeric")
BACKENDS = ("auto", "c", "numba", "python")
# "auto": EM steps, and L-BFGS on the marginal objective where EM crawls
# (ppl_em.em.marginal); None: EM steps only; "squarem": SQUAREM cycles.
ACCELERATORS = ("auto", None, "squarem")
METHODS = ("batch", "online")
# How compare compiles PyMC's find_MAP and NUTS (ppl_em.inference.reference_modes).
REFERENCE_MODES = ("fast", "compiled", "pymc")


class Constraint(NamedTuple):
    """``ok(value)`` decides; the message follows ``{name}={value!r} `` (or for a type
    error ``{name} ``) and says what is accepted."""

    ok: Callable[[Any], bool]
    message: str
    error: type = ValueError


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and bool(np.isfinite(value))


def one_of(options: tuple) -> Constraint:
    return Constraint(lambda v: v in options, f"is not one of {options}.")


def int_at_least(low: int) -> Constraint:
    return Constraint(lambda v: _is_int(v) and v >= low, f"must be an integer >= {low}.")


POSITIVE = Constraint(
    lambda v: _is_real(v) and v > 0, "must be a positive finite number, e.g. 1e-8."
)
NON_NEGATIVE = Constraint(
    lambda v: _is_real(v) and v >= 0, "must be a finite number >= 0, e.g. 1e-6."
)
SEED = Constraint(
    lambda v: v is None or _is_int(v) or isinstance(v, np.random.Generator),
    "must be None, an int or a numpy Generator",
    TypeError,
)
NON_NEGATIVE_SEED = Constraint(
    lambda v: not _is_int(v) or v >= 0,
    "must be >= 0 (numpy seeds are non-negative): e.g. random_seed=0.",
)
FLAG = Constraint(lambda v: isinstance(v, bool | np.bool_), "must be True or False", TypeError)

GAP = Constraint(
    lambda v: isinstance(v, Real) and not isinstance(v, bool) and v > 0,
    "must be a positive number of nats (np.inf turns the rule off), e.g. 5e-7.",
)

ROWS = Constraint(
    lambda v: v is None or (_is_int(v) and v >= 1), "must be None or an integer >= 1."
)

FIT_CONSTRAINTS: dict[str, tuple[Constraint, ...]] = {
    "mode": (Constraint(lambda v: v is None or v in MODES, f"is not one of {MODES}."),),
    "mstep": (Constraint(lambda v: v is None or v in MSTEPS, f"is not one of {MSTEPS}."),),
    "max_iter": (int_at_least(1),),
    "n_init": (int_at_least(1),),
    "tol": (POSITIVE,),
    "gap_tol": (GAP,),
    "exact_mstep": (FLAG,),
    "reg_covar": (NON_NEGATIVE,),
    "random_seed": (SEED, NON_NEGATIVE_SEED),
    "progressbar": (FLAG,),
    "accelerate": (one_of(ACCELERATORS),),
    "method": (one_of(METHODS),),
    "chunk_size": (ROWS,),
    "batch_size": (ROWS,),
}


def check_args(constraints: dict[str, tuple[Constraint, ...]], args: dict[str, Any]) -> None:
    """Raise on the first argument in ``args`` that breaks its constraints."""
    for name, checks in constraints.items():
        if name not in args:
            continue
        value = args[name]
        for check in checks:
            if check.ok(value):
                continue
            if check.error is TypeError:
                shown = f"got {type(value).__name__}" if name == "random_seed" else f"got {value!r}"
                raise TypeError(f"{name} {check.message}, {shown}.")
            raise check.error(f"{name}={value!r} {check.message}")
