"""Two-way liveness: a worker notices a silent coordinator (SIGSTOP), says so in its log,
and registers again when it answers (SIGCONT); the job ends bitwise right."""

import os
import signal

import pytest
from fault_helpers import log_has, reference_digest, round_of, spec, upstream_of, wait_for

from shardgrad.training import weights_digest

pytestmark = pytest.mark.slow


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
            who = upstream_of(cl, 0)  # the worker, or its aggregator
            wait_for(lambda: log_has(cl, who, "coordinator silent"), "the worker to notice")
            os.kill(coord.pid, signal.SIGCONT)
            stopped = False
            wait_for(lambda: log_has(cl, who, "registering anew"), "re-registration")
            c.wait(job, timeout=120)
            assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
    finally:
        if stopped:
            os.kill(coord.pid, signal.SIGCONT)
