"""Issue 11 on a real cluster: an lr schedule (warmup then cosine) with gradient clipping
ends bitwise equal to train_local on 1 and 3 workers, and the metrics carry the lr and the
gradient norm of every optimizer step."""

import pytest

from shardgrad.training import weights_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCHEDULE = [
    {"type": "linear", "start_factor": 0.1, "total_iters": 6, "steps": 6},
    {"type": "cosine", "T_max": 30, "eta_min": 0.001},
]


def test_schedule_and_clipping_bitwise_for_1_and_3_workers(make_cluster, svc):
    spec = svc.spec_with(
        svc.SPEC_ADAM_DROPOUT, name="svc-sched-clip", scheduler=SCHEDULE, clip_grad_norm=0.5
    )
    ref_state, ref_metrics = svc.local_reference(spec)
    steps = [m for m in ref_metrics if "loss" in m]
    assert all("lr" in m and "grad_norm" in m for m in steps)
    assert len({m["lr"] for m in steps}) > 10  # the schedule really moved the lr
    assert any(m["grad_norm"] > 0.5 for m in steps)  # ... and clipping really clipped
    cluster = make_cluster(workers=1)
    with cluster.client(timeout=10) as c:
        for n in (1, 3):
            svc.grow_to(cluster, n)
            job, status, weights = svc.run_job(c, spec, timeout=90)
            what = f"schedule + clipping on {n} worker(s)"
            svc.assert_bitwise_equal(weights, ref_state, what)
            assert status["digest"] == weights_digest(ref_state), what
            got = [(m["lr"], m["grad_norm"]) for m in c.metrics(job) if "loss" in m]
            assert got == [(m["lr"], m["grad_norm"]) for m in steps], what
