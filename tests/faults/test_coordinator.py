"""The coordinator dies (kill -9, a crash while writing a checkpoint, SIGTERM) and comes back
on the same state directory: nothing submitted is lost, the job resumes from its checkpoint
and ends with bitwise the same weights."""

import os
import signal
import time

import numpy as np
import pytest
from fault_helpers import (
    DELAY,
    job_status,
    kill,
    log_has,
    reference_digest,
    round_of,
    spec,
    upstream_of,
    wait_for,
)

from shardgrad.client import ClientError
from shardgrad.coordinator.store import atomic_save, load
from shardgrad.training import weights_digest

pytestmark = pytest.mark.slow


def test_kill9_coordinator_resumes_from_checkpoint(make_cluster):
    job_spec = spec(rounds=48, checkpoint_every=4)
    queued_spec = spec(rounds=6, seed=11)
    cl = make_cluster(2).start()
    with cl.client() as c:
        job = c.submit(job_spec)
        wait_for(lambda: (job_status(c, job)["checkpoint_round"] or 0) >= 8, "a checkpoint")
        second = c.submit(queued_spec)  # acknowledged => committed: must survive the kill
        time.sleep(0.03)  # somewhere inside a round
        kill(cl.coordinator)
        t0 = time.monotonic()
        cl.start_coordinator()  # same state dir, same addresses; workers reconnect alone
        assert job_status(c, second)["state"] == "queued"
        resumed_at = job_status(c, job)["checkpoint_round"]
        wait_for(lambda: round_of(c, job) > resumed_at, "progress after the restart", 30)
        print(f"resumed training {time.monotonic() - t0:.2f} s after the restart")
        c.wait(job, timeout=120)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
        c.wait(second, timeout=120)
        assert weights_digest(c.fetch(second)) == reference_digest(queued_spec)
    # Silent for `liveness` beats, or answering with a new boot id if the restart was faster:
    # either way each worker (or aggregator) says READY again.
    for i in range(2):
        assert log_has(cl, upstream_of(cl, i), "registering anew"), f"worker {i + 1}"


def test_crash_while_writing_checkpoint_keeps_the_previous_one(make_cluster):
    """The coordinator is SIGKILLed between writing its 3rd checkpoint and renaming it
    (fault injection): the restarted one loads the 2nd and still ends bitwise equal."""
    job_spec = spec(rounds=40, checkpoint_every=4)
    cl = make_cluster(2)
    cl.start_coordinator(env={"SHARDGRAD_FAULT_KILL_AT_WRITE": "3"})
    for _ in range(2):
        cl.add_worker()
    cl.wait_workers(2)
    with cl.client() as c:
        job = c.submit(job_spec)
        cl.coordinator.wait(60)
        assert cl.coordinator.returncode == -signal.SIGKILL
        cl.start_coordinator()
        assert job_status(c, job)["checkpoint_round"] == 8  # the 2nd one (rounds 4, 8, [12])
        c.wait(job, timeout=120)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)


def test_sigterm_coordinator_checkpoints_and_exits(make_cluster):
    job_spec = spec(rounds=40, checkpoint_every=1000)  # only the shutdown checkpoint
    cl = make_cluster(2).start()
    with cl.client() as c:
        job = c.submit(job_spec)
        wait_for(lambda: round_of(c, job) >= 6, "round 6")
        kill(cl.coordinator, signal.SIGTERM)
        assert cl.coordinator.returncode == 0
        cl.start_coordinator()
        assert job_status(c, job)["checkpoint_round"] >= 6
        c.wait(job, timeout=120)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)


def test_atomic_save_failure_between_write_and_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.npz")
    atomic_save(path, {"w": np.arange(3.0)}, {"round": 1})

    def crash(*_):
        raise OSError("injected crash before rename")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError):
        atomic_save(path, {"w": np.arange(5.0)}, {"round": 2})
    arrays, meta = load(path)
    assert meta == {"round": 1} and np.array_equal(arrays["w"], np.arange(3.0))


def _break_disk(cl, c, job):
    """The state directory refuses job files from now on, as a full disk would: its `jobs`
    directory is moved aside and a plain file takes its name (root ignores permissions).
    Done while the worker is stopped and the job cannot end on what it has computed ahead
    (a lease runs at most 8 rounds ahead), so the job's end always meets the broken disk."""
    for w in cl.workers:
        w.send_signal(signal.SIGSTOP)
    try:
        now = job_status(c, job)
        assert now["state"] == "running" and now["round"] + 10 < now["total_rounds"], now
        jobs = os.path.join(cl.state_dir, "jobs")
        os.rename(jobs, jobs + ".aside")
        with open(jobs, "w") as f:
            f.write("not a directory\n")
    finally:
        for w in cl.workers:
            w.send_signal(signal.SIGCONT)


def _mend_disk(cl):
    jobs = os.path.join(cl.state_dir, "jobs")
    os.unlink(jobs)
    os.rename(jobs + ".aside", jobs)


def _write_errors(c):
    return c.status()["counters"].get("write_errors", 0)


def test_a_result_the_disk_refuses_is_retried_not_lost(make_cluster):
    """Checkpoints and then the result cannot be written: the failed checkpoints are counted
    and the job goes on; its end waits (no round past it, the reason in its status) and the
    write is retried until the disk is mended; then it is done, bitwise right."""
    job_spec = spec(rounds=40, checkpoint_every=4)
    cl = make_cluster(1).start()
    with cl.client() as c:
        job = c.submit(job_spec)
        wait_for(lambda: (job_status(c, job)["checkpoint_round"] or 0) >= 4, "a checkpoint")
        _break_disk(cl, c, job)
        wait_for(lambda: "could not be written" in (job_status(c, job)["error"] or ""), "the end")
        failures = _write_errors(c)
        wait_for(lambda: _write_errors(c) > failures, "a retry")
        now = job_status(c, job)
        assert now["state"] == "running" and now["round"] == now["total_rounds"], now
        assert "internal_error" not in c.status()["counters"]
        _mend_disk(cl)
        assert c.wait(job, timeout=60)["state"] == "done"
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
        assert cl.coordinator.poll() is None


def test_a_result_the_disk_keeps_refusing_fails_the_job_and_the_queue_goes_on(make_cluster):
    job_spec, after = spec(rounds=24), spec(rounds=6, seed=11)
    env = {"SHARDGRAD_FAULT_DELAY": DELAY, "SHARDGRAD_WRITE_RETRY": "1"}
    cl = make_cluster(1, env=env).start()
    with cl.client() as c:
        job = c.submit(job_spec)
        wait_for(lambda: round_of(c, job) >= 2, "round 2")
        _break_disk(cl, c, job)
        with pytest.raises(ClientError, match="could not be written.*fix the state directory"):
            c.wait(job, timeout=60)
        ended = job_status(c, job)
        assert ended["round"] <= ended["total_rounds"], ended
        assert "internal_error" not in c.status()["counters"]
        _mend_disk(cl)
        second = c.submit(after)
        c.wait(second, timeout=60)
        assert weights_digest(c.fetch(second)) == reference_digest(after)
