"""``ppl_em.fit(data=...)``: chunked, Dask-distributed and online EM, and their result."""

from ppl_em.bigdata.fitting import backend_for, fit_data
from ppl_em.bigdata.result import StreamedEMResult

__all__ = ["StreamedEMResult", "backend_for", "fit_data"]
