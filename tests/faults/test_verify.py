"""Verified gradients: a second worker recomputes a sample of blocks (the coordinator
draws them), a mismatch is decided by the coordinator's own computation, the liar is
quarantined and the job rolls back past what it said unchecked. Whatever the lying worker
does, the final weights equal train --local's bit for bit."""

import pytest
from fault_helpers import log_has, reference_digest, spec

from shardgrad.training import weights_digest

pytestmark = pytest.mark.slow


def run_with_a_liar(make_cluster, job_spec, corrupt, after=0):
    cl = make_cluster(0)
    cl.start_coordinator()
    liar = cl.add_worker(
        env={"SHARDGRAD_FAULT_CORRUPT": corrupt, "SHARDGRAD_FAULT_CORRUPT_AFTER": str(after)}
    )
    cl.add_worker()
    cl.add_worker()
    cl.wait_workers(3)
    with cl.client() as c:
        job = c.submit(job_spec)
        c.wait(job, timeout=180)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
        status = c.status()
    assert liar.poll() is None, "a quarantined worker is left running, just never used"
    if cl.n_aggregators:  # caught below by its aggregator, or its aggregator caught here
        caught_below = log_has(cl, "aggregator-0", "differed from the aggregator's")
        assert caught_below or status["counters"].get("quarantined") == 1, status
        return {**status["counters"], "caught_below": caught_below}
    (caught,) = [w for w in status["workers"] if w["state"] == "quarantined"]
    assert caught["pid"] == liar.pid, status["workers"]
    assert "differed from the coordinator's recomputation" in caught["reason"]
    assert status["counters"]["quarantined"] == 1
    return status["counters"]


def test_a_worker_that_corrupts_every_block(make_cluster):
    counters = run_with_a_liar(make_cluster, spec(rounds=24, verify=0.5), "1.0")
    assert counters.get("verify_mismatches", 0) >= 1 or counters.get("caught_below")


def test_a_worker_that_corrupts_one_block_in_ten(make_cluster):
    # every block checked: caught at its first lie, whenever that comes
    run_with_a_liar(make_cluster, spec(rounds=24, verify=1.0), "0.1")


def test_a_worker_that_turns_after_round_20_is_rolled_back(make_cluster):
    """Honest for 20 rounds, then every block is noisy: the job rolls back to before the
    liar's first unchecked contribution and replays without it."""
    counters = run_with_a_liar(make_cluster, spec(rounds=32, verify=0.5), "1.0", after=20)
    assert counters["rollbacks"] >= 1


@pytest.mark.parametrize("verify", [0.0, 1.0])
def test_verify_off_checks_nothing_and_1_checks_every_block(make_cluster, verify):
    job_spec = spec(rounds=8, verify=verify)
    cl = make_cluster(2, liveness=25).start()  # both workers in every round, even under load
    with cl.client() as c:
        job = c.submit(job_spec)
        c.wait(job, timeout=120)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
        rows = c.metrics(job)
    assert [r["checked"] for r in rows] == [r["blocks"] if verify else 0 for r in rows]
