"""The coordinator dies (kill -9, a crash while writing a checkpoint, SIGTERM) and comes back
on the same state directory: nothing submitted is lost, the job resumes from its checkpoint
and ends with bitwise the same weights."""

import signal
import time

import numpy as np
import pytest
from fault_helpers import job_status, kill, reference_digest, round_of, spec, wait_for

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
