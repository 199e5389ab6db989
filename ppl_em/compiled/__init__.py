"""Layer 2: the only place that compiles PyTensor functions."""

from ppl_em.compiled.functions import EMFunctions, build_em_functions
from ppl_em.compiled.layout import FlatLayout

__all__ = ["EMFunctions", "FlatLayout", "build_em_functions"]
