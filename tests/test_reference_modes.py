"""How compare compiles PyMC's references: on NumPy-backed Ops, find_MAP and NUTS must
give PyMC's own answers, and NUTS's function must survive the trip to PyMC's chain
processes."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pymc as pm
import pytensor
import pytest

import ppl_em
from ppl_em.inference import reference_modes
from ppl_em.inference.crosscheck import marginal_model
from tests.conftest import numpy_ops


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
def test_numpy_ops_give_find_map_and_nuts_what_c_gives():
    """The same L-BFGS on the same objective: the mode only changes how the logp and its
    gradient are evaluated, so find_MAP stops at the same point, and NUTS's function
    (``pm.sample``'s ``compile_kwargs``) returns the same logp and gradient."""
    model = _poisson_mixture()
    marg = marginal_model(model, ppl_em.fit(model, progressbar=False))
    points = []
    for modes in ("fast", "pymc"):
        with reference_modes.numpy_mode(modes):
            points.append(pm.find_MAP(model=marg, progressbar=False))
    numpy_ops, pymc_default = points
    for name in ("w", "lam"):
        np.testing.assert_allclose(numpy_ops[name], pymc_default[name], rtol=1e-7)
    values = []
    for modes in reference_modes.MODES:
        kwargs = reference_modes.nuts_compile_kwargs(modes, "pymc")
        fn = marg.logp_dlogp_function(ravel_inputs=True, **kwargs)
        fn.set_extra_values({})
        start = marg.initial_point()
        point = np.concatenate([np.ravel(start[v.name]) + 0.3 for v in fn._grad_vars])
        values.append(fn(point))
    for logp, grad in values[1:]:
        np.testing.assert_allclose(logp, values[0][0], rtol=1e-12)
        np.testing.assert_allclose(grad, values[0][1], rtol=1e-10, atol=1e-12)


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


def test_find_map_from_two_starts_compiles_its_logp_and_gradient_once_and_stops_where_it_did():
    """Inside ``compiled_once`` a second find_MAP reuses the first one's compiled logp
    and gradient (the same objects), and stops where find_MAP stops outside it, to the
    last bit; afterwards the model compiles afresh, through its own methods again."""
    model = _poisson_mixture()
    marg = marginal_model(model, ppl_em.fit(model, progressbar=False))
    with numpy_ops():  # nothing compiled to C (26 s of C on a fresh clone)
        _find_maps_from_two_starts_twice(marg)


def _find_maps_from_two_starts_twice(marg):
    start = {"w": np.array([0.3, 0.7]), "lam": np.array([1.5, 8.0])}
    outside = [pm.find_MAP(start=s, model=marg, progressbar=False) for s in (start, None)]
    made = []
    for name in reference_modes.COMPILERS:  # count what is compiled
        original = getattr(marg, name)
        setattr(marg, name, lambda *a, _f=original, _n=name, **k: made.append(_n) or _f(*a, **k))
    with reference_modes.compiled_once(marg):
        inside = [pm.find_MAP(start=s, model=marg, progressbar=False) for s in (start, None)]
        logp = marg.compile_logp(jacobian=False)
        counts = Counter(made)
        assert marg.compile_logp(jacobian=True) is not logp
    assert counts["compile_logp"] == counts["compile_dlogp"] == 1
    for got, want in zip(inside, outside, strict=True):
        for name in ("w", "lam", "lam_log__"):
            np.testing.assert_array_equal(got[name], want[name])
    made.clear()
    assert marg.compile_logp(jacobian=False) is not logp and "compile_logp" in made


def test_fast_nuts_samples_chains_in_parallel_processes():
    """``"fast"`` NUTS's function (NumPy-backed Ops) is pickled to PyMC's chain
    processes, as ``cores=2`` does by default on two cores, and samples there."""
    model = _poisson_mixture()
    marg = marginal_model(model, ppl_em.fit(model, progressbar=False))
    notes = []
    idata = reference_modes.sample_nuts(
        notes, reference_modes="fast", nuts_sampler="pymc", model=marg, draws=40, tune=40,
        chains=2, cores=2, random_seed=3, progressbar=False,
    )  # fmt: skip
    lam = idata.posterior["lam"].values
    assert lam.shape == (2, 40, 2) and np.isfinite(lam).all() and not notes
    # Both chains moved: each drew more than one distinct value.
    assert all(np.unique(lam[c, :, 0]).size > 1 for c in range(2))


def test_each_mode_compiles_nuts_as_documented_and_nutpie_compiles_itself():
    fast = reference_modes.nuts_compile_kwargs("fast", "pymc")["mode"]
    assert not fast.linker.c_thunks and "fusion" in fast._optimizer.exclude
    assert reference_modes.nuts_compile_kwargs("compiled", "pymc") == {"mode": "FAST_RUN"}
    assert reference_modes.nuts_compile_kwargs("pymc", "pymc") == {"mode": "FAST_RUN"}
    assert reference_modes.nuts_compile_kwargs("fast", "nutpie") == {}
    assert reference_modes.nuts_compile_kwargs("fast", "pymc", linalg=True) == {"mode": "NUMBA"}
    with reference_modes.numpy_mode("compiled"):
        assert not _linker_of_a_new_function().c_thunks


def test_unknown_reference_modes_is_refused_before_fitting():
    with pytest.raises(ValueError, match=r"reference_modes='gpu' must be one of"):
        ppl_em.compare(_poisson_mixture(), reference_modes="gpu")


def test_chains_get_a_process_each_up_to_the_cpus_this_process_may_use():
    # PyMC's default would give cpu_count() // 2: one process on a 2-vCPU machine.
    cpus = len(os.sched_getaffinity(0))
    assert reference_modes.chain_processes(None, 4) == min(4, cpus)
    assert reference_modes.chain_processes(None, 1) == 1
    assert reference_modes.chain_processes(3, 2) == 3  # the caller's cores are kept


def _mvnormal_model() -> pm.Model:
    x = np.random.default_rng(2).normal(size=(40, 2))
    with pm.Model() as model:
        chol, _, _ = pm.LKJCholeskyCov("c", n=2, eta=2.0, sd_dist=pm.Exponential.dist(1.0))
        pm.MvNormal("x", mu=np.zeros(2), chol=chol, observed=x)
    return model


def test_linear_algebra_is_found_in_the_logp():
    assert reference_modes.has_linalg(_mvnormal_model())  # Cholesky, triangular solve
    assert not reference_modes.has_linalg(_poisson_mixture())


def test_fast_nuts_takes_numba_for_linear_algebra_and_falls_back_where_numba_refuses(
    monkeypatch,
):
    calls = []

    def fake_sample(compile_kwargs, **kwargs):
        calls.append(compile_kwargs["mode"])
        if compile_kwargs["mode"] == "NUMBA":
            raise NotImplementedError("No numba implementation for SomeOp")
        return "draws"

    monkeypatch.setattr(reference_modes.pm, "sample", fake_sample)
    notes = []
    model = _mvnormal_model()
    found = reference_modes.sample_nuts(
        notes, reference_modes="fast", nuts_sampler="pymc", model=model
    )
    assert found == "draws" and calls[0] == "NUMBA"
    assert not calls[1].linker.c_thunks  # the retry: NumPy-backed Ops, not C
    assert "numba could not compile" in notes[0] and "NotImplementedError" in notes[0]
    # A model without linear algebra goes straight to NumPy-backed Ops.
    calls.clear()
    reference_modes.sample_nuts([], reference_modes="fast", nuts_sampler="pymc",
                                model=_poisson_mixture())  # fmt: skip
    assert len(calls) == 1 and not calls[0].linker.c_thunks


def test_other_sampling_errors_are_not_retried(monkeypatch):
    def fake_sample(compile_kwargs, **kwargs):
        raise ValueError("bad initvals")

    monkeypatch.setattr(reference_modes.pm, "sample", fake_sample)
    with pytest.raises(ValueError, match="bad initvals"):
        reference_modes.sample_nuts(
            [], reference_modes="fast", nuts_sampler="pymc", model=_mvnormal_model()
        )


@pytest.mark.slow
def test_numba_nuts_samples_chains_in_parallel_processes():
    """``"fast"`` NUTS on an MvNormal compiles with numba; the function is pickled to
    PyMC's chain processes (two, as ``compare`` starts on two CPUs) and samples there."""
    notes = []
    idata = reference_modes.sample_nuts(
        notes, reference_modes="fast", nuts_sampler="pymc", model=_mvnormal_model(),
        draws=40, tune=40, chains=2, cores=2, random_seed=1, progressbar=False,
    )  # fmt: skip
    sds = idata.posterior["c_stds"].values
    assert sds.shape == (2, 40, 2) and np.isfinite(sds).all() and not notes
    assert all(np.unique(sds[c, :, 0]).size > 1 for c in range(2))
