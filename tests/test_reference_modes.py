"""How compare compiles PyMC's references: find_MAP on NumPy-backed Ops and NUTS on
numba must give PyMC's own answers, and a model numba cannot compile still samples."""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor
import pytest

import ppl_em
from ppl_em.inference import reference_modes
from ppl_em.inference.crosscheck import marginal_model


def _poisson_mixture() -> pm.Model:
    rng = np.random.default_rng(4)
    y = rng.poisson(np.where(rng.random(120) < 0.4, 2.0, 9.0))
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        lam = pm.Gamma("lam", 2.0, 0.5, shape=2)
        z = pm.Categorical("z", p=w, shape=y.size)
        pm.Poisson("y", mu=lam[z], observed=y)
    return model


@pytest.mark.slow
def test_find_map_on_numpy_ops_equals_find_map_in_c():
    """The same L-BFGS on the same objective: the mode only changes how the logp and its
    gradient are evaluated, so both stop at the same point."""
    model = _poisson_mixture()
    marg = marginal_model(model, ppl_em.fit(model, progressbar=False))
    points = []
    for modes in reference_modes.MODES:
        with reference_modes.numpy_mode(modes):
            points.append(pm.find_MAP(model=marg, progressbar=False))
    fast, pymc_default = points
    for name in ("w", "lam"):
        np.testing.assert_allclose(fast[name], pymc_default[name], rtol=1e-7)


def _linker_of_a_new_function():
    x = pytensor.tensor.vector("x")
    return pytensor.function([x], pytensor.tensor.exp(x).sum()).maker.linker


def test_numpy_mode_compiles_without_c_and_restores_the_default():
    default = pytensor.config.mode
    with reference_modes.numpy_mode("fast"):
        assert not _linker_of_a_new_function().c_thunks
    assert pytensor.config.mode == default
    with reference_modes.numpy_mode("pymc"):
        assert pytensor.config.mode == default


def test_nuts_compiles_with_numba_and_falls_back_where_numba_refuses(monkeypatch):
    calls = []

    def fake_sample(compile_kwargs, **kwargs):
        calls.append(compile_kwargs["mode"])
        if compile_kwargs["mode"] == "NUMBA":
            raise NotImplementedError("No numba implementation for SomeOp")
        return "draws"

    monkeypatch.setattr(reference_modes.pm, "sample", fake_sample)
    notes = []
    found = reference_modes.sample_nuts(notes, reference_modes="fast", nuts_sampler="pymc")
    assert found == "draws"
    assert calls == ["NUMBA", "FAST_RUN"]
    assert "numba could not compile" in notes[0] and "NotImplementedError" in notes[0]


def test_other_sampling_errors_are_not_retried(monkeypatch):
    def fake_sample(compile_kwargs, **kwargs):
        raise ValueError("bad initvals")

    monkeypatch.setattr(reference_modes.pm, "sample", fake_sample)
    with pytest.raises(ValueError, match="bad initvals"):
        reference_modes.sample_nuts([], reference_modes="fast", nuts_sampler="pymc")


def test_pymc_modes_and_nutpie_keep_their_own_compilation():
    assert reference_modes.nuts_compile_kwargs("pymc", "pymc") == {"mode": "FAST_RUN"}
    assert reference_modes.nuts_compile_kwargs("fast", "nutpie") == {}


def test_unknown_reference_modes_is_refused_before_fitting():
    with pytest.raises(ValueError, match=r"reference_modes='gpu' must be one of"):
        ppl_em.compare(_poisson_mixture(), reference_modes="gpu")
