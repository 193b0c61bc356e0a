"""Helpers for the fault tests: real processes, real signals, conditions with deadlines."""

import functools
import os
import signal

from shardgrad.cluster import wait_for  # noqa: F401  (re-exported for the tests)
from shardgrad.jobspec import parse_spec
from shardgrad.training import train_local, weights_digest

FAULT_SPEC = {
    "name": "faults",
    "model": [
        {"type": "linear", "out": 32},
        {"type": "relu"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 10},
    ],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "adam", "lr": 0.01},
    "data": {"source": "builtin:digits"},
    "global_batch": 64,
    "micro_batch": 4,
    "accumulate_steps": 2,
    "rounds": 40,
    "seed": 3,
    "min_workers": 1,
    "checkpoint_every": 4,
    "eval": {"holdout": 0.2},
}
HB = 0.2  # heartbeat interval in the fault tests: dead after 5 * 0.2 = 1 s
DELAY = "0.006"  # seconds per micro-batch: a round takes ~0.1 s, long enough to hit mid-way


def spec(**overrides):
    return parse_spec({**FAULT_SPEC, **overrides})


@functools.lru_cache
def _reference(spec_json):
    import json

    state, _ = train_local(parse_spec(json.loads(spec_json)))
    return weights_digest(state)


def reference_digest(job_spec):
    import json

    return _reference(json.dumps(job_spec.to_dict(), sort_keys=True))


def log_has(cluster, name, text):
    return text in cluster.log(name)


def upstream_of(cluster, i):
    """The log name of the process that speaks to the coordinator for worker i (0-based):
    the worker itself, or its aggregator when the hierarchical path is on."""
    n = cluster.n_aggregators
    return f"aggregator-{i % n}" if n else f"worker-{i + 1}"


def deaths_seen(cluster, client):
    """Has a worker's death been noticed (by the coordinator, or by an aggregator)?"""
    if cluster.n_aggregators:
        names = [f"aggregator-{i}" for i in range(cluster.n_aggregators)]
        return any(log_has(cluster, n, "is gone") for n in names)
    return any(w["state"] == "dead" for w in client.status()["workers"])


def job_status(client, job):
    return client.status(job)["job"]


def round_of(client, job):
    return job_status(client, job)["round"]


def kill(proc, sig=signal.SIGKILL):
    os.kill(proc.pid, sig)
    if sig in (signal.SIGKILL, signal.SIGTERM):
        proc.wait(30)
