"""Layer 1: read the PyMC graph (compiles nothing). ``MixtureGraph`` is the frozen
boundary between PyMC and everything after it."""

from ppl_em.model.data import DataSpec, data_spec
from ppl_em.model.graph import MixtureGraph, analyse_model
from ppl_em.model.joint import fixed_terms, joint_rows
from ppl_em.model.recognise import ClosedFormPlan, build_plan

__all__ = [
    "ClosedFormPlan",
    "DataSpec",
    "MixtureGraph",
    "analyse_model",
    "build_plan",
    "data_spec",
    "fixed_terms",
    "joint_rows",
]
