"""End to end: a real cluster (coordinator + N worker processes over ZeroMQ), jobs submitted
through `shardgrad.Client`, and the determinism contract checked bit for bit.

The final weights of the same job must be bitwise identical (np.array_equal per array and
the sha256 of shardgrad.training.weights_digest) for 1, 2, 3 and 4 workers, and equal to
`train_local` in this process and to the CLI `shardgrad train SPEC --local`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardgrad.client import ClientError
from shardgrad.training import weights_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ACCURACY = 0.9


def test_bitwise_identical_for_1_to_4_workers(make_cluster, svc):
    """One cluster grown from 1 to 4 worker processes; at each size the two jobs (SGD with
    momentum; Adam + dropout + accumulate_steps=2) are submitted back to back and must end
    bitwise equal to train_local, with >= 0.9 held-out accuracy."""
    specs = [svc.SPEC_SGD, svc.SPEC_ADAM_DROPOUT]
    refs = [svc.local_reference(s) for s in specs]
    for (_, ref_metrics), spec in zip(refs, specs, strict=True):
        assert ref_metrics[-1]["accuracy"] >= ACCURACY, (spec["name"], ref_metrics[-1])

    cluster = make_cluster(workers=1)
    digests: dict[tuple[str, int], str] = {}
    with cluster.client(timeout=10) as c:
        for n in (1, 2, 3, 4):
            svc.grow_to(cluster, n)
            jobs = [c.submit(s) for s in specs]  # back to back: the second one queues
            for job, spec, (ref_state, ref_metrics) in zip(jobs, specs, refs, strict=True):
                status = c.wait(job, timeout=90, poll=0.05)
                what = f"{spec['name']} on {n} worker(s) (job {job})"
                assert status["state"] == "done", (what, status)
                weights = c.fetch(job)
                svc.assert_bitwise_equal(weights, ref_state, f"{what} vs train_local")
                digests[(spec["name"], n)] = weights_digest(weights)
                assert status["digest"] == weights_digest(ref_state), what
                # the held-out evaluation is part of the same computation
                assert status["eval"]["accuracy"] >= ACCURACY, (what, status["eval"])
                assert status["eval"]["accuracy"] == ref_metrics[-1]["accuracy"], what
                metrics = c.metrics(job)
                assert len(metrics) == len(ref_metrics) == status["total_rounds"], what
                # every round really was spread over all n workers
                assert {m["workers"] for m in metrics} == {n}, (
                    what,
                    [m["workers"] for m in metrics],
                )
                losses = [m["loss"] for m in metrics if "loss" in m]
                assert losses == [m["loss"] for m in ref_metrics if "loss" in m], what
    for spec in specs:
        per_n = {n: digests[(spec["name"], n)] for n in (1, 2, 3, 4)}
        assert len(set(per_n.values())) == 1, (spec["name"], per_n)


def _cli():
    exe = Path(sys.executable).parent / "shardgrad"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "shardgrad.cli"]


@pytest.mark.parametrize("which", ["SPEC_SGD", "SPEC_ADAM_DROPOUT"])
def test_cli_train_local_is_the_reference(tmp_path, svc, which):
    """`shardgrad train SPEC --local -o out.npz` (a fresh process, no sockets) writes the
    very weights train_local computes here, which the cluster runs above must equal."""
    spec = getattr(svc, which)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "model.npz"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*_cli(), "train", str(path), "--local", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ref_state, ref_metrics = svc.local_reference(spec)
    with np.load(out, allow_pickle=False) as z:
        cli_state = {k: z[k] for k in z.files}
    svc.assert_bitwise_equal(cli_state, ref_state, f"CLI train --local of {spec['name']}")
    assert report["digest"] == weights_digest(ref_state)
    assert report["rounds"] == len(ref_metrics)
    assert report["eval"]["accuracy"] >= ACCURACY


def test_fifo_queue_and_cancel(make_cluster, svc):
    """Jobs run one at a time in submission order; a queued job can be cancelled and never
    runs; a running job can be cancelled and the cluster goes on with the next job."""
    cluster = make_cluster(workers=2)
    first = svc.spec_with(svc.SPEC_SGD, name="fifo-1", epochs=6)  # long enough to queue behind
    second = svc.spec_with(svc.SPEC_ADAM_DROPOUT, name="fifo-2")
    third = svc.spec_with(svc.SPEC_SGD, name="fifo-3-cancelled", seed=99)
    with cluster.client(timeout=10) as c:
        j1, j2, j3 = c.submit(first), c.submit(second), c.submit(third)
        assert len({j1, j2, j3}) == 3
        assert c.status(j3)["job"]["state"] == "queued", "precondition: the third job queues"
        reply = c.cancel(j3)
        assert reply["state"] == "cancelled" and reply["job"] == j3

        # FIFO: while the first job is unfinished the second one must still be queued, and
        # the cancelled one must never start.
        seen = []

        def both_final():
            # one JOBS request: a snapshot of all three (three STATUS requests could see
            # job 1 running and then, after it ends between them, job 2 running too)
            rows = {j["id"]: j for j in c.jobs()}
            s1, s2, s3 = (rows[j] for j in (j1, j2, j3))
            seen.append((s1["state"], s2["state"], s3["state"]))
            assert s3["state"] == "cancelled" and s3["round"] == 0, s3
            if s1["state"] != "done":
                assert s2["state"] == "queued", f"{j2} left the queue while {j1} was {s1}"
            assert s1["state"] not in ("failed", "cancelled"), s1
            assert s2["state"] not in ("failed", "cancelled"), s2
            return s1["state"] == s2["state"] == "done"

        svc.wait_for(both_final, 90, "both FIFO jobs to finish")
        assert any(s[0] in ("running", "queued") for s in seen[:1]), seen[:3]
        for job, spec in ((j1, first), (j2, second)):
            svc.assert_bitwise_equal(c.fetch(job), svc.local_reference(spec)[0], job)

        listed = [j["id"] for j in c.jobs()]
        assert [j for j in listed if j in (j1, j2, j3)] == [j1, j2, j3]
        with pytest.raises(ClientError, match="cancelled"):
            c.fetch(j3)
        with pytest.raises(ClientError, match="already cancelled"):
            c.cancel(j3)
        assert c.metrics(j3) == []

        # cancel a running job; the next one still runs to the bitwise-correct end
        long = svc.spec_with(svc.SPEC_SGD, name="cancel-running", epochs=200)
        j4 = c.submit(long)
        svc.wait_for(lambda: c.status(j4)["job"]["round"] >= 2, 30, f"{j4} to make progress")
        assert c.cancel(j4)["state"] == "cancelled"
        assert c.status(j4)["job"]["state"] == "cancelled"
        after = svc.spec_with(svc.SPEC_SGD, name="after-cancel", epochs=1)
        _, status, weights = svc.run_job(c, after)
        svc.assert_bitwise_equal(weights, svc.local_reference(after)[0], "the job after a cancel")
        assert c.status(j4)["job"]["state"] == "cancelled"
