"""Exception and warning types raised by ppl_em."""

from __future__ import annotations


class PplEmError(Exception):
    """Base class of every error ppl_em raises on purpose."""


class ModelStructureError(PplEmError, ValueError):
    """The PyMC model is not a mixture ppl_em can fit (says what was found and what works)."""


class StartError(PplEmError, ValueError):
    """A ``start`` value has an unknown name, a wrong shape or lies outside the support."""


class DataError(PplEmError, ValueError):
    """Observed data contain NaN/inf or values the component cannot produce."""


class ClosedFormUnavailableError(PplEmError, ValueError):
    """``mstep="closed"`` was asked for a block that has no closed-form update."""


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the objective settled."""


class NonMonotoneWarning(UserWarning):
    """The EM objective decreased by more than round-off between two iterations."""


class NotIdentifiedError(PplEmError, ValueError):
    """The observed information at the estimate is singular or indefinite."""


class CollapseError(PplEmError, ArithmeticError):
    """A component shrank onto a point: the likelihood is unbounded there (names remedies)."""
