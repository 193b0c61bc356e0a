"""Placement: a job whose whole round computes faster than a round trip to a worker runs on
the coordinator itself (coordinator/placement.py), with the same bits as on the workers and
as `train --local`; `placement = "workers"` in the spec sends it to the workers anyway.

The other tests' clusters send every job to the workers (tests/conftest.py). These start
theirs with a threshold of 60 s, so the choice does not depend on how busy this machine is.
"""

import signal

import pytest

from shardgrad.client import ClientError
from shardgrad.coordinator.placement import choose
from shardgrad.jobspec import parse_spec
from shardgrad.training import JobRuntime, weights_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HERE = {"SHARDGRAD_INLINE_BELOW": "60"}  # every "auto" job counts as small


def _long(svc, epochs):
    """SPEC_SGD for longer: ~14 rounds an epoch, a fraction of a millisecond each here."""
    return svc.spec_with(svc.SPEC_SGD, epochs=epochs, name=f"svc-digits-sgd-{epochs}")


def _run_here(c, svc, spec, what):
    """Run `spec`, which must be placed on the coordinator, and check its weights against
    train_local's bit for bit; (its final status, train_local's metrics)."""
    ref_state, ref_metrics = svc.local_reference(spec)
    _, status, weights = svc.run_job(c, spec)
    assert status["placement"] == "coordinator", status
    svc.assert_bitwise_equal(weights, ref_state, f"{what} vs train_local")
    return status, ref_metrics


def test_a_small_job_runs_here_with_the_bits_of_the_workers_and_of_local(make_cluster, svc):
    ref_state, _ = svc.local_reference(svc.SPEC_SGD)
    cluster = make_cluster(workers=2, env=HERE)
    with cluster.client() as c:
        here, ref_metrics = _run_here(c, svc, svc.SPEC_SGD, "placed on the coordinator")
        metrics = c.metrics(here["id"])
        assert len(metrics) == len(ref_metrics) and {m["workers"] for m in metrics} == {0}
        assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
        assert all(w["blocks_done"] == 0 for w in c.status()["workers"]), c.status()

        pinned = svc.spec_with(svc.SPEC_SGD, placement="workers")
        _, there, weights = svc.run_job(c, pinned)
        assert there["placement"] == "workers", there
        svc.assert_bitwise_equal(weights, ref_state, "pinned to workers vs train_local")
        assert {m["workers"] for m in c.metrics(there["id"])} == {2}
        assert here["digest"] == there["digest"] == weights_digest(ref_state)


def _stop_mid_job(cluster, c, svc, job, sig):
    """Wait for a checkpoint of `job` running on the coordinator, then signal it."""
    running = svc.wait_for(
        lambda: (
            (s := c.status(job)["job"])["state"] == "running"
            and (s["checkpoint_round"] or 0) >= 20
            and s
        ),
        60,
        "a checkpoint of the job running on the coordinator",
    )
    assert running["placement"] == "coordinator", running
    cluster.coordinator.send_signal(sig)
    cluster.coordinator.wait(30)


def _resumed_at(cluster) -> int:
    with open(f"{cluster.log_dir}/coordinator.log") as f:
        resumed = [line for line in f if "resumes from its checkpoint" in line]
    assert resumed, "the restarted coordinator did not resume from a checkpoint"
    return int(resumed[-1].rsplit("round ", 1)[1])


@pytest.mark.parametrize(
    "sig, then",
    [(signal.SIGKILL, "workers"), (signal.SIGTERM, "coordinator")],
    ids=["kill9-then-on-workers", "sigterm-then-here-again"],
)
def test_a_job_stopped_here_resumes_bitwise_wherever_it_is_placed_next(
    make_cluster, svc, sig, then
):
    """The coordinator dies (kill -9) or stops (SIGTERM, it checkpoints) mid-job and comes
    back; the job resumes from its checkpoint on the workers (the restarted coordinator
    places every job there) or here again, and ends with the bits of train_local."""
    spec = svc.spec_with(_long(svc, 150), checkpoint_every=10)  # ~2,100 rounds
    ref_state, _ = svc.local_reference(spec)
    cluster = make_cluster(workers=2, env=HERE)
    with cluster.client() as c:
        job = c.submit(spec)
        _stop_mid_job(cluster, c, svc, job, sig)
        below = "0" if then == "workers" else HERE["SHARDGRAD_INLINE_BELOW"]
        cluster.start_coordinator(env={"SHARDGRAD_INLINE_BELOW": below})
        status = c.wait(job, timeout=120, poll=0.05)
        assert status["state"] == "done" and status["placement"] == then, status
        svc.assert_bitwise_equal(c.fetch(job), ref_state, f"resumed on the {then}")
        if then == "workers":
            assert any(w["blocks_done"] for w in c.status()["workers"]), c.status()
    assert 20 <= _resumed_at(cluster) < status["total_rounds"]


def test_with_dropout_adam_and_accumulation_and_no_workers_at_all(make_cluster, svc):
    """A job placed here needs no workers (min_workers counts only for the workers' jobs),
    and dropout's per-micro-batch masks, Adam and accumulate_steps = 2 give the bits of
    train_local."""
    cluster = make_cluster(workers=0, env=HERE)
    with cluster.client() as c:
        status, ref_metrics = _run_here(c, svc, svc.SPEC_ADAM_DROPOUT, "dropout + Adam + accum")
        assert status["eval"]["accuracy"] == ref_metrics[-1]["accuracy"]


def test_a_job_that_diverges_here_fails_naming_the_round(make_cluster, svc):
    spec = svc.spec_with(svc.SPEC_SGD, optimizer={"type": "sgd", "lr": 1e30})
    cluster = make_cluster(workers=1, env=HERE)
    with cluster.client() as c:
        job = c.submit(spec)  # round 0 is finite: the dry run cannot see it coming
        with pytest.raises(ClientError, match=r"round 1: the gradient has NaN/Inf"):
            c.wait(job, timeout=60, poll=0.05)
        # the coordinator goes on with the next job
        _, status, _ = svc.run_job(c, svc.SPEC_SGD)
        assert status["placement"] == "coordinator"


def test_cancel_a_job_running_here_and_the_queue_goes_on(make_cluster, svc):
    cluster = make_cluster(workers=1, env=HERE)
    with cluster.client() as c:
        job = c.submit(_long(svc, 5000))  # ~70,000 rounds: far longer than this test
        svc.wait_for(lambda: c.status(job)["job"]["round"] >= 10, 60, "rounds computed here")
        assert c.cancel(job)["state"] == "cancelled"
        assert c.status(job)["job"]["state"] == "cancelled"
        ref_state, _ = svc.local_reference(svc.SPEC_SGD)
        _, status, weights = svc.run_job(c, svc.SPEC_SGD)
        svc.assert_bitwise_equal(weights, ref_state, "the job after a cancelled one")


def test_the_choice(svc):
    """The rule on a real runtime: below the threshold here, at or above it to workers;
    the spec's `placement = "workers"` and a threshold of 0 always send it to workers."""
    rt = JobRuntime(parse_spec(svc.SPEC_SGD))
    assert choose(rt, 60.0)[0] == "coordinator"
    assert choose(rt, 1e-9)[0] == "workers"  # no round computes in a nanosecond
    assert choose(rt, 0.0) == (
        "workers",
        "the coordinator runs every job on workers (--inline-below 0)",
    )
    pinned = JobRuntime(parse_spec(svc.spec_with(svc.SPEC_SGD, placement="workers")))
    assert choose(pinned, 60.0) == ("workers", "the spec says placement = 'workers'")
    # a dry run slower than the budget rules a job out without timing a round
    assert choose(rt, 0.002, dry_run_s=1.0) == ("workers", "a micro-batch takes 1000.0 ms or more")


@pytest.fixture
def coordinator_here(tmp_path):
    """A Coordinator in this process that places every job on itself (no workers needed);
    the test drives its loop with tick(). Shut down at teardown."""
    from shardgrad.coordinator.server import Config, Coordinator

    made = []

    def make():
        made.append(Coordinator(
            f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
            config=Config(inline_below_s=60.0),
        ))  # fmt: skip
        return made[-1]

    yield make
    for coord in made:
        coord.shutdown()


def test_a_failure_in_a_step_here_fails_the_job_not_the_coordinator(
    coordinator_here, svc, monkeypatch
):
    """In process: whatever raises while the coordinator computes a round (here, the
    step) ends that job `failed` with the reason; the coordinator's loop goes on."""
    from shardgrad.engine import RoundEngine

    real_step = RoundEngine.step

    def step(self, total):
        if self.next_round == 3:
            raise RuntimeError("boom")
        return real_step(self, total)

    monkeypatch.setattr(RoundEngine, "step", step)
    coord = coordinator_here()
    spec = parse_spec(svc.SPEC_SGD)
    job_id = coord.store.add_job(spec.name, spec.to_dict(), None, 42)
    coord.tick()  # starts it here (no workers needed), then each tick runs a slice
    assert coord.job is not None and coord.job.placement == "coordinator"
    while coord.job is not None:
        coord.tick()
    row = coord.store.job(job_id)
    assert (row["state"], row["error"]) == ("failed", "round 3: RuntimeError: boom"), row
    assert row["placement"] == "coordinator"


@pytest.mark.parametrize("where", ["hand_in_early", "start_next_job"])
def test_a_failure_in_the_loops_tick_fails_the_job_not_the_coordinator(
    coordinator_here, svc, monkeypatch, where
):
    """In process: a bug that raises from the coordinator's `tick` (starting a job, or once
    it runs) fails that job with the reason instead of stopping the loop or raising again on
    every pass; the next job in the queue still runs. (Both jobs run here: no workers.)"""
    from shardgrad.coordinator.server import Coordinator

    real = getattr(Coordinator, where)
    calls = []

    def broken(self, *a, **kw):
        if not calls:  # only the first job's
            calls.append(1)
            raise RuntimeError("boom")
        return real(self, *a, **kw)

    monkeypatch.setattr(Coordinator, where, broken)
    coord = coordinator_here()
    spec = parse_spec(svc.SPEC_SGD)
    first = coord.store.add_job(spec.name, spec.to_dict(), None, 42)
    coord.tick()
    row = coord.store.job(first)
    assert row["state"] == "failed" and "RuntimeError: boom" in row["error"], row
    assert coord.job is None and coord.counters["internal_error"] == 1
    second = coord.store.add_job(spec.name, spec.to_dict(), None, 42)
    coord.tick()
    assert coord.job is not None and coord.job.id == second
