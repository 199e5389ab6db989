"""Distributed EM on Dask: ``ppl_em.fit(data={...}, client=client)`` equals the
in-memory fit, survives a killed worker, and names bad data by partition.

A ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` is started for
this module and shut down after it. Cases and tolerances as in ``test_bigdata.py``:
the objective to 1e-10 relative and the parameters to 1e-8, for several partitionings
including uneven ones; the heavier cases are marked slow.
"""

from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np
import pytest

import ppl_em
from ppl_em.distributed import dask_map, make_payload, persist_data
from ppl_em.distributed.tasks import compiled_fingerprints
from ppl_em.em.step import em_init, em_step
from tests.test_bigdata import CASES, OPTIONS, _arrays, assert_same_fit, fitted  # noqa: F401

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _dask(arrays: dict, chunks) -> dict:
    return {name: da.from_array(x, chunks=(chunks, *x.shape[1:])) for name, x in arrays.items()}


def _fit(sample, data, client, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        return ppl_em.fit(prepared=sample, data=data, client=client, **OPTIONS, **kw)


# Partitionings of N=3000 rows: even, uneven, one row first, one partition.
UNEVEN = (1, 499, 1700, 800)
# The fast suite: a closed-form model in two partitionings (and NumPy input cut by
# chunk_size), the numeric M-step's map-reduce of Q in one, with finite-difference and
# with exact (IRLS) Hessians; the rest is slow.
FAST = [("normal-label", 1000), ("normal-label", UNEVEN), ("numeric-mixture", UNEVEN),
        ("glm-label", UNEVEN)]  # fmt: skip


@pytest.mark.parametrize(("case", "chunks"), FAST)
def test_dask_equals_in_memory(case, chunks, fitted, client):  # noqa: F811
    whole, sample, data = fitted(case)
    result = _fit(sample, _dask(_arrays(sample, data), chunks), client)
    assert result.n_obs == whole.n_obs
    assert_same_fit(result, whole)


def test_numpy_input_is_cut_by_chunk_size(fitted, client):  # noqa: F811
    whole, sample, data = fitted("normal-label")
    assert_same_fit(_fit(sample, _arrays(sample, data), client, chunk_size=777), whole)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_dask_equals_in_memory_all_models(case, fitted, client):  # noqa: F811
    whole, sample, data = fitted(case)
    arrays = _arrays(sample, data)
    for chunks in (3000, UNEVEN, 640):
        assert_same_fit(_fit(sample, _dask(arrays, chunks), client), whole)


def test_each_worker_compiles_once(fitted, client):  # noqa: F811
    _, sample, data = fitted("normal-label")
    _fit(sample, _dask(_arrays(sample, data), 500), client)
    fingerprint = make_payload(sample.functions).fingerprint
    for found in client.run(compiled_fingerprints).values():
        assert found.count(fingerprint) == 1


def test_squarem_wraps_the_distributed_step(fitted, client):  # noqa: F811
    whole, sample, x = fitted("normal-mixture")
    model = whole.prepared.functions.graph.model
    fast = ppl_em.fit(model, mode="mle", accelerate="squarem", **OPTIONS)
    result = _fit(sample, _dask({"x": x}, UNEVEN), client, accelerate="squarem")
    assert result.n_iter == fast.n_iter
    assert_same_fit(result, fast)


def _kill_one_worker(client) -> int:
    """SIGKILL one worker process of this test's cluster; its pid."""
    pids = client.run(os.getpid)
    address, pid = sorted(pids.items())[0]
    os.kill(pid, signal.SIGKILL)
    # The nanny notices and starts a new worker process; wait until the scheduler
    # has seen the old one go, so the next E-step runs on what is left.
    deadline = time.monotonic() + 60
    while address in client.scheduler_info()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return pid


def test_worker_killed_mid_fit_gives_the_same_answer(fitted, client):  # noqa: F811
    """Ten EM iterations on partitions persisted on the cluster, a worker process killed
    (SIGKILL) after the fourth: Dask recomputes the partitions it held from their
    source and retries its tasks, and the iterates are those of an undisturbed run to
    the last bit (statistics are summed in partition order, whoever computes them)."""
    _, sample, data = fitted("numeric-mixture")
    functions, config = sample
    arrays = _dask(_arrays(sample, data), UNEVEN)

    killed = []

    def iterate(kill_after: int | None):
        smap = dask_map(functions, persist_data(client, functions, config, arrays))
        state = em_init(functions, _u0(sample), config, smap, keep_resp=False)
        for i in range(10):
            if i == kill_after:
                killed.append(_kill_one_worker(client))
            state = em_step(functions, config, state, smap, keep_resp=False)
        return state

    undisturbed, disturbed = iterate(None), iterate(4)
    assert killed and killed[0] not in client.run(os.getpid).values()
    np.testing.assert_array_equal(disturbed.u, undisturbed.u)
    assert disturbed.objective == undisturbed.objective
    client.wait_for_workers(2, timeout=120)


def _u0(sample):
    from ppl_em.em import default_start

    return default_start(sample.functions, sample.config, None)


def test_bad_value_names_partition_and_observation(fitted, client):  # noqa: F811
    _, sample, x = fitted("normal-label")
    bad = x.copy()
    bad[1777] = np.inf
    with pytest.raises(ppl_em.DataError, match=r"partition 2 at observation 1777 .*not finite"):
        _fit(sample, _dask({"x": bad}, UNEVEN), client)


def test_out_of_support_names_partition_and_observation(client):
    import pymc as pm

    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.poisson(2.0, 1500), rng.poisson(15.0, 1500)]).astype(float)
    with pm.Model() as model:
        w = pm.Dirichlet("w", a=np.ones(2))
        mu = pm.Gamma("mu", 2.0, 0.2, shape=2)
        pm.Mixture("counts", w=w, comp_dists=pm.Poisson.dist(mu=mu), observed=counts[:300])
    counts[2500] = 2.5
    with pytest.raises(ppl_em.DataError, match=r"partition 3 at observation 2500 .*integer"):
        ppl_em.fit(model, data={"counts": da.from_array(counts, chunks=UNEVEN)}, client=client)
    counts[2500] = -4
    where = r"partition 3 \(rows 2200..2999\).*observation 2500"
    with pytest.raises(ppl_em.DataError, match=where):
        ppl_em.fit(model, data={"counts": da.from_array(counts, chunks=UNEVEN)}, client=client,
                   start={"mu": [2.0, 15.0]}, progressbar=False)  # fmt: skip


def test_predict_proba_of_a_dask_array_is_lazy(fitted, client):  # noqa: F811
    whole, sample, x = fitted("normal-label")
    result = _fit(sample, _dask({"x": x}, 1000), client)
    lazy = result.predict_proba(data={"x": da.from_array(x, chunks=700)})
    assert isinstance(lazy, da.Array) and lazy.shape == (len(x), 3)
    np.testing.assert_allclose(lazy.compute(), whole.responsibilities, rtol=1e-9, atol=1e-12)
