"""Fixtures for the multi-process service tests (tests/service/).

Every cluster here is a real `shardgrad.cluster.LocalCluster`: a coordinator and N workers
as separate processes talking ZeroMQ over ipc:// sockets in a private temp dir, so tests run
side by side under `pytest -n auto` without a single fixed port. Each cluster is torn down at
the end of its test, pass or fail: workers first (so their BYE reaches a live coordinator
and they exit at once instead of lingering), then the coordinator; anything still alive
after a grace period is SIGKILLed. A failing test keeps the cluster's logs and names them.

Synchronisation is by polling a condition against a deadline (`wait_for`), never by a
fixed sleep.
"""

import copy
import functools
import json
import os
import shutil
import signal
import subprocess
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in the worker processes

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shardgrad.cluster import RETRY, LocalCluster  # noqa: E402
from shardgrad.cluster import wait_for as _wait_for  # noqa: E402
from shardgrad.jobspec import parse_spec  # noqa: E402
from shardgrad.training import train_local, weights_digest  # noqa: E402

# --- job specs -------------------------------------------------------------------------------
# Small digits jobs that still reach >= 0.9 held-out accuracy in a couple of seconds.
# 12 micro-batches per round (not a power of two: the canonical tree has a ragged edge and
# 1..4 workers get different block layouts).
SPEC_SGD = {
    "name": "svc-digits-sgd",
    "model": [{"type": "linear", "out": 32}, {"type": "relu"}, {"type": "linear", "out": 10}],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "data": {"source": "builtin:digits"},
    "global_batch": 96,
    "micro_batch": 8,
    "epochs": 3,
    "seed": 3,
    "eval": {"holdout": 0.2},
}
# Dropout (per-micro-batch RNG) + accumulate_steps=2 + Adam; 5 micro-batches per round and
# an odd number of rounds (105), so the last accumulation group is a partial one.
SPEC_ADAM_DROPOUT = {
    "name": "svc-digits-adam-dropout-accum",
    "model": [
        {"type": "linear", "out": 64},
        {"type": "relu"},
        {"type": "dropout", "p": 0.2},
        {"type": "linear", "out": 10},
    ],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "adam", "lr": 0.01},
    "data": {"source": "builtin:digits"},
    "global_batch": 40,
    "micro_batch": 8,
    "accumulate_steps": 2,
    "epochs": 3,
    "seed": 11,
    "eval": {"holdout": 0.2},
}


def spec_with(base: dict, **changes) -> dict:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


@functools.cache
def _local(spec_json: str):
    state, metrics = train_local(parse_spec(json.loads(spec_json)))
    return state, metrics


def local_reference(spec: dict):
    """(state_dict, metrics) of `train_local(spec)` in this process (cached per spec)."""
    return _local(json.dumps(spec, sort_keys=True))


def assert_bitwise_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: parameter names {sorted(got)} != {sorted(want)}"
    bad = []
    for name in sorted(want):
        g, w = np.asarray(got[name]), np.asarray(want[name])
        if g.dtype != w.dtype or g.shape != w.shape or not np.array_equal(g, w):
            diff = (
                float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
                if g.shape == w.shape
                else "shape differs"
            )
            bad.append(
                f"{name}: {g.dtype}{list(g.shape)} vs {w.dtype}{list(w.shape)}, max |diff| {diff}"
            )
    assert not bad, f"{what}: not bitwise equal:\n  " + "\n  ".join(bad)
    assert weights_digest(got) == weights_digest(want), f"{what}: sha256 digests differ"


# --- polling ---------------------------------------------------------------------------------
def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate()` until it returns something truthy (returned) or time runs out."""
    return _wait_for(predicate, what, timeout, interval, retry=RETRY)


# --- clusters --------------------------------------------------------------------------------
def _stop_procs(procs, grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def stop_cluster(cluster: LocalCluster, grace: float = 5.0) -> None:
    """Workers first (their BYE still reaches the coordinator), then the aggregators (the
    hierarchical pass), then the coordinator."""
    _stop_procs(list(cluster.workers), grace)
    _stop_procs([p for p in (*cluster.aggregators, cluster.root) if p is not None], grace)
    _stop_procs([cluster.coordinator] if cluster.coordinator is not None else [], grace)


@pytest.fixture
def make_cluster(request):
    """make_cluster(workers=N, **LocalCluster kwargs) -> a started LocalCluster with N live
    workers; stopped (and its temp dir removed unless the test failed) at teardown."""
    clusters: list[LocalCluster] = []

    def make(workers=2, **kw):
        # SHARDGRAD_TEST_AGGREGATORS=k: the same tests with the hierarchical path on
        kw.setdefault("aggregators", int(os.environ.get("SHARDGRAD_TEST_AGGREGATORS", "0")))
        cluster = LocalCluster(workers=workers, **kw)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield make
    failed = getattr(request.node, "sg_failed", False)  # (tests/conftest.py)
    for cluster in clusters:
        stop_cluster(cluster)
        if failed:
            print(f"\n--- cluster logs kept in {cluster.log_dir}\n{cluster.log_tails()}")
        else:
            shutil.rmtree(cluster.tmp, ignore_errors=True)


def grow_to(cluster: LocalCluster, n: int, timeout: float = 30.0) -> None:
    """Add worker processes until `n` are running and live."""
    while len(cluster.workers) < n:
        cluster.add_worker()
    cluster.wait_workers(n, timeout=timeout)


def run_job(client, spec, timeout: float = 60.0):
    """Submit, wait until done (raises on failure / timeout); (job id, status, weights)."""
    job = client.submit(spec)
    status = client.wait(job, timeout=timeout, poll=0.05)
    assert status["state"] == "done", status
    return job, status, client.fetch(job)


# --- the helpers, for the test modules ----------------------------------------------------------
# Several test folders have a plain conftest.py, so `from conftest import ...` would be
# ambiguous; tests get the helpers through this fixture instead.
@pytest.fixture(scope="session")
def svc():
    import types

    return types.SimpleNamespace(
        SPEC_SGD=SPEC_SGD,
        SPEC_ADAM_DROPOUT=SPEC_ADAM_DROPOUT,
        spec_with=spec_with,
        local_reference=local_reference,
        assert_bitwise_equal=assert_bitwise_equal,
        wait_for=wait_for,
        grow_to=grow_to,
        run_job=run_job,
        stop_cluster=stop_cluster,
    )
