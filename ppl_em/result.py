"""The fitted estimate, in the names scikit-learn and ArviZ users expect."""

from __future__ import annotations

from dataclasses import dataclass, field

import arviz as az
import numpy as np

from ppl_em import criteria
from ppl_em.model.data import DataSpec
from ppl_em.prepared import PreparedEM
from ppl_em.steps.estep import joint
from ppl_em.steps.stats import DataChunk


@dataclass(frozen=True)
class EMResult:
    """Result of :func:`ppl_em.fit`.

    ``params`` holds each free variable (label excluded) in the constrained space;
    ``log_posterior`` is the marginal log density with the log prior and no Jacobian
    (what ``pm.find_MAP`` maximises), ``loglik`` the marginal log-likelihood,
    ``history`` the objective (``log_posterior`` for ``mode="map"``, ``loglik`` for
    ``"mle"``) before the first and after every iteration. ``prepared`` is the compiled
    model the fit ran on (pass it to :func:`ppl_em.fit` to fit again without compiling).
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
    prepared: PreparedEM = field(repr=False)
    objectives_per_init: tuple[float, ...] = ()
    # Findings about the fit (empty or identical components, collapse, ...), by name.
    diagnostics: dict = field(default_factory=dict)
    # Parameters held at given values (``fit(fixed=...)``), by name.
    fixed: dict = field(default_factory=dict)

    @property
    def responsibilities(self) -> np.ndarray:
        """N x K matrix ``p(z_i = k | x_i, theta)``."""
        return np.exp(self.log_resp)

    @property
    def objective(self) -> float:
        return self.history[-1]

    @property
    def n_components(self) -> int:
        return self.prepared.functions.graph.n_components

    @property
    def n_obs(self) -> int:
        """Number of observations N that the label ranges over."""
        return int(self.log_resp.shape[0])

    @property
    def n_weighted(self) -> float:
        """The data's size as the criteria count it: N, or the sum of the weights."""
        weights = self.prepared.functions.weights
        return float(self.n_obs if weights is None else weights.sum())

    @property
    def n_parameters(self) -> int:
        """Free unconstrained dimensions of the fitted model (label excluded)."""
        return int(self.prepared.functions.layout.size)

    @property
    def kind(self) -> str:
        """``"label"`` (an explicit label) or ``"mixture"`` (a ``pm.Mixture``)."""
        return self.prepared.functions.graph.kind

    @property
    def observed(self) -> dict[str, np.ndarray]:
        """The observed arrays the label explains, by variable name, NaN where an
        entry is missing (EM reads those arrays filled, with a mask)."""
        graph = self.prepared.functions.graph
        out = dict(self.prepared.functions.observed())
        for name, seen in graph.observed_masks:
            out[name] = np.where(seen, out[name], np.nan)
        return out

    @property
    def data_spec(self) -> DataSpec:
        """Which arrays are per-observation data (observed values and covariates)."""
        return self.prepared.functions.spec

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

    # Information criteria, lower is better (ppl_em.criteria)
    def bic(self) -> float:
        return criteria.bic(self.loglik, self.n_parameters, self.n_weighted)

    def aic(self) -> float:
        return criteria.aic(self.loglik, self.n_parameters)

    def icl(self) -> float:
        weights = self.prepared.functions.weights
        return criteria.icl(self.loglik, self.n_parameters, self.n_weighted, self.log_resp,
                            weights)  # fmt: skip

    def joint_logp(self, **arrays: np.ndarray) -> np.ndarray:
        """n x K matrix ``log p(x_i, z_i = k | theta)`` at the estimate, over the fitted
        data or over other arrays of any length given by data name (every
        per-observation array of :attr:`data_spec`)."""
        functions = self.prepared.functions
        if not arrays:
            return joint(functions, self.unconstrained)
        missing = sorted(set(functions.data_names) - set(arrays))
        if missing:
            raise ValueError(f"joint_logp needs every per-observation array; missing {missing}.")
        chunk = DataChunk(tuple(np.asarray(arrays[n]) for n in functions.data_names))
        return joint(functions, self.unconstrained, chunk)

    def log_resp_at(self, params: dict[str, np.ndarray]) -> np.ndarray:
        """Log-responsibilities over the fitted data at other constrained ``params``."""
        functions = self.prepared.functions
        values = [np.asarray(params[n]) for n in functions.layout.rv_names]
        u = np.concatenate(
            [np.ravel(f) for f in functions.unconstrain(self.unconstrained, *values)]
        )
        rows = joint(functions, u)
        return rows - np.logaddexp.reduce(rows, axis=1, keepdims=True)

    def _dims(self) -> tuple[dict, dict, list[str]]:
        """The model's coords, each parameter's dims, and ``lp_<label>``'s dims: the
        label's (or the observed variable's) first dim, then the weights' dim."""
        graph = self.prepared.functions.graph
        model = graph.model
        named = {k: v for k, v in model.named_vars_to_dims.items() if v}
        coords = {k: list(v) for k, v in model.coords.items() if v is not None}
        dims = {name: list(named[name]) for name in self.params if name in named}
        owner = graph.label_name if graph.kind == "label" else graph.dependents[0].name
        obs = named.get(owner, (f"{self.label_name}_dim_0",))[0]
        weights = [d for name, d in dims.items() if len(d) == 1 and model[name].ndim == 1
                   and np.size(self.params[name]) == self.n_components]  # fmt: skip
        component = weights[0][0] if weights else f"lp_{self.label_name}_dim"
        return coords, dims, [obs, component]

    def to_inference_data(self) -> az.InferenceData:
        """The estimate as one chain with one draw, plus ``lp_<label>``, with the model's
        coords and dims.

        ``lp_<label>`` holds the log-responsibilities with the label's domain as the last
        dimension, as pymc-extras' ``recover_marginals`` stores them.
        """
        lp_name = f"lp_{self.label_name}"
        posterior = {name: np.asarray(v)[None, None] for name, v in self.params.items()}
        posterior[lp_name] = self.log_resp[None, None]
        coords, dims, lp_dims = self._dims()
        dims[lp_name] = lp_dims
        idata = az.from_dict(posterior=posterior, dims=dims, coords=coords)
        idata.posterior.attrs.update(
            inference_library="ppl_em",
            mode=self.mode,
            log_posterior=self.log_posterior,
            loglik=self.loglik,
            n_iter=self.n_iter,
            converged=int(self.converged),
        )
        return idata
