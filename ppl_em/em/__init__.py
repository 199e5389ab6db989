"""Layer 4: EM itself: state, ``em_init``/``em_step``, the loop, SQUAREM, starts."""

from ppl_em.em.loop import EMRun, run_em
from ppl_em.em.starts import apply_start, default_start
from ppl_em.em.step import (
    EMData,
    EMState,
    em_data,
    em_init,
    em_step,
    log_prior,
    with_log_resp,
)

__all__ = [
    "EMData",
    "EMRun",
    "EMState",
    "apply_start",
    "default_start",
    "em_data",
    "em_init",
    "em_step",
    "log_prior",
    "run_em",
    "with_log_resp",
]
