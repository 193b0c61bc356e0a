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


def test_init_from_a_done_job_and_fetch_as_safetensors(make_cluster, svc, tmp_path):
    """`init = "job:ID"` continues from a done job's weights and ends bitwise equal to
    train_local started from the same weights as a file; a wrong init is refused at submit
    naming it; `shardgrad fetch JOB -o x.safetensors` writes torch's names."""
    import os
    import subprocess
    import sys

    import numpy as np

    from shardgrad.client import ClientError
    from shardgrad.export import load_safetensors
    from shardgrad.jobspec import parse_spec
    from shardgrad.training import train_local

    first = svc.spec_with(svc.SPEC_SGD, name="svc-init-first", epochs=1)
    cluster = make_cluster(workers=2, data_root=str(tmp_path))
    with cluster.client(timeout=10) as c:
        job_a, _, weights_a = svc.run_job(c, first, timeout=90)
        np.savez(tmp_path / "a.npz", **weights_a)
        second = svc.spec_with(first, name="svc-init-second", init=f"job:{job_a}", seed=5)
        job_b, _, weights_b = svc.run_job(c, second, timeout=90)
        local = svc.spec_with(second, init="file:a.npz")
        ref, _ = train_local(parse_spec(local), str(tmp_path))
        svc.assert_bitwise_equal(weights_b, ref, "init job: vs train_local with init file:")
        for bad, needle in (
            ("job:nope", "init 'job:nope': no such job"),
            ("file:missing.npz", "missing.npz"),
        ):
            with pytest.raises(ClientError, match="init|missing") as e:
                c.submit(svc.spec_with(first, init=bad))
            assert needle in str(e.value), str(e.value)
        out = tmp_path / "b.safetensors"
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "shardgrad.cli", "fetch", job_b, "-o", str(out)]
        cmd += ["--coordinator", cluster.client_address]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_safetensors(str(out))
    svc.assert_bitwise_equal(got, weights_b, "fetch -o .safetensors")
    assert sorted(got) == ["0.bias", "0.weight", "2.bias", "2.weight"]


BN_CNN = {
    "name": "svc-bn-cnn",
    "model": [
        {"type": "conv2d", "out": 6, "kernel": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2},
        {"type": "flatten"},
        {"type": "linear", "out": 16},
        {"type": "batchnorm1d", "momentum": 0.2},
        {"type": "relu"},
        {"type": "linear", "out": 10},
    ],
    "input_shape": [1, 8, 8],
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
    "data": {"source": "builtin:digits"},
    "global_batch": 48,
    "micro_batch": 8,  # 6 micro-batches: a ragged tree, different blocks for 1..4 workers
    "accumulate_steps": 2,
    "rounds": 15,
    "seed": 4,
    "eval": {"holdout": 0.2},
    "scheduler": {"type": "exponential", "gamma": 0.95},
}


def test_batchnorm_cnn_bitwise_for_1_to_4_workers(make_cluster, svc):
    """BatchNorm statistics per micro-batch, running statistics from the canonical tree:
    weights, running_mean / running_var / num_batches_tracked and the held-out accuracy
    (evaluated with the running statistics) are bitwise train_local's for 1..4 workers."""
    ref_state, ref_metrics = svc.local_reference(BN_CNN)
    assert int(ref_state["1.num_batches_tracked"]) == BN_CNN["rounds"]
    cluster = make_cluster(workers=1)
    with cluster.client(timeout=10) as c:
        for n in (1, 2, 3, 4):
            svc.grow_to(cluster, n)
            job, status, weights = svc.run_job(c, BN_CNN, timeout=90)
            what = f"BatchNorm CNN on {n} worker(s)"
            svc.assert_bitwise_equal(weights, ref_state, what)
            assert status["eval"]["accuracy"] == ref_metrics[-1]["accuracy"], what
            assert {m["workers"] for m in c.metrics(job)} == {n}, what
