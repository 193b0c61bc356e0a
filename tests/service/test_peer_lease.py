"""Workers on the coordinator's host run ahead on one lease together (docs/architecture.md,
"Several workers run ahead together"): each steps its own engine with everyone's sums,
which they send each other straight (worker/peers.py). The weights stay `train --local`'s
bit for bit, and nothing makes a member wait on a peer that will not send: a check drawn
among its blocks, a peer killed or stopped, a block that raises.

Every cluster here is flat (no aggregators): an aggregator never gets a lease.
"""

import os
import signal

import pytest
from test_lease import SPEC_FULL, _log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SLOW = {"SHARDGRAD_FAULT_DELAY": "0.002"}  # ~24 ms rounds: time to act mid-job
# A straggler deadline no round reaches, however loaded the machine (a job's first round
# loads it on every worker, which can take seconds): whatever acts on the deadline here is
# a member waiting on a peer that will not send, and the job would hang without it.
NO_DEADLINE = {"SHARDGRAD_MIN_DEADLINE": "600"}


def _counters(c) -> dict:
    return c.status()["counters"]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("which", ["sgd", "full"])
def test_workers_share_a_lease_with_the_bits_of_local(make_cluster, svc, n, which):
    """Every round on all n workers, nearly all computed ahead on their shared lease; never
    a wait for the straggler deadline (a member waiting on a peer that will not send)."""
    spec = {"sgd": svc.SPEC_SGD, "full": SPEC_FULL}[which]
    ref_state, ref_metrics = svc.local_reference(spec)
    cluster = make_cluster(workers=n, aggregators=0, env=NO_DEADLINE)
    with cluster.client() as c:
        _, status, weights = svc.run_job(c, spec)
        svc.assert_bitwise_equal(weights, ref_state, f"{n} workers on one lease vs train_local")
        metrics = c.metrics(status["id"])
        assert [m.get("loss") for m in metrics] == [m.get("loss") for m in ref_metrics]
        assert {m["workers"] for m in metrics} == {n}
        counters = _counters(c)
        # (verify draws checks: a checked round goes out as TASKs, and the lease is granted
        # again; every other round's blocks were computed ahead)
        assert counters.get("blocks_ahead", 0) > len(metrics), counters
        assert counters.get("backup_blocks", 0) == 0, counters
    assert "the lease ends" not in _log(cluster)


def test_checks_are_computed_by_members_without_ending_the_lease(make_cluster, svc):
    """verify = 0.3: a member checks its peer's drawn block on that round's weights (a
    check TASK), then goes on ahead on the same lease; the bits hold."""
    spec = svc.spec_with(svc.SPEC_ADAM_DROPOUT, verify=0.3, name="svc-peers-checks")
    ref_state, _ = svc.local_reference(spec)
    cluster = make_cluster(workers=2, aggregators=0, env=NO_DEADLINE)
    with cluster.client() as c:
        _, _, weights = svc.run_job(c, spec)
        svc.assert_bitwise_equal(weights, ref_state, "a lease of two with many checks")
        counters = _counters(c)
        assert counters.get("verified_blocks", 0) > 10, counters
        assert counters.get("backup_blocks", 0) == 0, counters
        # One lease for the whole job, but for a worker that registered anew (its heartbeats
        # unanswered while the coordinator dry-ran the submit on a loaded machine).
        anew = sum(_log(cluster, f"worker-{i}").count("registering anew") for i in (1, 2))
        assert counters.get("leases_granted") <= 1 + anew, (counters, anew)
    assert "the lease ends" not in _log(cluster)


def test_with_peer_leases_off_only_a_lone_worker_runs_ahead(make_cluster, svc):
    ref_state, _ = svc.local_reference(svc.SPEC_SGD)
    cluster = make_cluster(workers=2, aggregators=0, env={"SHARDGRAD_PEER_LEASES": "off"})
    with cluster.client() as c:
        _, _, weights = svc.run_job(c, svc.SPEC_SGD)
        svc.assert_bitwise_equal(weights, ref_state, "--peer-leases off vs train_local")
        assert _counters(c).get("blocks_ahead", 0) == 0


@pytest.mark.parametrize("n, window, follow", [(2, 8, 8), (3, 8, 8), (2, 64, 2)])
def test_a_lease_the_coordinator_follows_has_the_bits_and_rows_of_local(
    make_cluster, svc, n, window, follow
):
    """verify = 0: the members send us no sums; every few rounds, at each epoch's end and at
    the end one of them sends its training state (Adam's moments, the schedule, an open
    accumulation, BatchNorm's buffers), which the coordinator takes in place of stepping.
    The weights, and every row's training numbers with the evaluation at each epoch's end
    on the state taken there, are train_local's; checkpoints fall where the states do.
    Whatever --lease-window says, a STEPPED goes every span: the members' window (two
    spans) never closes on them while we wait for their state."""
    spec = svc.spec_with(SPEC_FULL, verify=0.0, epochs=4, checkpoint_every=7, name="svc-follow")
    ref_state, ref_metrics = svc.local_reference(spec)
    env = {"SHARDGRAD_LEASE_WINDOW": str(window), "SHARDGRAD_FOLLOW": str(follow)}
    cluster = make_cluster(workers=n, aggregators=0, env=env)
    with cluster.client() as c:
        _, status, weights = svc.run_job(c, spec)
        svc.assert_bitwise_equal(weights, ref_state, f"a lease of {n} we follow vs train_local")
        keys = ("round", "epoch", "round_loss", "loss", "lr", "grad_norm", "accuracy")
        rows = [{k: m.get(k) for k in keys} for m in c.metrics(status["id"])]
        assert rows == [{k: m.get(k) for k in keys} for m in ref_metrics]
        assert sum(row["accuracy"] is not None for row in rows) == 4
        counters = _counters(c)
        # (all but the first rounds of each lease: a loaded machine can push a job's first
        # round, which loads it on the workers, past the deadline, which ends a lease)
        assert counters.get("rounds_followed", 0) > len(rows) // 2, counters
        assert counters.get("bad_message", 0) == 0, counters
    log = _log(cluster)
    assert "a bad STATE" not in log and log.count("the lease ends (") <= 1, log[-3000:]


def test_with_follow_off_the_coordinator_steps_every_round(make_cluster, svc):
    spec = svc.spec_with(svc.SPEC_SGD, verify=0.0, name="svc-follow-off")
    ref_state, _ = svc.local_reference(spec)
    cluster = make_cluster(workers=2, aggregators=0, env={"SHARDGRAD_FOLLOW": "0"})
    with cluster.client() as c:
        _, _, weights = svc.run_job(c, spec)
        svc.assert_bitwise_equal(weights, ref_state, "--follow 0 vs train_local")
        counters = _counters(c)
        assert counters.get("rounds_followed", 0) == 0 and counters.get("blocks_ahead", 0) > 0


@pytest.mark.parametrize(
    "how, verify", [("kill -9", 0.05), ("SIGSTOP past liveness", 0.05), ("kill -9", 0.0)]
)
def test_a_member_lost_mid_lease(make_cluster, svc, how, verify):
    """The others wait for its sums until the coordinator re-issues its blocks (a TASK ends
    their lease); a stopped member that comes back goes on, and what it sends for the
    ended lease is late. The job ends with train_local's bits. With verify = 0 the
    coordinator follows the lease: our round is the span's first, re-issued to all."""
    spec = svc.spec_with(svc.SPEC_SGD, epochs=8, verify=verify, name="svc-peers-lost")
    ref_state, _ = svc.local_reference(spec)
    cluster = make_cluster(workers=3, aggregators=0, env=SLOW)
    with cluster.client() as c:
        job = c.submit(spec)
        svc.wait_for(lambda: _counters(c).get("blocks_ahead", 0) >= 30, 60, "a shared lease")
        victim = cluster.workers[1]
        if how == "kill -9":
            victim.kill()
            victim.wait(30)
        else:
            victim.send_signal(signal.SIGSTOP)
        svc.wait_for(lambda: _counters(c).get("workers_died", 0) >= 1, 60, "the member lost")
        if how != "kill -9":
            victim.send_signal(signal.SIGCONT)
        status = c.wait(job, timeout=120, poll=0.05)
        assert status["state"] == "done", status
        svc.assert_bitwise_equal(c.fetch(job), ref_state, f"a member {how} mid-lease")
        assert c.metrics(job)[-1]["workers"] in (2, 3)
        if verify == 0:
            counters = _counters(c)
            assert counters.get("rounds_followed", 0) > 0 and counters.get("follow_ended"), counters


@pytest.mark.parametrize("verify", [0.05, 0.0])
def test_a_member_whose_job_code_raises_ends_the_lease_for_all(make_cluster, svc, verify):
    """One of two raises on every block from round 4 on: its FAULTs end the lease (the
    other is told, never left waiting), the other recomputes, the bits hold. (verify = 0:
    on a lease we follow, its FAULT for a round ahead ends it.)"""
    spec = svc.spec_with(svc.SPEC_SGD, verify=verify, name="svc-peers-faulty")
    ref_state, _ = svc.local_reference(spec)
    cluster = make_cluster(workers=0, aggregators=0)
    cluster.add_worker(env={"SHARDGRAD_FAULT_RAISE": "4"})
    cluster.add_worker()
    cluster.wait_workers(2)
    with cluster.client() as c:
        _, _, weights = svc.run_job(c, spec, timeout=120)
        svc.assert_bitwise_equal(weights, ref_state, "beside a member whose code raises")
        counters = _counters(c)
        assert counters.get("job_faults", 0) > 0 and counters.get("backup_blocks", 0) == 0


def _nice(pid) -> set:
    """The niceness of each thread of process `pid` (/proc/PID/task/TID/stat field 19)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out.add(int(f.read().rsplit(")", 1)[1].split()[16]))
    return out


@pytest.mark.parametrize("nice", [None, "0", "3"])
def test_the_coordinator_yields_the_cpu_to_its_workers(make_cluster, svc, nice, monkeypatch):
    """Every thread of the coordinator runs at --nice (default 10), set before it started
    any; the workers keep ours. The bits do not depend on it. (The suite's own clusters run
    at 0: conftest.py says why.)"""
    monkeypatch.delenv("SHARDGRAD_NICE", raising=False)
    env = {} if nice is None else {"SHARDGRAD_NICE": nice}
    cluster = make_cluster(workers=2, aggregators=0, env=env)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    want = max(ours, 10 if nice is None else int(nice))
    assert _nice(cluster.coordinator.pid) == {want}
    assert {n for w in cluster.workers for n in _nice(w.pid)} == {ours}
    if nice is None:
        ref_state, _ = svc.local_reference(svc.SPEC_SGD)
        with cluster.client() as c:
            _, _, weights = svc.run_job(c, svc.SPEC_SGD)
        svc.assert_bitwise_equal(weights, ref_state, "a coordinator at nice 10")
        assert f"running at nice {want}" in _log(cluster) or ours >= 10


def test_a_lease_of_several_ended_by_a_round_of_tasks_sends_each_member_one(tmp_path):
    """In process: members A and B of a lease, and the next round goes out as plain TASKs
    to both (no new lease: say a third worker, off this host, joined). The TASK to A ends
    the lease; B, which this round's TASKs also reach, gets its own once, not a second
    copy as "what it still owes" (it would compute the round twice). A member the round
    does not reach is told the lease is over."""
    import types

    import numpy as np

    from shardgrad import wire
    from shardgrad.coordinator.job import Lease
    from shardgrad.coordinator.rounds import Round
    from shardgrad.coordinator.server import Config, Coordinator

    coord = Coordinator(f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
                        config=Config(heartbeat_interval=60))  # fmt: skip
    try:
        sent = []
        coord._send = lambda sock, to, kind, fields=None, frames=None: (
            sent.append((to.decode(), kind, fields.get("blocks"))) or True
        )
        coord.members = types.SimpleNamespace(
            is_live=lambda w: True, on_this_host=lambda w: False,
            is_aggregator=lambda w: False, leave=lambda w: None, busy=lambda w: None,
        )  # fmt: skip
        rt = types.SimpleNamespace(weights=lambda: [np.zeros(2, np.float32)])
        engine = types.SimpleNamespace(next_round=5)
        coord.job = types.SimpleNamespace(
            id="j", gen=0, spec={}, rt=rt, layout=[], leases={}, engine=engine
        )
        coord.job.lease = Lease(1, {"A": [(0, 4)], "B": [(4, 8)], "C": [(8, 12)]})
        coord.job.round = Round(5, 12, ["A", "B"], per_worker=2)
        coord.send_blocks(dict(coord.job.round.assignment))
        tasks = [(to, blocks) for to, kind, blocks in sent if kind == wire.TASK]
        assert sorted(to for to, _ in tasks) == ["A", "B"], sent
        assert [(to, kind) for to, kind, _ in sent if kind != wire.TASK] == [("C", wire.STEPPED)]
        assert coord.job.lease is None
    finally:
        coord.job = None  # (a stand-in: nothing to checkpoint)
        coord.shutdown()


def test_a_worker_whose_connection_is_gone_is_counted_dead_once(tmp_path):
    """In process, a real ROUTER_MANDATORY socket: a TASK for a registered worker with no
    connection (kill -9 closes it before its heartbeats stop) finds it dead: counted once,
    out of the live set, its blocks re-issued, whatever else was still on its way to it.
    A heartbeat's answer that finds no connection is not a worker's death."""
    from shardgrad import wire
    from shardgrad.coordinator.server import Config, Coordinator

    coord = Coordinator(f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
                        config=Config(heartbeat_interval=60))  # fmt: skip
    try:
        coord.members.heard("A", {})
        assert not coord._send(coord.workers, b"A#hb", wire.HEARTBEAT, {})
        assert coord.members.live() == ["A"] and coord.counters["workers_died"] == 0
        assert not coord._send(coord.workers, b"A", wire.TASK, {"job": "j"})
        assert not coord._send(coord.workers, b"A", wire.STEPPED, {"job": "j"})
        assert coord.members.live() == [] and coord.counters["workers_died"] == 1
        assert coord.members.workers["A"].state == "dead"  # as the sweep says: the dashboard
        assert coord.counters["unroutable"] == 3
    finally:
        coord.shutdown()


def test_a_block_whose_task_could_not_be_sent_is_re_issued_though_its_worker_is_back(
    tmp_path,
):
    """In process, a real ROUTER_MANDATORY socket. B holds its own block and a check of
    A's; the TASK to A finds no connection (say a restarted coordinator's TASK beat A's
    main socket to it) and A is back by its next heartbeat before the round is repaired.
    A's block must go out again: left held by A, nobody would ever ask for it (no backup
    takes a check), and the round would wait forever (fc17)."""
    import types

    import numpy as np

    from shardgrad.coordinator.rounds import Round
    from shardgrad.coordinator.server import Config, Coordinator

    coord = Coordinator(f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
                        config=Config(heartbeat_interval=60))  # fmt: skip
    try:
        real_send = coord._send
        coord._send = lambda sock, to, *a, **k: to == b"B" or real_send(sock, to, *a, **k)
        for w in ("A", "B"):
            coord.members.heard(w, {})
        rt = types.SimpleNamespace(weights=lambda: [np.zeros(2, np.float32)])
        engine = types.SimpleNamespace(next_round=5)
        coord.job = types.SimpleNamespace(
            id="j", gen=0, spec={}, rt=rt, layout=[], leases={}, engine=engine, lease=None
        )
        r = coord.job.round = Round(5, 16, ["A", "B"], per_worker=1, checked=lambda b: b == (0, 8))
        assert r.assignment == {"A": [(0, 8)], "B": [(8, 16), (0, 8)]}
        coord.send_blocks(dict(r.assignment))
        assert coord.members.live() == ["B"] and coord.counters["workers_died"] == 1
        ones = [np.ones(2, np.float32)]
        r.deliver((8, 16), ones, "B", 0.0)
        assert r.deliver((0, 8), ones, "B", 0.0) == "waiting"
        coord.members.heard("A", {})  # back, by a heartbeat
        assert r.lost(coord.members.live()) == ({"A": [(0, 8)]}, 0)
    finally:
        coord.job = None
        coord.shutdown()


def test_a_check_whose_result_was_lost_is_asked_for_again_once_past_the_deadline(tmp_path, caplog):
    """In process. B checks A's block; A's answer and B's own block are in, B's check never
    arrives (lost on its way: a reconnect drops what was in flight) though B stays alive.
    No backup may take it (A answered for it), so past the deadline B is asked once more,
    as a check, but only once its heartbeat says it has nothing to do (busy, it may still
    be computing it), and not again within the deadline."""
    import types

    import numpy as np

    from shardgrad.coordinator.rounds import Round
    from shardgrad.coordinator.server import Config, Coordinator

    coord = Coordinator(f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
                        config=Config(heartbeat_interval=60, min_deadline=0.5))  # fmt: skip
    try:
        sent = []
        coord._send = lambda sock, to, t, fields=None, arrays=None: not sent.append((to, t, fields))
        for w in ("A", "B"):
            coord.members.heard(w, {})
        rt = types.SimpleNamespace(weights=lambda: [np.zeros(2, np.float32)])
        engine = types.SimpleNamespace(next_round=5)
        coord.job = types.SimpleNamespace(
            id="j", gen=0, spec={}, rt=rt, layout=[], leases={}, engine=engine, lease=None,
            round_times=[], state="running",
        )  # fmt: skip
        r = coord.job.round = Round(5, 16, ["A", "B"], per_worker=1, checked=lambda b: b == (0, 8))
        ones = [np.ones(2, np.float32)]
        r.deliver((0, 8), ones, "A", 0.0)
        r.deliver((8, 16), ones, "B", 0.0)
        coord.repair_round()
        assert sent == [], "before the deadline nobody is asked"
        r.started -= 1.0  # past the deadline
        with caplog.at_level("INFO", logger="shardgrad.coordinator"):
            coord.repair_round()
            coord.repair_round()
        assert sent == [], "B may still be computing it"
        said = [m for m in caplog.messages if "still waiting on" in m]
        assert said == ["round 5: past the deadline, still waiting on 0..7 from B"], said
        coord.members.beat("B", True)  # its heartbeat: nothing to do
        coord.repair_round()
        assert [(to, t, f["blocks"], f.get("check")) for to, t, f in sent] == [
            (b"B", "TASK", [[0, 8]], True)
        ]
        assert coord.counters["asked_again"] == 1 and coord.counters["backup_blocks"] == 0
        assert coord.members.idle(["A", "B"]) == [], "the TASK makes it busy"
        coord.members.beat("B", True)  # (a beat sent before the TASK reached it)
        coord.repair_round()
        assert len(sent) == 1, "not again within the deadline"
        assert r.deliver((0, 8), ones, "B", 0.0) == "verified" and r.complete()
    finally:
        coord.job = None
        coord.shutdown()


def test_a_member_given_a_lost_peers_block_is_asked_for_the_rest_of_its_own(tmp_path):
    """In process. A lease of three; verify drew A's two blocks, checked by C and B. B
    leaves (BYE) owing a block of its own and its check. Its block goes to A as a TASK,
    which ends the lease; A, computing ahead, drops the rest of its round when a TASK
    comes, so the same breath asks it for its own block still owed (it hung the round:
    nothing else asks a busy member, and B, gone, still counted among that block's
    holders). And past the deadline a block whose other holder left is backed up."""
    import types

    import numpy as np

    from shardgrad.coordinator.job import Lease
    from shardgrad.coordinator.rounds import Round
    from shardgrad.coordinator.server import Config, Coordinator

    coord = Coordinator(f"ipc://{tmp_path}/w", f"ipc://{tmp_path}/c", str(tmp_path / "state"),
                        config=Config(heartbeat_interval=60, min_deadline=0.5))  # fmt: skip
    try:
        sent = []
        coord._send = lambda sock, to, t, fields=None, arrays=None: (
            not sent.append(
                (to.decode(), t, [tuple(b) for b in fields.get("blocks", ())], fields.get("end"))
            )
        )
        for w in "ABC":
            coord.members.heard(w, {"lease": True})
        rt = types.SimpleNamespace(weights=lambda: [np.zeros(2, np.float32)])
        job = coord.job = types.SimpleNamespace(
            id="j", gen=0, spec={}, rt=rt, layout=[], engine=types.SimpleNamespace(next_round=20),
            round_times=[], state="running", early={}, early_states={},
        )  # fmt: skip
        r = job.round = Round(20, 16, list("ABC"), 2, lambda b: b in {(0, 4), (4, 6)})
        assert r.assignment == {"A": [(0, 4), (4, 6)], "B": [(6, 8), (8, 12), (4, 6)],
                                "C": [(12, 16), (0, 4)]}  # fmt: skip
        own = {w: [b for b in r.assignment[w] if b not in r.checking.get(w, ())] for w in "ABC"}
        job.lease = Lease(7, own)
        job.leases = {7: set(own)}
        one = [np.ones(2, np.float32)]
        r.deliver((0, 4), one, "A", 0.0)  # A ahead: (4, 6) next
        r.deliver((12, 16), one, "C", 0.0)  # C's own; its check of (0, 4) not yet
        r.deliver((6, 8), one, "B", 0.0)  # then B leaves
        coord.members.leave("B")
        coord.repair_round()
        assert sorted(sent) == [("A", "TASK", [(4, 6)], None), ("A", "TASK", [(8, 12)], None),
                                ("C", "TASK", [(0, 4)], None)], sent  # fmt: skip
        assert job.lease is None
        # Should A's answer for (4, 6) be lost all the same: B is no holder to wait on.
        sent.clear()
        r.deliver((8, 12), one, "A", 0.0)
        assert r.deliver((0, 4), one, "C", 0.0) == "verified"
        r.started -= 1.0  # past the deadline
        coord.repair_round()
        assert sent == [("C", "TASK", [(4, 6)], None)], sent
        assert coord.counters["backup_blocks"] == 1
        assert r.ask_again(["A"], 0.0, ["A", "C"]) == {}, "(4, 6) is C's too now"
        assert r.ask_again(["A"], 0.0, ["A"]) == {"A": [(4, 6)]}, "C gone: A alone owes it"
    finally:
        coord.job = None
        coord.shutdown()
