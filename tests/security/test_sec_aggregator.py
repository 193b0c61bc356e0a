"""CURVE behind an aggregator: it is a worker upstream (its key in the coordinator's
worker allow-list) and a CURVE server for its own workers (with the same key pair and the
same allow-list): strangers cannot join it, and a revoked worker is cut on its open
connection, as at the coordinator."""

import os

import pytest
from sec_helpers import SLOW, expected_digest, spec, wait_for

from shardgrad.security import generate_keys

pytestmark = pytest.mark.slow


def capacity(cl):
    with cl.client() as c:
        return cl.capacity(c)


def test_a_job_behind_an_aggregator_with_keys(keys, make_cluster):
    cl = make_cluster(2, keys=str(keys), aggregators=1)
    with cl.client() as c:
        (agg,) = c.status()["workers"]
        assert agg["role"] == "aggregator" and agg["workers"] == 2
        final = c.wait(c.submit(spec(rounds=10)), timeout=120)
        assert final["digest"] == expected_digest(rounds=10)


def test_strangers_cannot_join_an_aggregator(keys, tmp_path, make_cluster):
    cl = make_cluster(1, keys=str(keys), aggregators=1)
    other = tmp_path / "other-keys"
    list(generate_keys(other, workers=1, clients=1, admins=1))
    # a worker whose key is not in our allow-list, and one that does not know the
    # aggregator's public key (it takes the coordinator's for it)
    stranger = cl._spawn(
        "stranger",
        ["worker", "--coordinator-workers", cl.aggregator_address(0), "--keys", str(other),
         "--key-name", "worker", "--server-key", os.path.join(keys, "workers", "worker.key"),
         "--heartbeat-interval", "0.2"],
    )  # fmt: skip
    wrong_server = cl._spawn(
        "wrong-server",
        ["worker", "--coordinator-workers", cl.aggregator_address(0), "--keys", str(keys),
         "--key-name", "worker-2", "--heartbeat-interval", "0.2"],
    )  # fmt: skip
    cl.workers += [stranger, wrong_server]
    with cl.client() as c:
        final = c.wait(c.submit(spec(rounds=20)), timeout=120)
        assert final["digest"] == expected_digest(rounds=20)
    assert capacity(cl) == 1, "neither got in"
    assert stranger.poll() is None and wrong_server.poll() is None


def test_revoked_worker_behind_an_aggregator_is_cut(keys, make_cluster):
    cl = make_cluster(1, keys=str(keys), aggregators=1, env=SLOW)
    cl.add_worker(aggregator=0, key_name="worker-2", env=SLOW)
    cl.wait_workers(2)
    with cl.client() as c:
        job = c.submit(spec(rounds=80))
        wait_for(lambda: c.status(job)["job"]["round"] >= 3, "a few rounds")
        os.remove(keys / "workers" / "worker-2.key")
        wait_for(lambda: cl.capacity(c) == 1, "the revoked worker to be dropped", timeout=10)
        final = c.wait(job, timeout=120)
        assert final["digest"] == expected_digest(rounds=80)
    with open(os.path.join(cl.log_dir, "aggregator-0.log")) as f:
        assert "its key is not (or no longer) allowed" in f.read()
