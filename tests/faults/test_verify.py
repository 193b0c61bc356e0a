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


def test_a_sum_of_an_abandoned_timeline_is_late_at_the_coordinator(tmp_path):
    """In process. A rollback (a caught liar) bumps the job's gen, and the new timeline
    comes back to round 5 with block (0, 8) held by A. A GRADS A computed for round 5 of
    the old timeline, queued in its socket across a partition, arrives now: it was computed
    on weights that stood on the liar's word, so it is late, and so is one for a
    coordinator life since restarted (another boot id). A's sum of this timeline is
    taken, as is one from a worker that echoes no timeline (an older worker)."""
    import types

    from shardgrad import wire
    from shardgrad.coordinator.rounds import Round
    from shardgrad.coordinator.server import Config, Coordinator

    coord = Coordinator(f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
                        config=Config(heartbeat_interval=60))  # fmt: skip
    try:
        coord.job = types.SimpleNamespace(id="j", gen=1, leases={}, lease=None)
        coord.job.round = Round(5, 16, ["A", "B"], per_worker=1)
        assert coord.job.round.assignment["A"] == [(0, 8)]

        def grads(**timeline):
            fields = {"job": "j", "round": 5, "block": [0, 8], **timeline}
            return wire.Message(wire.GRADS, fields, {}, envelope=(b"A",))

        for gen, boot in ((0, coord.boot), (1, "0badb007")):
            assert coord._block_of(grads(gen=gen, boot=boot), "A") is None
        assert coord.counters["late_grads"] == 2
        assert coord._block_of(grads(gen=1, boot=coord.boot), "A") == (0, 8)
        assert coord._block_of(grads(), "A") == (0, 8)
        assert coord.counters["late_grads"] == 2
    finally:
        coord.job = None
        coord.shutdown()
