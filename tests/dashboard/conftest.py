"""Fixtures for the dashboard / HTTP tests (tests/dashboard/).

Clusters are real `LocalCluster`s (ipc:// sockets in private temp dirs) with the
coordinator's HTTP side on 127.0.0.1 port 0, so any number run side by side. Each is
stopped at the end of its test, workers first, and anything left is SIGKILLed.
"""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in the worker processes

import pytest  # noqa: E402

from shardgrad.cluster import RETRY, LocalCluster  # noqa: E402
from shardgrad.cluster import wait_for as _wait_for  # noqa: E402

# Small digits job: 4 micro-batches a round, 35 rounds an epoch.
SPEC = {
    "name": "dash-digits",
    "model": [{"type": "linear", "out": 32}, {"type": "relu"}, {"type": "linear", "out": 10}],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "data": {"source": "builtin:digits"},
    "global_batch": 32,
    "micro_batch": 8,
    "epochs": 2,
    "seed": 5,
    "min_workers": 1,
    "eval": {"holdout": 0.2},
}
# The same job, long enough to watch (the test cancels it once it has seen what it needs).
LONG_SPEC = {**SPEC, "name": "dash-digits-long", "epochs": 400}


def wait_for(predicate, what, timeout=60.0, interval=0.05):
    return _wait_for(predicate, what, timeout, interval, retry=RETRY)


def http_get(url, timeout=10.0):
    """(status, content type, body bytes); HTTP errors are answers here, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def http_json(url, timeout=10.0):
    status, _, body = http_get(url, timeout)
    assert status == 200, f"GET {url}: HTTP {status}: {body[:300]!r}"
    return json.loads(body)


def _stop(procs, grace=5.0):
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


@pytest.fixture
def dash_cluster(request):
    """dash_cluster(workers=N, **LocalCluster kwargs) -> a started LocalCluster whose
    coordinator serves HTTP on 127.0.0.1:0 (its URL: cluster.http_url)."""
    yield from _clusters(request.node)


@pytest.fixture(scope="module")
def module_cluster():
    """As dash_cluster, shared by the tests of one module (read-only ones only)."""
    yield from _clusters()


def _clusters(test=None):
    clusters = []

    def make(workers=2, **kw):
        kw.setdefault("http", "127.0.0.1:0")
        cluster = LocalCluster(workers=workers, **kw)
        cluster.cleanup = False  # removed below, after the logs could be shown
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield make
    failed = getattr(test, "sg_failed", False)  # (tests/conftest.py)
    for cluster in clusters:
        _stop(list(cluster.workers))
        _stop([cluster.coordinator] if cluster.coordinator is not None else [])
        if failed:
            print(f"\n--- cluster logs kept in {cluster.log_dir}\n{cluster.log_tails()}")
        else:
            shutil.rmtree(cluster.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def dash():
    import types

    return types.SimpleNamespace(
        SPEC=SPEC,
        LONG_SPEC=LONG_SPEC,
        wait_for=wait_for,
        http_get=http_get,
        http_json=http_json,
    )
