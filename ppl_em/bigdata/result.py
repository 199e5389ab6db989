"""The result of a fit on data given to ``ppl_em.fit(data=...)``: no N x K matrix kept.

:class:`StreamedEMResult` is an :class:`~ppl_em.result.EMResult` whose ``n_obs`` is the
data's N (not the length of the sample the model was declared with: BIC reads it), and
whose responsibilities are computed on demand for any data, chunk by chunk
(:meth:`~StreamedEMResult.predict_proba`; a dask array in gives a lazy dask array out),
instead of being stored for all N.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import arviz as az
import numpy as np

from ppl_em import criteria
from ppl_em.em.sources import open_source
from ppl_em.result import EMResult
from ppl_em.steps.estep import e_step
from ppl_em.steps.stats import DataChunk


def _has_dask(data: Mapping) -> bool:
    return any(hasattr(x, "dask") and hasattr(x, "blocks") for x in data.values())


@dataclass(frozen=True)
class StreamedEMResult(EMResult):
    """Result of ``ppl_em.fit(data=...)`` (chunked, Dask or online EM).

    ``n_obs`` is the number of observations in the data (labels: N x J for a
    ``pm.Mixture`` over (N, J) data); ``method`` is ``"batch"`` (exact EM) or
    ``"online"``; ``log_resp`` is None: use :meth:`predict_proba` /
    :meth:`log_resp_of` on the data, or on any chunk of it.
    """

    n_data: int = 0
    n_data_rows: int = 0
    method: str = "batch"
    # The data the fit read (None for a stream seen once): what icl() re-reads.
    data: Any = field(default=None, repr=False)

    @property
    def n_obs(self) -> int:
        return int(self.n_data)

    @property
    def responsibilities(self) -> np.ndarray:
        raise AttributeError(
            "a fit on data= keeps no N x K responsibilities (N may exceed memory); compute "
            "them for the data or any chunk of it with result.predict_proba(data={...}) "
            "(a dask array in gives a lazy dask array out) or iterate "
            "result.log_resp_chunks(data={...})."
        )

    def _u(self) -> np.ndarray:
        return self.unconstrained

    def log_resp_of(self, data: Mapping) -> np.ndarray:
        """n x K log-responsibilities of ``data`` (every per-observation array, any
        length, in memory or read from a memmap/zarr array), at the estimate."""
        return np.concatenate([lr for _, lr in self.log_resp_chunks(data)])

    def log_resp_chunks(
        self, data: Mapping, chunk_size: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first label, log-responsibilities)`` chunk by chunk over ``data``: the
        whole of a dataset beyond memory, one chunk in memory at a time."""
        functions = self.prepared.functions
        source = open_source(functions, data, chunk_size)
        per_row = functions.graph.labels_per_row
        for i, (a, _) in enumerate(source.bounds):
            chunk = DataChunk(source.read(i, check=True), a)
            yield a * per_row, e_step(functions, self._u(), chunk, keep_resp=True).log_resp

    def loglik_of(self, data: Mapping, chunk_size: int | None = None) -> float:
        """The marginal log-likelihood of ``data`` at the estimate, in one pass (e.g. of
        an online fit over a stream, whose ``loglik`` is prequential)."""
        functions = self.prepared.functions
        source = open_source(functions, data, chunk_size)
        total = 0.0
        for i, (a, _) in enumerate(source.bounds):
            chunk = DataChunk(source.read(i, check=True), a)
            total += e_step(functions, self._u(), chunk).loglik
        extra, _ = functions.fixed(self._u(), *functions.fixed_data)
        return total + float(extra)

    def predict_proba(self, data: Mapping | None = None):
        """``p(z_i = k | x_i, theta)`` for ``data`` (a dict like ``fit``'s ``data``):
        an n x K array, or a lazy dask array when ``data`` holds dask arrays."""
        if data is None:
            return self.responsibilities
        if _has_dask(data):
            from ppl_em.distributed.engine import lazy_log_resp

            return lazy_log_resp(self.prepared.functions, self._u(), data).map_blocks(np.exp)
        return np.exp(self.log_resp_of(data))

    def predict(self, data: Mapping | None = None):
        """Most probable component of each observation of ``data``."""
        if data is None:
            return self.responsibilities
        proba = self.predict_proba(data)
        return proba.argmax(axis=1)

    def icl(self) -> float:
        """ICL over all the data: the classification entropy takes one more pass."""
        if self.data is None:
            raise ValueError(
                "icl() needs the classification entropy over every observation, and this "
                "fit read a stream once; compute it from result.log_resp_chunks(data) with "
                "ppl_em.criteria.classification_entropy."
            )
        entropy = sum(
            criteria.classification_entropy(lr) for _, lr in self.log_resp_chunks(self.data)
        )
        return criteria.bic(self.loglik, self.n_parameters, self.n_obs) + 2.0 * entropy

    def log_resp_at(self, params: dict[str, np.ndarray]) -> np.ndarray:
        raise AttributeError(
            "log_resp_at reads the fitted data whole; for data given to fit(data=...) use "
            "result.log_resp_of(data) (at the estimate) on a chunk."
        )

    def to_inference_data(self) -> az.InferenceData:
        """The estimate as one chain with one draw (no ``lp_<label>``: N x K values)."""
        posterior = {name: np.asarray(v)[None, None] for name, v in self.params.items()}
        coords, dims, _ = self._dims()
        idata = az.from_dict(posterior=posterior, dims=dims, coords=coords)
        idata.posterior.attrs.update(
            inference_library="ppl_em",
            mode=self.mode,
            method=self.method,
            n_obs=self.n_obs,
            log_posterior=self.log_posterior,
            loglik=self.loglik,
            n_iter=self.n_iter,
            converged=int(self.converged),
        )
        return idata
