"""A coordinator killed (kill -9) in the middle of a job with an lr schedule, gradient
clipping and BatchNorm resumes from its checkpoint on the same schedule: the final weights
(and running statistics) are bitwise those of train_local, and the lr of every step after
the restart is the schedule's."""

import time

import pytest
from fault_helpers import job_status, kill, reference_digest, round_of, spec, wait_for

from shardgrad.jobspec import parse_spec
from shardgrad.training import train_local, weights_digest

pytestmark = pytest.mark.slow

SCHEDULE = [
    {"type": "linear", "start_factor": 0.2, "total_iters": 4, "steps": 4},
    {"type": "step", "step_size": 3, "gamma": 0.8, "steps": 8},
    {"type": "cosine", "T_max": 10},
]


def test_kill9_coordinator_resumes_on_the_same_schedule(make_cluster):
    # 40 rounds, accumulate_steps=2: 20 optimizer steps, the last cosine ones after the kill
    model = [
        {"type": "linear", "out": 32},
        {"type": "batchnorm1d"},  # its running statistics are in the checkpoint too
        {"type": "relu"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 10},
    ]
    job_spec = spec(
        rounds=40, checkpoint_every=4, scheduler=SCHEDULE, clip_grad_norm=1.0, model=model
    )
    cl = make_cluster(2).start()
    with cl.client() as c:
        job = c.submit(job_spec.to_dict())
        wait_for(lambda: (job_status(c, job)["checkpoint_round"] or 0) >= 12, "a checkpoint")
        time.sleep(0.03)  # somewhere inside a round
        kill(cl.coordinator)
        cl.start_coordinator()
        resumed_at = job_status(c, job)["checkpoint_round"]
        assert resumed_at < 40
        wait_for(lambda: round_of(c, job) > resumed_at, "progress after the restart", 30)
        c.wait(job, timeout=120)
        assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
        got = [m["lr"] for m in c.metrics(job) if "loss" in m]
    _, metrics = train_local(parse_spec(job_spec.to_dict()))
    assert got == [m["lr"] for m in metrics if "loss" in m]
