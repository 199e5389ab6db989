"""ppl_em: EM for mixture models declared in PyMC, with both steps read off the graph.

The public surface is below; the building blocks for writing EM variants stay
importable from their layers (``ppl_em.model``, ``ppl_em.compiled``, ``ppl_em.steps``,
``ppl_em.em``), as ``docs/architecture.md`` describes.
"""

from ppl_em import _setup

_setup.configure()

from ppl_em.bigdata import StreamedEMResult  # noqa: E402
from ppl_em.errors import (  # noqa: E402
    ClosedFormUnavailableError,
    CollapseError,
    ConvergenceWarning,
    DataError,
    ModelStructureError,
    NonMonotoneWarning,
    NotIdentifiedError,
    PplEmError,
    StartError,
)
from ppl_em.fit import fit  # noqa: E402
from ppl_em.inference.crosscheck import compare  # noqa: E402
from ppl_em.inference.selection import select_k  # noqa: E402
from ppl_em.inference.stderr import standard_errors  # noqa: E402
from ppl_em.prepared import PreparedEM, prepare, with_data  # noqa: E402
from ppl_em.report.writer import write_report  # noqa: E402
from ppl_em.result import EMResult  # noqa: E402

__all__ = [
    "ClosedFormUnavailableError",
    "CollapseError",
    "ConvergenceWarning",
    "DataError",
    "EMResult",
    "ModelStructureError",
    "NonMonotoneWarning",
    "NotIdentifiedError",
    "PplEmError",
    "PreparedEM",
    "StartError",
    "StreamedEMResult",
    "compare",
    "fit",
    "prepare",
    "select_k",
    "standard_errors",
    "with_data",
    "write_report",
]
