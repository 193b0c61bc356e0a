"""A bad job fails alone: job code that raises on a worker is reported (FAULT), the worker
stays alive, the block is recomputed once elsewhere, and a second failure ends the job
`failed` naming the round, the micro-batch and the exception; the next job runs."""

import os

import numpy as np
import pytest
from fault_helpers import FAULT_SPEC, reference_digest, spec, wait_for

from shardgrad.client import ClientError
from shardgrad.training import weights_digest

pytestmark = pytest.mark.slow

DIGITS = {**FAULT_SPEC, "rounds": 12, "verify": 0.0}


def assert_alive(cluster):
    dead = [p.pid for p in [cluster.coordinator, *cluster.workers] if p.poll() is not None]
    assert not dead, f"processes exited: {dead}"


def wait_state(c, job, states, timeout=60):
    return wait_for(
        lambda: (s := c.status(job)["job"])["state"] in states and s, f"{job} {states}", timeout
    )


def test_job_whose_data_workers_cannot_load_fails_alone(make_cluster, tmp_path):
    """The coordinator can read file:data.npz (so submit accepts the job), the workers
    cannot (no data root): every worker reports the fault, the job fails with the reason,
    all workers stay up and the job queued behind it ends bitwise equal to train --local."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 64)).astype(np.float32)
    np.savez(root / "data.npz", X=X, y=(X[:, 0] > 0).astype(np.int64))
    cl = make_cluster(0)
    cl.start_coordinator(env={"SHARDGRAD_DATA_ROOT": str(root)})
    cl.add_worker()
    cl.add_worker()
    cl.wait_workers(2)
    good = spec(**DIGITS)
    with cl.client() as c:
        bad = c.submit({**DIGITS, "name": "unloadable", "data": {"source": "file:data.npz"}})
        after = c.submit(good)
        failed = wait_state(c, bad, ("failed",))
        assert "round 0" in failed["error"] and "micro-batch" in failed["error"], failed
        assert "data" in failed["error"] and "again after recomputing" in failed["error"]
        c.wait(after, timeout=120)
        assert weights_digest(c.fetch(after)) == reference_digest(good)
        assert c.status()["counters"]["job_faults"] >= 2
    assert_alive(cl)


def test_a_block_that_fails_on_one_worker_is_recomputed_on_another(make_cluster):
    """One worker's job code raises from round 3 on; the other's does not: each of its
    blocks is recomputed once elsewhere and the job ends bitwise right."""
    cl = make_cluster(0)
    cl.start_coordinator()
    cl.add_worker(env={"SHARDGRAD_FAULT_RAISE": "3"})
    cl.add_worker()
    cl.wait_workers(2)
    job_spec = spec(**DIGITS)
    with cl.client() as c:
        job = c.submit(job_spec)
        c.wait(job, timeout=120)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
        assert c.status()["counters"]["job_faults"] >= 1
    assert_alive(cl)


@pytest.mark.parametrize("workers", [1, 2])  # one worker: it runs ahead on a lease
def test_a_fault_on_every_worker_mid_job_fails_it_with_round_and_micro_batch(make_cluster, workers):
    env = {"SHARDGRAD_FAULT_RAISE": "5"}
    cl = make_cluster(workers, env=env).start()
    with cl.client() as c:
        job = c.submit(spec(**DIGITS))
        failed = wait_state(c, job, ("failed",))
        err = failed["error"]
        assert err.startswith("round 5, micro-batches ") or err.startswith("round 5, micro-batch")
        assert "RuntimeError: injected fault" in err and "again after recomputing" in err, err
        with pytest.raises(ClientError, match="failed"):
            c.wait(job, timeout=5)
    assert_alive(cl)


def test_submit_refuses_labels_the_model_cannot_output(make_cluster):
    """The original report: the digits job with `linear out=5` (labels 0-9). Refused at
    submit, synchronously, with the reason; nothing is queued."""
    cl = make_cluster(1).start()
    model = [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": 5}]
    with cl.client() as c:
        with pytest.raises(ClientError, match="class label 9 but the model has only 5 outputs"):
            c.submit({**DIGITS, "model": model})
        assert c.jobs() == []


def test_dry_run_refuses_what_fails_on_micro_batch_0():
    from shardgrad.training import DryRunError, JobRuntime

    rt = JobRuntime(spec(**DIGITS))

    def broken(x):
        raise FloatingPointError("layer 2 blew up")

    rt.model.forward = broken
    with pytest.raises(DryRunError, match="micro-batch 0 of round 0 raised FloatingPointError"):
        rt.dry_run(5.0)


def test_dry_run_is_bounded_in_time():
    import time

    from shardgrad.training import JobRuntime

    rt = JobRuntime(spec(**DIGITS))
    rt.model.forward = lambda x: time.sleep(60)  # a dry run that would take a minute
    t0 = time.monotonic()
    rt.dry_run(0.2)  # gives up quietly: a slow model is not an error
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("path", ["/dev/zero", "fifo", "huge"])
def test_spec_reading_is_bounded(path, tmp_path):
    """parse_spec reads at most max_spec_bytes + 1 bytes from any path, under an address
    space limit that an unbounded read would blow through."""
    import subprocess
    import sys

    if path == "huge":
        path = str(tmp_path / "huge.toml")
        with open(path, "wb") as f:
            f.truncate(8 << 30)  # sparse: 8 GiB that take no disk
    elif path == "fifo":
        path = str(tmp_path / "spec.fifo")
        os.mkfifo(path)
    code = f"""
import resource, sys, threading
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from shardgrad.jobspec import SpecError, parse_spec
path = {path!r}
if path.endswith(".fifo"):  # an endless writer on the other end
    def feed():
        with open(path, "wb") as f:
            while True:
                f.write(b"x" * 65536)
    threading.Thread(target=feed, daemon=True).start()
try:
    parse_spec(path)
except SpecError as e:
    print(e)
    sys.exit(0)
sys.exit(3)
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "larger than 1048576 bytes" in out.stdout
