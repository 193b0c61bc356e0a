"""Two-way liveness: a worker notices a silent coordinator (SIGSTOP), says so in its log,
and registers again when it answers (SIGCONT); the job ends bitwise right."""

import os
import signal

import pytest
from fault_helpers import reference_digest, round_of, spec, wait_for

from shardgrad.training import weights_digest

pytestmark = pytest.mark.slow


def log_has(cluster, name, text):
    with open(os.path.join(cluster.log_dir, f"{name}.log"), errors="replace") as f:
        return text in f.read()


def test_worker_notices_a_stopped_coordinator_and_registers_again(make_cluster):
    job_spec = spec(rounds=40)
    cl = make_cluster(1).start()
    coord = cl.coordinator
    stopped = False
    try:
        with cl.client() as c:
            job = c.submit(job_spec)
            wait_for(lambda: round_of(c, job) >= 3, "round 3")
            os.kill(coord.pid, signal.SIGSTOP)
            stopped = True
            wait_for(lambda: log_has(cl, "worker-1", "coordinator silent"), "the worker to notice")
            os.kill(coord.pid, signal.SIGCONT)
            stopped = False
            wait_for(lambda: log_has(cl, "worker-1", "registering anew"), "re-registration")
            c.wait(job, timeout=120)
            assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
    finally:
        if stopped:
            os.kill(coord.pid, signal.SIGCONT)
