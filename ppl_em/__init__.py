"""ppl_em: EM for mixture models declared in PyMC, with both steps read off the graph."""

from ppl_em import _setup

_setup.configure()

from ppl_em.compile import EMFunctions, FlatLayout, build_em_functions  # noqa: E402
from ppl_em.em import EMRun, EMState, em_init, em_step, run_em, with_log_resp  # noqa: E402
from ppl_em.errors import (  # noqa: E402
    ClosedFormUnavailableError,
    CollapseError,
    ConvergenceWarning,
    DataError,
    ModelStructureError,
    NonMonotoneWarning,
    PplEmError,
    StartError,
)
from ppl_em.estep import ObjectiveGraphs, objective_graphs  # noqa: E402
from ppl_em.fit import PreparedEM, fit, prepare  # noqa: E402
from ppl_em.graph import MixtureGraph, analyse_model  # noqa: E402
from ppl_em.init import apply_start, default_start  # noqa: E402
from ppl_em.mstep import MStepConfig, closed_step, make_mstep_config, mstep, numeric_step  # noqa: E402
from ppl_em.recognise import ClosedFormPlan, build_plan  # noqa: E402
from ppl_em.result import EMResult  # noqa: E402
from ppl_em.validate import with_data  # noqa: E402

__all__ = [
    "ClosedFormPlan",
    "ClosedFormUnavailableError",
    "CollapseError",
    "ConvergenceWarning",
    "DataError",
    "EMFunctions",
    "EMResult",
    "EMRun",
    "EMState",
    "FlatLayout",
    "MStepConfig",
    "MixtureGraph",
    "ModelStructureError",
    "NonMonotoneWarning",
    "ObjectiveGraphs",
    "PplEmError",
    "PreparedEM",
    "StartError",
    "analyse_model",
    "apply_start",
    "build_em_functions",
    "build_plan",
    "closed_step",
    "default_start",
    "em_init",
    "em_step",
    "fit",
    "make_mstep_config",
    "mstep",
    "numeric_step",
    "objective_graphs",
    "prepare",
    "run_em",
    "with_data",
    "with_log_resp",
]
