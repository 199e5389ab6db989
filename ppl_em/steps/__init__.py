"""Layer 3: the E- and M-steps as functions of arrays (compiled functions passed in)."""

from ppl_em.steps.estep import e_step, joint, q_and_grad, split, whole_data
from ppl_em.steps.mstep import (
    Expectations,
    MStepConfig,
    expectations_from_resp,
    m_step,
    m_step_from_resp,
    make_mstep_config,
)
from ppl_em.steps.stats import DataChunk, Stats

__all__ = [
    "DataChunk",
    "Expectations",
    "MStepConfig",
    "Stats",
    "e_step",
    "expectations_from_resp",
    "joint",
    "m_step",
    "m_step_from_resp",
    "make_mstep_config",
    "q_and_grad",
    "split",
    "whole_data",
]
