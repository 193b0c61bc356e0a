"""A lone worker runs ahead on a lease (docs/architecture.md, "One worker runs ahead"): its
TASK carries the job's training state, it steps its own RoundEngine and computes up to
`--lease-window` rounds ahead of the coordinator's step. What it computed ahead counts only
on the timeline it was computed for, so the weights stay those of `train --local` bit for
bit whatever happens to the lease: a second worker joining, the lone worker being killed
or stopped past its liveness, the coordinator restarting.

Every cluster here is flat (no aggregators): an aggregator never gets a lease.
"""

import signal

import pytest

from shardgrad.coordinator.width import Width

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# Optimizer state (momentum, Adam), accumulation, dropout, BatchNorm buffers, a schedule
# and clipping: everything the lease's state carries and the worker's engine steps.
SPEC_FULL = {
    "name": "svc-digits-bn-sched-clip",
    "model": [
        {"type": "linear", "out": 32},
        {"type": "batchnorm1d"},
        {"type": "relu"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 10},
    ],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "adam", "lr": 0.01},
    "scheduler": {"type": "step", "step_size": 5, "gamma": 0.7},
    "clip_grad_norm": 1.0,
    "data": {"source": "builtin:digits"},
    "global_batch": 48,
    "micro_batch": 8,
    "accumulate_steps": 2,
    "epochs": 2,
    "seed": 5,
    "eval": {"holdout": 0.2},
}


def _flat(make_cluster, workers, **kw):
    return make_cluster(workers=workers, aggregators=0, **kw)


def _ahead(c) -> int:
    return c.status()["counters"].get("blocks_ahead", 0)


def _slow(svc, epochs, name):
    """SPEC_SGD long enough to act on mid-job: ~14 rounds an epoch, ~24 ms each (the
    workers are slowed by SHARDGRAD_FAULT_DELAY, which leaves the numbers alone)."""
    return svc.spec_with(svc.SPEC_SGD, epochs=epochs, name=name)


SLOW = {"SHARDGRAD_FAULT_DELAY": "0.002"}


def _submit_and_get_ahead(c, svc, spec) -> str:
    """Submit `spec` to a one-worker cluster and wait until rounds were computed ahead."""
    job = c.submit(spec)
    svc.wait_for(lambda: _ahead(c) >= 10, 60, "rounds computed ahead")
    return job


@pytest.mark.parametrize("which", ["sgd", "adam_dropout", "full"])
def test_a_lone_worker_runs_ahead_with_the_bits_of_local(make_cluster, svc, which):
    spec = {"sgd": svc.SPEC_SGD, "adam_dropout": svc.SPEC_ADAM_DROPOUT, "full": SPEC_FULL}[which]
    ref_state, ref_metrics = svc.local_reference(spec)
    cluster = _flat(make_cluster, 1)
    with cluster.client() as c:
        _, status, weights = svc.run_job(c, spec)
        svc.assert_bitwise_equal(weights, ref_state, "one worker on a lease vs train_local")
        metrics = c.metrics(status["id"])
        assert [m.get("loss") for m in metrics] == [m.get("loss") for m in ref_metrics]
        # All but the first round (its TASK carried the lease) were computed ahead. A worker
        # that heard no answer to its heartbeats for a while (the coordinator busy with the
        # submit's dry run on a loaded machine) registers anew: its READY says it holds
        # nothing, which ends the lease; at most two rounds then go out as TASKs again.
        anew = _log(cluster, "worker-1").count("registering anew")
        assert len(ref_metrics) - 1 - 2 * anew <= _ahead(c) <= len(ref_metrics) - 1, (
            c.status()["counters"],
            anew,
        )


def test_without_leases_the_bits_are_the_same(make_cluster, svc):
    ref_state, _ = svc.local_reference(SPEC_FULL)
    cluster = _flat(make_cluster, 1, env={"SHARDGRAD_LEASE_WINDOW": "0"})
    with cluster.client() as c:
        _, _, weights = svc.run_job(c, SPEC_FULL)
        svc.assert_bitwise_equal(weights, ref_state, "--lease-window 0 vs train_local")
        assert _ahead(c) == 0


def test_a_second_worker_ends_the_lease_and_the_bits_hold(make_cluster, svc):
    spec = _slow(svc, 8, "svc-lease-join")
    ref_state, _ = svc.local_reference(spec)
    cluster = _flat(make_cluster, 1, env=SLOW)
    with cluster.client() as c:
        job = _submit_and_get_ahead(c, svc, spec)
        svc.grow_to(cluster, 2)
        status = c.wait(job, timeout=120, poll=0.05)
        assert status["state"] == "done", status
        svc.assert_bitwise_equal(c.fetch(job), ref_state, "a worker joined a lease")
        workers = [m["workers"] for m in c.metrics(job)]
        assert workers[0] == 1 and workers[-1] == 2, workers
        before = _ahead(c)
        # and once it is alone again, the remaining worker gets a lease of its own
        cluster.workers[0].terminate()
        cluster.workers[0].wait(30)
        cluster.wait_until(lambda cl: len(cluster.live_workers(cl)) == 1, "one worker left")
        _, _, weights = svc.run_job(c, svc.spec_with(spec, epochs=2), timeout=120)
        assert _ahead(c) > before


@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP past liveness"])
def test_the_lone_worker_lost_mid_lease(make_cluster, svc, how):
    """kill -9: a new worker takes over. SIGSTOP: the coordinator gives the stopped worker
    up; on SIGCONT it goes on from where it was, ahead, on the same timeline, and what it
    computed counts. Either way the job ends with train_local's bits."""
    spec = _slow(svc, 8, "svc-lease-lost")
    ref_state, _ = svc.local_reference(spec)
    cluster = _flat(make_cluster, 1, env=SLOW)
    with cluster.client() as c:
        job = _submit_and_get_ahead(c, svc, spec)
        victim = cluster.workers[0]
        if how == "kill -9":
            victim.kill()
            victim.wait(30)
            cluster.add_worker(env=SLOW)
        else:
            victim.send_signal(signal.SIGSTOP)
            svc.wait_for(
                lambda: c.status()["counters"].get("workers_died", 0) >= 1,
                60,
                "the stopped worker given up",
            )
            victim.send_signal(signal.SIGCONT)
        status = c.wait(job, timeout=120, poll=0.05)
        assert status["state"] == "done", status
        svc.assert_bitwise_equal(c.fetch(job), ref_state, f"lone worker {how} mid-lease")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_coordinator_restarts_under_a_lease(make_cluster, svc, sig):
    """The worker keeps computing ahead for the old coordinator; the new one resumes from
    its checkpoint, grants a new lease, and drops what was computed under the old one."""
    spec = svc.spec_with(_slow(svc, 8, "svc-lease-restart"), checkpoint_every=5)
    ref_state, _ = svc.local_reference(spec)
    cluster = _flat(make_cluster, 1, env=SLOW)
    with cluster.client() as c:
        job = c.submit(spec)
        svc.wait_for(
            lambda: (c.status(job)["job"]["checkpoint_round"] or 0) >= 20, 60, "a checkpoint"
        )
    cluster.coordinator.send_signal(sig)
    cluster.coordinator.wait(30)
    cluster.start_coordinator()
    with cluster.client() as c:
        status = c.wait(job, timeout=120, poll=0.05)
        assert status["state"] == "done", status
        svc.assert_bitwise_equal(c.fetch(job), ref_state, "coordinator restarted mid-lease")
        assert _ahead(c) > 0


def test_cancel_mid_lease_then_the_next_job_has_the_bits_of_local(make_cluster, svc):
    cluster = _flat(make_cluster, 1, env=SLOW)
    spec = svc.spec_with(svc.SPEC_ADAM_DROPOUT, epochs=1, name="svc-lease-after-cancel")
    ref_state, _ = svc.local_reference(spec)
    with cluster.client() as c:
        job = _submit_and_get_ahead(c, svc, _slow(svc, 20, "svc-lease-cancelled"))
        c.cancel(job)
        _, _, weights = svc.run_job(c, spec, timeout=120)
        svc.assert_bitwise_equal(weights, ref_state, "the job after a cancelled lease")


# ---- width: all live workers, or one ahead on a lease (coordinator/width.py) ---------------
WIDTH = {"SHARDGRAD_WIDTH_PROBE": "4"}  # tests/conftest.py turns it off for the others


def _log(cluster, name="coordinator") -> str:
    return cluster.log(name)


def test_the_job_is_timed_on_all_workers_and_on_one_and_the_bits_hold(make_cluster, svc):
    """Both widths are probed, the choice is logged, and whatever wins, the weights are
    train_local's. (Rounds this small are faster on one worker ahead; not asserted.)"""
    # Many checks: a stand-by checks a third of the leased rounds, so the worker ahead often
    # sends rounds the coordinator has not started yet (kept, then handed in, in order).
    spec = svc.spec_with(svc.SPEC_ADAM_DROPOUT, epochs=4, verify=0.3, name="svc-width")
    ref_state, ref_metrics = svc.local_reference(spec)
    cluster = _flat(make_cluster, 2, env=WIDTH)
    with cluster.client() as c:
        _, status, weights = svc.run_job(c, spec)
        svc.assert_bitwise_equal(weights, ref_state, "probing widths vs train_local")
        metrics = c.metrics(status["id"])
        assert c.status()["counters"].get("verified_blocks", 0) > 0
    assert [m["round"] for m in metrics] == list(range(len(ref_metrics)))
    assert [m.get("loss") for m in metrics] == [m.get("loss") for m in ref_metrics]
    widths = [m["workers"] for m in metrics]
    stretch = Width(probe=4).stretch_rounds()  # (the first, which does not count, then all's)
    assert widths[: 2 * stretch] == [2] * 2 * stretch, widths
    assert {1} <= set(widths[2 * stretch : 3 * stretch]), widths
    assert "on one worker ahead on a lease and" in _log(cluster)


def test_a_stand_by_worker_takes_over_from_the_one_that_computed(make_cluster, svc):
    """Once one worker computes alone, kill -9 it: the one standing by gets its blocks (and
    then a lease of its own), and the job ends with train_local's bits."""
    spec = svc.spec_with(svc.SPEC_SGD, epochs=150, name="svc-width-takeover")
    ref_state, _ = svc.local_reference(spec)
    # (both on one lease may well be faster: this test is about the one that stands by)
    cluster = _flat(make_cluster, 2, env={**WIDTH, "SHARDGRAD_PEER_LEASES": "off"})
    with cluster.client() as c:
        job = c.submit(spec)
        svc.wait_for(lambda: "one computes, the others stand by" in _log(cluster), 60,
                     "the coordinator choosing one worker")  # fmt: skip
        done = {w["id"]: w["blocks_done"] for w in c.status()["workers"]}
        holder = max(done, key=done.get)
        victim = next(p for p in cluster.workers if holder.split("-")[1] == str(p.pid))
        victim.kill()
        victim.wait(30)
        status = c.wait(job, timeout=120, poll=0.05)
        assert status["state"] == "done", status
        svc.assert_bitwise_equal(c.fetch(job), ref_state, "a stand-by took over")
        # (noticed by its silence, or by a STEPPED that found no connection to send on)
        counters = c.status()["counters"]
        assert counters.get("workers_died", 0) >= 1, counters


def test_a_lease_holder_that_sends_garbage_ahead_cannot_hurt_the_coordinator(make_cluster, svc):
    """A peer that says it can take a lease gets one, then sends malformed GRADS / FAULTs
    for rounds ahead (kept for later, so checked when they arrive) and lease ids of the
    wrong kind: each is a counted drop, never an internal error; a real worker then
    finishes the job with train_local's bits."""
    import numpy as np
    import zmq

    from shardgrad import wire

    spec = svc.spec_with(svc.SPEC_SGD, name="svc-lease-garbage", verify=0.0)
    ref_state, _ = svc.local_reference(spec)
    cluster = _flat(make_cluster, 0, liveness=60)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"fake-lease")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.worker_address)
    try:
        sock.send_multipart(
            wire.encode(wire.READY, {"worker": "fake-lease", "info": {"lease": True}})
        )
        with cluster.client() as c:
            job = c.submit(spec)
            while True:  # its first TASK: the lease, with the training state
                assert sock.poll(30_000), "no TASK for the fake worker"
                _, task = wire.recv_msg(sock, expect_types=wire.TO_WORKER_TYPES)
                if task.type == wire.TASK:
                    break
            lease, rnd = task["lease"]["id"], task["round"]
            block = task["blocks"][0]
            bad = np.zeros(3, np.int32)
            before = c.status()["counters"]
            for fields, arrays in [
                ({"round": rnd + 1, "lease": lease}, [("0", bad)]),  # wrong layout, ahead
                ({"round": rnd + 2, "lease": [lease]}, [("0", bad)]),  # lease of a bad kind
                ({"round": rnd + 1, "lease": lease, "type_": "FAULT", "error": 7}, []),
            ]:
                kind = fields.pop("type_", wire.GRADS)
                msg = {"worker": "fake-lease", "job": job, "block": block, **fields}
                wire.send_msg(sock, kind, msg, arrays)
            svc.wait_for(
                lambda: (
                    c.status()["counters"].get("bad_message", 0) >= before.get("bad_message", 0) + 2
                ),
                30,
                "the malformed ones counted as bad",
            )
            assert "internal_error" not in c.status()["counters"], c.status()["counters"]
            sock.send_multipart(wire.encode(wire.BYE, {"worker": "fake-lease"}))
            cluster.add_worker()
            status = c.wait(job, timeout=120, poll=0.05)
            assert status["state"] == "done", status
            svc.assert_bitwise_equal(c.fetch(job), ref_state, "after a garbage lease holder")
            assert "internal_error" not in c.status()["counters"], c.status()["counters"]
    finally:
        sock.close(0)


def test_a_worker_whose_job_code_keeps_raising_beside_a_healthy_one(make_cluster, svc):
    """One of two workers raises on every block from round 4 on. Whether it holds the lease
    or stands by, its blocks are recomputed by the other (a lease it dropped ends; a checked
    block the other already answered is taken on that answer), and the job ends bitwise."""
    spec = svc.spec_with(svc.SPEC_SGD, verify=0.3, name="svc-width-faulty")
    ref_state, _ = svc.local_reference(spec)
    cluster = _flat(make_cluster, 0, env=WIDTH)
    cluster.add_worker(env={"SHARDGRAD_FAULT_RAISE": "4"})  # started first: usually holder
    cluster.wait_workers(1)
    cluster.add_worker()
    cluster.wait_workers(2)
    with cluster.client() as c:
        _, _, weights = svc.run_job(c, spec, timeout=120)
        svc.assert_bitwise_equal(weights, ref_state, "beside a worker whose code raises")
        assert c.status()["counters"].get("job_faults", 0) > 0
