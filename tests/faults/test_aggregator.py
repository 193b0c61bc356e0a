"""Hierarchical reduction (issue 13): aggregators between the coordinator and the workers.
Whatever the layout, whoever dies (a worker or a whole aggregator, kill -9 mid-round),
lies or raises, the job's weights equal train --local's bit for bit."""

import signal
import time

import numpy as np
import pytest
from fault_helpers import (
    DELAY,
    FAULT_SPEC,
    HB,
    job_status,
    kill,
    reference_digest,
    round_of,
    spec,
    wait_for,
)

from shardgrad import wire
from shardgrad.training import weights_digest

pytestmark = pytest.mark.slow


def finish(c, job, timeout=180):
    c.wait(job, timeout=timeout)
    return weights_digest(c.fetch(job))


def log_of(cl, name):
    return cl.log(name)


@pytest.mark.parametrize("aggregators,workers", [(1, 1), (1, 3), (2, 2), (2, 5)])
def test_any_layout_gives_the_same_bits(make_cluster, aggregators, workers):
    job_spec = spec(rounds=16)
    # Who takes part in each round is asserted below: no straggler backups then (a loaded
    # machine took over 5 s, the default deadline, to load the job in round 0).
    env = {"SHARDGRAD_FAULT_DELAY": DELAY, "SHARDGRAD_MIN_DEADLINE": "300"}
    cl = make_cluster(workers, aggregators=aggregators, liveness=25, env=env).start()
    with cl.client() as c:
        members = c.status()["workers"]
        assert sorted(m["id"] for m in members) == [f"aggregator-{i}" for i in range(aggregators)]
        assert sum(m["workers"] for m in members) == workers
        job = c.submit(job_spec)
        assert finish(c, job) == reference_digest(job_spec)
        rows = c.metrics(job)
        # every worker took part in every round, and the coordinator heard one sum per
        # aggregator block, never one per worker
        assert {r["workers"] for r in rows} == {workers}, [(r["round"], r["workers"]) for r in rows]
        assert max(r["blocks"] for r in rows) <= 2 * aggregators


def test_workers_behind_an_aggregator_killed_mid_round(make_cluster):
    """kill -9 workers behind the aggregators at random points in rounds (replacements
    join): the aggregator re-issues their sub-blocks to its other workers."""
    job_spec = spec(rounds=40)
    cl = make_cluster(4, aggregators=2).start()
    with cl.client() as c:
        job = c.submit(job_spec)
        for target, victim in ((6, 0), (14, 1), (22, 2)):
            wait_for(lambda t=target: round_of(c, job) >= t, f"round {target}")
            kill(cl.workers[victim])
            cl.add_worker(aggregator=victim % 2)
        assert finish(c, job) == reference_digest(job_spec)
    logs = log_of(cl, "aggregator-0") + log_of(cl, "aggregator-1")
    assert "is gone" in logs and "re-issuing" in logs


def test_an_aggregator_killed_mid_round_and_restarted(make_cluster):
    """kill -9 a whole aggregator mid-round: the coordinator re-issues its blocks to the
    other one; restarted, it gets its workers back (they re-register) and work again."""
    job_spec = spec(rounds=48)
    cl = make_cluster(4, aggregators=2).start()
    with cl.client() as c:
        job = c.submit(job_spec)
        wait_for(lambda: round_of(c, job) >= 6, "round 6")
        kill(cl.aggregators[0])
        wait_for(lambda: c.status()["counters"].get("workers_died", 0) >= 1, "the death seen")
        killed_at = round_of(c, job)
        wait_for(lambda: round_of(c, job) >= killed_at + 3, "the job to go on without it")
        assert job_status(c, job)["state"] == "running"
        cl.start_aggregator(0)
        cl.wait_workers(4)  # its two workers are back behind it
        assert finish(c, job) == reference_digest(job_spec)
        rows = c.metrics(job)
    assert rows[-1]["workers"] == 4, "the restarted aggregator took work"


def a_liar_among_three(make_cluster, corrupt, after=0):
    """One aggregator, three workers, the first of them adding noise to its sums."""
    cl = make_cluster(0, aggregators=1)
    cl.start_coordinator()
    env = {"SHARDGRAD_FAULT_CORRUPT": corrupt, "SHARDGRAD_FAULT_CORRUPT_AFTER": str(after)}
    liar = cl.add_worker(env=env)
    cl.add_worker()
    cl.add_worker()
    cl.wait_workers(3)
    return cl, liar


def test_a_lying_worker_behind_an_aggregator_is_caught_there(make_cluster):
    """One of an aggregator's three workers turns liar after round 6; the aggregator's own
    check catches it, quarantines it, and recalls what it sent unchecked: the coordinator
    rolls back and the weights are right."""
    job_spec = spec(rounds=24, verify=0.5)
    cl, liar = a_liar_among_three(make_cluster, "1.0", after=6)
    with cl.client() as c:
        job = c.submit(job_spec)
        assert finish(c, job) == reference_digest(job_spec)
        counters = c.status()["counters"]

        def quarantined_below():  # the aggregator's table reaches the coordinator's status
            (agg,) = c.status()["workers"]
            return [m for m in agg.get("members", []) if m["state"] == "quarantined"]

        (caught,) = wait_for(quarantined_below, "the liar in status", 10)
        assert "differed from the aggregator's recomputation" in caught["reason"]
    log = log_of(cl, "aggregator-0")
    assert "quarantined" in log and "differed from the aggregator's recomputation" in log
    assert counters.get("recalls", 0) >= 1 and counters.get("rollbacks", 0) >= 1, counters
    assert liar.poll() is None, "a quarantined worker is left running, just never used"


def test_every_block_checked_catches_an_occasional_liar_without_rollback(make_cluster):
    job_spec = spec(rounds=16, verify=1.0)
    cl, _ = a_liar_among_three(make_cluster, "0.3")
    with cl.client() as c:
        job = c.submit(job_spec)
        assert finish(c, job) == reference_digest(job_spec)
        assert c.status()["counters"].get("rollbacks", 0) == 0
    assert "quarantined" in log_of(cl, "aggregator-0")


def test_a_job_that_raises_behind_aggregators_fails_alone(make_cluster):
    """Job code raises on every worker from round 3: the job ends failed naming the round
    and every process stays up; with honest workers, the next job is bitwise right."""
    digits = {**FAULT_SPEC, "rounds": 10, "verify": 0.0}
    cl = make_cluster(0, aggregators=2)
    cl.start_coordinator()
    for i in range(2):
        cl.start_aggregator(i)
    for _ in range(2):
        cl.add_worker(env={"SHARDGRAD_FAULT_RAISE": "3"})
    cl.wait_workers(2)
    with cl.client() as c:
        bad = c.submit({**digits, "name": "raises"})
        failed = wait_for(
            lambda: (s := job_status(c, bad))["state"] == "failed" and s, "the job to fail", 120
        )
        assert "round 3" in failed["error"] and "injected fault" in failed["error"], failed
        assert all(p.poll() is None for p in [cl.coordinator, *cl.aggregators, *cl.workers])
        for p in cl.workers:
            kill(p, signal.SIGTERM)
        for _ in range(2):
            cl.add_worker()
        good = spec(**digits)
        job = c.submit(good)
        assert finish(c, job) == reference_digest(good)


def test_a_tree_of_aggregators(make_cluster):
    """Two host aggregators under a root one: the coordinator hears one member, one sum
    per round. One host aggregator is killed mid-round; the root re-issues its blocks to
    the other; the weights are right."""
    job_spec = spec(rounds=40)
    cl = make_cluster(4, aggregators=2, root_aggregator=True).start()
    with cl.client() as c:
        # The coordinator hears one member, the root, for all 4. Waited for, not read once:
        # start() saw 4, but on a loaded machine a host aggregator's heartbeats can be late
        # past the root's liveness (HB) for a moment, and it counts 2 until the next one.
        members = lambda: [(w["id"], w.get("workers")) for w in c.status()["workers"]]  # noqa: E731
        wait_for(lambda: members() == [("aggregator-root", 4)], "the root to count all 4")
        job = c.submit(job_spec)
        wait_for(lambda: round_of(c, job) >= 8, "round 8")
        kill(cl.aggregators[1])
        wait_for(lambda: cl.capacity(c) == 2, "the root to see it gone")
        assert finish(c, job) == reference_digest(job_spec)
        rows = c.metrics(job)
    assert {r["blocks"] for r in rows} == {1}, "one sum per round reached the coordinator"
    assert "is gone" in log_of(cl, "aggregator-root")


def test_a_recall_of_the_running_round_drops_what_that_aggregator_sent(make_cluster):
    """An aggregator that catches a liar in the round still running may already have passed
    up a sum built on the liar's word. Its RECALL for that round makes the coordinator drop
    what it sent this round and ask again. Here the test itself is the aggregator, speaking
    the protocol: in round 1 it sends one noisy block sum, then the RECALL, then answers
    the re-issued blocks honestly; the weights must equal train --local's."""
    import numpy as np
    import zmq

    from shardgrad import wire
    from shardgrad.training import JobRuntime
    from shardgrad.worker.heartbeat import Heartbeat

    job_spec = spec(rounds=4, verify=0.0)
    cl = make_cluster(0, aggregators=0)
    cl.start_coordinator()
    ctx = zmq.Context()
    info = {"role": "aggregator", "workers": 3}
    beat = Heartbeat(ctx, cl.worker_address, "fake-aggregator", HB, info=lambda: info)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"fake-aggregator")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cl.worker_address)
    me = {"worker": "fake-aggregator"}
    try:
        # as if three workers were behind it: beside one real worker, its share of the
        # round is two tree nodes, so the round is still running after its first sum
        wire.send_msg(sock, wire.READY, {**me, "info": info})
        beat.start()
        cl.add_worker()
        cl.wait_workers(4)
        rt = JobRuntime(job_spec, verify_data=False)
        with cl.client() as c:
            job = c.submit(job_spec)
            recalled, deadline = False, time.monotonic() + 120
            while job_status(c, job)["state"] not in ("done", "failed"):
                assert time.monotonic() < deadline, "the job did not finish"
                if not sock.poll(200):
                    continue
                _, task = wire.recv_msg(sock, expect_types=wire.TO_WORKER_TYPES)
                if task.type != wire.TASK:
                    continue
                rnd = task["round"]
                rt.set_weights([task.arrays[str(i)] for i in range(len(rt.params))])
                for lo, hi in task["blocks"]:
                    sums = rt.block_grad(rnd, lo, hi)
                    if rnd == 1 and not recalled:
                        sums[0] = sums[0] + np.float32(1e-3)  # a liar's word, passed up
                    fields = {**me, "job": job, "round": rnd, "block": [lo, hi]}
                    names = wire.sum_names(len(sums))
                    wire.send_msg(sock, wire.GRADS, fields, list(zip(names, sums, strict=True)))
                    if rnd == 1 and not recalled:
                        assert len(task["blocks"]) > 1, task["blocks"]
                        recalled = True  # caught below: recall this round, answer no more
                        reason = "worker w was caught lying"
                        recall = {**me, "job": job, "since": 1, "reason": reason}
                        wire.send_msg(sock, wire.RECALL, recall)
                        break
            assert job_status(c, job)["state"] == "done"
            assert weights_digest(c.fetch(job)) == reference_digest(job_spec)
            assert c.status()["counters"].get("recalls") == 1
    finally:
        beat.stop.set()
        beat.join(5)
        sock.close(0)
        ctx.term()


def test_a_sum_lost_between_an_aggregator_and_the_coordinator_is_asked_again(make_cluster):
    """The aggregator's third block sum never reaches the coordinator (a reconnect drops
    what was in flight; here a fault hook drops it). It is the only member, so no backup can
    take that block and the round would wait forever. Its heartbeats say it owes nothing,
    so past the deadline the coordinator asks it again, and it sends the sum it still has
    (its workers do not compute that block again); the weights are right."""
    job_spec = spec(rounds=8)
    env = {"SHARDGRAD_FAULT_DELAY": DELAY, "SHARDGRAD_MIN_DEADLINE": "1"}
    cl = make_cluster(0, aggregators=1, env=env)
    cl.start_coordinator()
    cl.start_aggregator(0, env={"SHARDGRAD_FAULT_DROP_UP": "3"})
    cl.add_worker()
    cl.add_worker()
    cl.wait_workers(2)
    with cl.client() as c:
        job = c.submit(job_spec)
        assert finish(c, job) == reference_digest(job_spec)
        assert c.status()["counters"].get("asked_again", 0) >= 1
    assert "asking aggregator-0 again" in log_of(cl, "coordinator")
    assert "sending their sums again" in log_of(cl, "aggregator-0")


def test_a_bug_in_the_aggregators_tick_costs_the_share_not_the_aggregator(caplog):
    """What raises in repair (a bug) is logged and drops the round's share: the aggregator
    lives on, says idle, and the coordinator asks again for what it waits on."""
    from shardgrad.coordinator.aggregator import Aggregator

    agg = Aggregator("ipc:///nonexistent/up", "ipc:///nonexistent/down")
    try:
        agg.announced, agg.info["members"] = 0, []  # (nothing to announce: no socket needed)
        agg.share = object()

        def repair():
            raise RuntimeError("a bug")

        agg.repair = repair
        agg.tick()
        assert agg.share is None
        assert "the round's share is dropped" in caplog.text
        agg.tick()  # and the next pass has nothing to repair
    finally:
        agg.local.close()


def test_a_restarted_coordinators_round_is_a_new_share_even_at_the_same_gen_and_round():
    """`gen` is not checkpointed: after a coordinator restart, (gen, round) can name other
    weights than before it (a rollback just before the crash). The boot id in its TASKs
    tells them apart, so nothing held from before (sums sent up, published weights) is
    taken for the new round's."""
    from shardgrad.coordinator.aggregator import Aggregator

    agg = Aggregator("ipc:///nonexistent/up", "ipc:///nonexistent/down")
    spec = {"global_batch": 8, "micro_batch": 2, "verify": 0.0}

    def task(boot, weight, **more):
        fields = {"job": "job-000001", "gen": 0, "round": 3, "blocks": [[0, 4]], "spec": spec,
                  "layout": [[[2], "float32"], [[1], "float64"]], "boot": boot, **more}  # fmt: skip
        return wire.Message(wire.TASK, fields, {"0": np.full(2, weight, np.float32)})

    try:
        agg.on_upstream(task("aaaa", 1.0))
        first = agg.share
        agg.on_upstream(task("aaaa", 1.0, again=True))
        assert agg.share is first  # the same round of the same coordinator: the same share
        # the restarted coordinator asks for the same (gen, round) and block, even "again"
        agg.on_upstream(task("bbbb", 2.0, again=True))
        assert agg.share is not first and agg.share.boot == "bbbb"
        assert agg.share.weights[0][0] == 2.0  # its weights, to compute the block with
        assert agg.share.blocks == [(0, 4)] and agg.share.sent == set()  # computed afresh
    finally:
        agg.local.close()


def test_a_sum_of_an_abandoned_timeline_is_late_at_an_aggregator():
    """A GRADS echoes its TASK's gen and boot id: one computed before a rollback (or a
    coordinator restart) for the same round number is not taken for the new timeline's."""
    from shardgrad.coordinator.aggregator import Aggregator

    agg = Aggregator("ipc:///nonexistent/up", "ipc:///nonexistent/down")
    spec = {"global_batch": 8, "micro_batch": 2, "verify": 0.0}
    fields = {"job": "job-000001", "gen": 1, "round": 3, "blocks": [[0, 4]], "spec": spec,
              "layout": [[[2], "float32"], [[1], "float64"]], "boot": "bbbb"}  # fmt: skip
    try:
        agg.on_upstream(wire.Message(wire.TASK, fields, {"0": np.ones(2, np.float32)}))
        r = agg.share.round
        r.holders[(0, 4)] = {"w1"}  # (as if dealt to w1, a live worker)
        agg.members.workers["w1"] = type("W", (), {"state": "live"})()
        sums = {"0": np.ones(2, np.float32), "loss": np.ones(1)}
        for gen, boot in ((0, "bbbb"), (1, "aaaa")):
            grads = {"job": "job-000001", "round": 3, "block": [0, 4], "gen": gen, "boot": boot}
            agg.on_worker(wire.Message(wire.GRADS, {**grads, "worker": "w1"}, sums,
                                       envelope=(b"w1",)))  # fmt: skip
            assert not r.results.get((0, 4)) and (0, 4) not in r.delivered
        right = {"job": "job-000001", "round": 3, "block": [0, 4], "gen": 1, "boot": "bbbb"}
        agg.on_worker(wire.Message(wire.GRADS, {**right, "worker": "w1"}, sums,
                                   envelope=(b"w1",)))  # fmt: skip
        assert r.results.get((0, 4)) or (0, 4) in r.delivered  # (the same sum, this timeline)
    finally:
        agg.local.close()
