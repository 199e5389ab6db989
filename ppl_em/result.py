"""The fitted estimate, in the names scikit-learn and ArviZ users expect."""

from __future__ import annotations

from dataclasses import dataclass, field

import arviz as az
import numpy as np

from ppl_em.compile import EMFunctions


@dataclass(frozen=True)
class EMResult:
    """Result of :func:`ppl_em.fit`.

    ``params`` holds each free variable (label excluded) in the constrained space;
    ``log_posterior`` is the marginal log density with the log prior and no Jacobian
    (what ``pm.find_MAP`` maximises), ``loglik`` the marginal log-likelihood,
    ``history`` the objective (``log_posterior`` for ``mode="map"``, ``loglik`` for
    ``"mle"``) before the first and after every iteration.
    """

    params: dict[str, np.ndarray]
    log_posterior: float
    loglik: float
    history: np.ndarray
    n_iter: int
    converged: bool
    monotone: bool
    log_resp: np.ndarray
    elapsed: float
    mode: str
    label_name: str
    unconstrained: np.ndarray
    functions: EMFunctions = field(repr=False)
    objectives_per_init: tuple[float, ...] = ()
    # Findings about the fit (empty or identical components, collapse, ...), by name.
    diagnostics: dict = field(default_factory=dict)

    @property
    def responsibilities(self) -> np.ndarray:
        """N x K matrix ``p(z_i = k | x_i, theta)``."""
        return np.exp(self.log_resp)

    @property
    def objective(self) -> float:
        return self.history[-1]

    @property
    def n_components(self) -> int:
        return self.functions.graph.n_components

    # scikit-learn names
    @property
    def lower_bound_(self) -> float:
        return self.objective

    @property
    def n_iter_(self) -> int:
        return self.n_iter

    @property
    def converged_(self) -> bool:
        return self.converged

    def predict_proba(self) -> np.ndarray:
        return self.responsibilities

    def predict(self) -> np.ndarray:
        """Most probable component of each observation."""
        return np.argmax(self.log_resp, axis=1)

    # Information criteria, lower is better (see ppl_em.criteria); imported lazily
    # because criteria.py imports this module.
    def bic(self) -> float:
        from ppl_em.criteria import bic

        return bic(self)

    def aic(self) -> float:
        from ppl_em.criteria import aic

        return aic(self)

    def icl(self) -> float:
        from ppl_em.criteria import icl

        return icl(self)

    def joint_logp(self) -> np.ndarray:
        """N x K matrix ``log p(x_i, z_i = k | theta)`` at the estimate."""
        return self.functions.joint(self.unconstrained, *self.functions.data)

    def to_inference_data(self) -> az.InferenceData:
        """The estimate as one chain with one draw, plus ``lp_<label>``.

        ``lp_<label>`` holds the log-responsibilities with the label's domain as the last
        dimension, as pymc-extras' ``recover_marginals`` stores them.
        """
        lp_name = f"lp_{self.label_name}"
        posterior = {name: np.asarray(v)[None, None] for name, v in self.params.items()}
        posterior[lp_name] = self.log_resp[None, None]
        dims = {lp_name: [f"{self.label_name}_dim_0", f"{lp_name}_dim"]}
        idata = az.from_dict(posterior=posterior, dims=dims)
        idata.posterior.attrs.update(
            inference_library="ppl_em",
            mode=self.mode,
            log_posterior=self.log_posterior,
            loglik=self.loglik,
            n_iter=self.n_iter,
            converged=int(self.converged),
        )
        return idata
