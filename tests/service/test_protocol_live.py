"""The wire protocol under fire, live: while a job runs on a real cluster, a separate sender
throws every kind of malformed message at BOTH of the coordinator's ports.

* client port: every bad request gets an ERROR reply whose message says what is wrong;
* worker port: every bad message is a logged, counted drop (STATUS "counters");
* GRADS that are well-formed but wrong (another job, another round, a block nobody holds,
  arrays of the wrong shape / dtype for a block that IS pending) never touch the sum;
* the coordinator never crashes (no "internal_error"), and the job ends with weights
  bitwise equal to train_local.

To hit "a block that is pending in the current round" deterministically, one worker is
SIGSTOPped (the cluster runs with a long liveness so it is not declared dead): the round
cannot finish without that worker's blocks, so (round, its last block) stays pending.
"""

import os
import re
import signal

import msgpack
import numpy as np
import pytest
import zmq

from shardgrad import wire
from shardgrad.cluster import RETRY, wait_for
from shardgrad.core import nn
from shardgrad.core.sampling import assign_blocks
from shardgrad.jobspec import parse_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

V = wire.PROTOCOL_VERSION


def header(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def f32(n) -> bytes:
    return np.zeros(n, np.float32).tobytes()


# (name, frames, regex for the reason). Every one of these is a decode-level failure: on the
# client port it gets an ERROR reply with the reason; sent to the worker port it is a counted
# drop whose reason is logged. The client port takes no array frames at all
# (wire.CLIENT_PORT_LIMITS), so there an array case fails on the frame count first: ARRAYS_ON_
# CLIENT_PORT is what the client-port reply says for those instead.
ARRAYS_ON_CLIENT_PORT = r"frames?, above the limit of 1|arrays declared, above the limit of 0"
BIG = 3 << 20  # a 3 MiB header: above both ports' header limits, below the client frame cap
DECODE_FAILURES = [
    ("garbage bytes", [b"\xc1\xffgarbage\x00\x01"], r"not valid msgpack", None),
    ("random bytes", [bytes(range(256))[::-3] * 5], r"msgpack|header", None),
    ("empty header frame", [b""], r"empty header", None),
    ("header not a map", [msgpack.packb([1, 2, 3])], r"must be a msgpack map", None),
    ("header is a string", [msgpack.packb("STATUS")], r"must be a msgpack map", None),
    (
        "truncated header",
        [header(type="STATUS", v=V, job="job-000001")[:-4]],
        r"not valid msgpack",
        None,
    ),
    (
        "non-string header keys",
        [msgpack.packb({1: "STATUS", "v": V})],
        r"not valid msgpack|keys must all be strings",
        None,
    ),
    (
        "oversized header",
        [header(type="STATUS", v=V, pad="x" * BIG)],
        r"header is \d+ bytes, above the limit",
        None,
    ),
    ("unknown type", [header(type="FROBNICATE", v=V)], r"unknown message type 'FROBNICATE'", None),
    ("missing type", [header(v=V)], r"'type' must be a non-empty string", None),
    (
        "wrong version",
        [header(type="STATUS", v=V + 41)],
        rf"unsupported protocol version {V + 41}",
        None,
    ),
    ("missing version", [header(type="STATUS")], r"'v' must be an int", None),
    ("version not an int", [header(type="STATUS", v="1")], r"'v' must be an int", None),
    (
        "truncated array frame",
        [header(type="HEARTBEAT", v=V, arrays=[["a", "float32", [4]]]), f32(4)[:-1]],
        r"needs 16 bytes, frame has 15",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "dtype vs frame (float64 declared, float32 sent)",
        [header(type="HEARTBEAT", v=V, arrays=[["a", "float64", [4]]]), f32(4)],
        r"float64 shape \[4\] needs 32 bytes, frame has 16",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "shape vs frame",
        [header(type="HEARTBEAT", v=V, arrays=[["a", "float32", [3, 3]]]), f32(4)],
        r"needs 36 bytes, frame has 16",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "huge declared shape",
        [header(type="HEARTBEAT", v=V, arrays=[["a", "float32", [2**31, 2**31, 2**31]]]), f32(4)],
        r"elements, above the limit",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "huge declared shape, no frame",
        [header(type="STATUS", v=V, arrays=[["a", "float32", [2**40, 2**40]]])],
        r"elements, above the limit",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "negative dimension",
        [header(type="HEARTBEAT", v=V, arrays=[["a", "float32", [-4]]]), f32(4)],
        r"shape must be a list of non-negative ints",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "dtype not allowed",
        [header(type="HEARTBEAT", v=V, arrays=[["a", "object", [2]]]), b"x" * 16],
        r"dtype 'object' is not allowed",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "array frame missing",
        [
            header(type="HEARTBEAT", v=V, arrays=[["a", "float32", [1]], ["b", "float32", [1]]]),
            f32(1),
        ],
        r"declares 2 arrays but carries 1",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "undeclared extra frame",
        [header(type="HEARTBEAT", v=V), f32(2)],
        r"declares 0 arrays but carries 1",
        ARRAYS_ON_CLIENT_PORT,
    ),
    (
        "arrays not a list",
        [header(type="STATUS", v=V, arrays="float32")],
        r"'arrays' must be a list",
        None,
    ),
    (
        "bool array with a byte 7",
        [header(type="HEARTBEAT", v=V, arrays=[["m", "bool", [2]]]), b"\x01\x07"],
        r"bool values must be bytes 0 or 1",
        ARRAYS_ON_CLIENT_PORT,
    ),
]
# Refused requests with a well-formed header. Those the client handler refuses echo the
# request id ("req") in the ERROR; a type the port does not take fails in decode, whose ERROR
# carries no "req" (checked separately below).
WRONG_PORT = (
    "a worker message on the client port",
    dict(type="GRADS", v=V, req=101),
    r"unknown message type 'GRADS'",
)
CLIENT_REQUEST_FAILURES = [
    ("SUBMIT without spec", dict(type="SUBMIT", v=V, req=102), r"missing field 'spec'"),
    (
        "SUBMIT spec of the wrong kind",
        dict(type="SUBMIT", v=V, req=103, spec=[1, 2]),
        r"'spec' must be a table",
    ),
    (
        "CANCEL with a non-string job",
        dict(type="CANCEL", v=V, req=106, job=7),
        r"field 'job' of message CANCEL must be str",
    ),
    ("METRICS without job", dict(type="METRICS", v=V, req=107), r"missing field 'job'"),
]
# Well-formed requests that get an ordinary no (kind "refused", not counted as malformed).
CLIENT_REFUSALS = [
    (
        "SUBMIT invalid spec",
        dict(type="SUBMIT", v=V, req=104, spec={"name": "x", "global_batch": -3}),
        r"invalid job spec(.|\n)*global_batch",
    ),
    (
        "STATUS of an unknown job",
        dict(type="STATUS", v=V, req=105, job="job-424242"),
        r"no job 'job-424242'",
    ),
]
# Worker-port messages that decode but are refused by the worker handler.
WORKER_REQUEST_FAILURES = [
    (
        "a client message on the worker port",
        [header(type="SUBMIT", v=V, spec={})],
        r"unknown message type 'SUBMIT'",
    ),
    ("READY without worker id", [header(type="READY", v=V)], r"missing field 'worker'"),
    (
        "HEARTBEAT with a non-string worker id",
        [header(type="HEARTBEAT", v=V, worker=12)],
        r"field 'worker' of message HEARTBEAT must be str",
    ),
]


def _logged_drops(cluster) -> list[str]:
    with open(os.path.join(cluster.log_dir, "coordinator.log"), errors="replace") as f:
        return [line for line in f if "dropped a bad" in line]


def _request(sock, frames, timeout_s=10.0) -> wire.Message:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout_s * 1000)), "no reply from the client port"
    return wire.decode(sock.recv_multipart(), expect_types=wire.TO_CLIENT_TYPES)


class Live:
    """What the phases of the malformed-traffic test share: a client, a raw client-port
    socket, a raw worker-port socket (identity "malformed-sender", never registered), the
    running job and the model's parameter shapes."""

    def __init__(self, svc, cluster, c, job, shapes):
        self.svc, self.cluster, self.c, self.job, self.shapes = svc, cluster, c, job, shapes
        ctx = zmq.Context.instance()
        self.client_sock = ctx.socket(zmq.DEALER)
        self.worker_sock = ctx.socket(zmq.DEALER)
        for sock in (self.client_sock, self.worker_sock):
            sock.setsockopt(zmq.LINGER, 0)
        self.worker_sock.setsockopt(zmq.IDENTITY, b"malformed-sender")
        self.client_sock.connect(cluster.client_address)
        self.worker_sock.connect(cluster.worker_address)

    def close(self):
        self.client_sock.close(0)
        self.worker_sock.close(0)

    def counters(self):
        return self.c.status()["counters"]

    def counted(self, before, *keys, n=1, what=""):
        """Wait until the counters in `keys` together grew by n; the counters."""

        def grown():
            ct = self.counters()
            return ct if sum(ct.get(k, 0) - before.get(k, 0) for k in keys) >= n else None

        try:
            return self.svc.wait_for(grown, 10, f"counters {keys} to grow by {n} {what}")
        except TimeoutError as e:  # say what did move, for a post-mortem
            now = self.counters()
            moved = {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}
            raise TimeoutError(f"{e}; counters that moved: {moved}") from None

    def grads(self, arrays, **fields):
        # it claims its own connection's id: the coordinator refuses a GRADS that claims
        # another worker's id outright (checked in the second test)
        self.worker_sock.send_multipart(
            wire.encode(wire.GRADS, {"worker": "malformed-sender", **fields}, arrays)
        )

    def good(self):
        arrays = [(str(i), np.zeros(s, np.float32)) for i, s in enumerate(self.shapes)]
        return arrays + [("loss", np.zeros(1, np.float64))]


def _phase_malformed_traffic(live):
    """Every malformed message on both ports while rounds go on: client requests get an
    ERROR naming the problem (kind bad_message), ordinary refusals get kind refused and are
    not counted as malformed, worker-port drops are counted and logged."""
    c, job = live.c, live.job
    base = live.counters()
    round_before = c.status(job)["job"]["round"]
    for name, frames, pattern, client_pattern in DECODE_FAILURES:
        reply = _request(live.client_sock, frames)
        assert reply.type == wire.ERROR and reply["kind"] == "bad_message", (name, reply)
        assert re.search(client_pattern or pattern, reply["message"]), (name, reply["message"])
        live.worker_sock.send_multipart(frames)
    for name, fields, pattern in CLIENT_REQUEST_FAILURES + CLIENT_REFUSALS:
        reply = _request(live.client_sock, [header(**fields)])
        kind = "refused" if (name, fields, pattern) in CLIENT_REFUSALS else "bad_message"
        assert reply.type == wire.ERROR and reply["kind"] == kind, (name, reply)
        assert re.search(pattern, reply["message"]), (name, reply["message"])
        assert reply.get("req") == fields["req"], (name, reply.fields)
    name, fields, pattern = WRONG_PORT
    reply = _request(live.client_sock, [header(**fields)])
    assert reply.type == wire.ERROR and re.search(pattern, reply["message"]), reply
    reply = _request(live.client_sock, [header(type="FETCH", v=V, req=108, job=job)])
    assert reply.type == wire.ERROR and re.search(r"once it is done", reply["message"])
    assert reply["kind"] == "refused", reply.fields
    for _name, frames, _pattern in WORKER_REQUEST_FAILURES:
        live.worker_sock.send_multipart(frames)
    # a frame above the client port's transport cap (MAXMSGSIZE, 8 MiB): libzmq drops
    # that connection before buffering it; the coordinator must simply go on
    big = zmq.Context.instance().socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(live.cluster.client_address)
    big.send_multipart([header(type="STATUS", v=V, pad="x" * (9 << 20))])
    # the client port still answers a good request (and the job still runs)
    reply = _request(live.client_sock, [header(type="STATUS", v=V, req=109, job=job)])
    assert reply.type == wire.OK and reply["job"]["state"] == "running", reply.fields
    n_bad = 2 * len(DECODE_FAILURES) + len(CLIENT_REQUEST_FAILURES) + 1
    n_bad += len(WORKER_REQUEST_FAILURES)
    counters = live.counted(base, "bad_message", n=n_bad)
    assert counters["bad_message"] - base.get("bad_message", 0) == n_bad, counters
    assert counters["refused"] - base.get("refused", 0) == len(CLIENT_REFUSALS) + 1, counters
    now = c.status(job)["job"]
    assert now["state"] == "running" and now["round"] < now["total_rounds"], (
        "the job ended before the malformed traffic was over: make it longer",
        now,
    )
    assert now["round"] > round_before, "no round completed during the malformed traffic"
    assert live.worker_sock.poll(0) == 0, "the coordinator answered the worker port"
    big.close(0)
    # every worker-port drop is logged with its reason
    logged = _logged_drops(live.cluster)
    for name, _frames, pattern, *_ in DECODE_FAILURES + WORKER_REQUEST_FAILURES:
        assert any(re.search(pattern, line) for line in logged), (
            f"no logged drop for {name!r} (/{pattern}/)"
        )
    return n_bad


def _stall(live):
    """SIGSTOP one worker and wait for the round it holds blocks of to stall; (round, the
    stopped worker's last block in it, the process)."""
    c, job = live.c, live.job
    table = {w["pid"]: w["id"] for w in c.status()["workers"] if w["state"] == "alive"}
    assert len(table) == 2, c.status()["workers"]
    stopped = live.cluster.workers[-1]
    os.kill(stopped.pid, signal.SIGSTOP)
    victim = table[stopped.pid]
    last_block = assign_blocks(live.n_micro, sorted(table.values()), 2)[victim][-1]

    def settled():  # the round may finish once more (the victim may have just sent it)
        before = c.status(job)["job"]["round"]
        for _ in range(2):  # two round trips through the worker port behind any late GRADS
            counters = live.counters()
            live.grads(live.good(), job=job, round=before, block=[10**6, 10**6 + 1])
            live.counted(counters, "unknown_block", "late_grads")
        # Stalled on the victim's last block: still pending (a wrong-dtype GRADS for it is
        # dropped as malformed, not as a duplicate), so the round waits for the stopped
        # worker. A round still waiting for the live worker does not count: it moves on.
        counters = live.counters()
        live.grads(_wrong_dtype(live.good()), job=job, round=before, block=list(last_block))
        after = live.counted(counters, "bad_message", "duplicate_grads", "late_grads")
        pending = after.get("bad_message", 0) > counters.get("bad_message", 0)
        return before if pending and c.status(job)["job"]["round"] == before else None

    return live.svc.wait_for(settled, 30, "the round to stall"), tuple(last_block), stopped


def _wrong_dtype(arrays):
    return [(n, a.astype(np.float64 if a.dtype == np.float32 else np.float32)) for n, a in arrays]


def _phase_wrong_grads(live, rnd, last_block):
    """Well-formed but wrong GRADS for a block that IS pending: each a counted drop, and
    the round does not move."""
    c, job, good = live.c, live.job, live.good()
    wrong_shape = [(n, np.zeros(a.shape[::-1] + (1,), a.dtype)) for n, a in good]
    wrong_dtype = _wrong_dtype(good)
    variants = [
        ("wrong shape", wrong_shape),
        ("wrong dtype", wrong_dtype),
        ("loss array missing", good[:-1]),
        ("first array missing", good[1:]),
        ("int arrays", [(n, np.zeros(a.shape, np.int64)) for n, a in good]),
    ]
    for name, arrays in variants:
        before = live.counters()
        live.grads(arrays, job=job, round=rnd, block=list(last_block))
        after = live.counted(before, "bad_message", what=name)
        assert after["bad_message"] == before.get("bad_message", 0) + 1, (name, after)
    for name, fields in [
        ("GRADS without block", dict(job=job, round=rnd)),
        ("GRADS without round", dict(job=job, block=list(last_block))),
        ("GRADS without job", dict(round=rnd, block=list(last_block))),
    ]:
        before = live.counters()
        live.grads(good, **fields)
        live.counted(before, "bad_message", what=name)
    before = live.counters()
    live.worker_sock.send_multipart(
        wire.encode(wire.GRADS, {"job": job, "round": rnd, "block": list(last_block)}, good)
    )
    live.counted(before, "bad_message")  # no worker id at all
    # right arrays for the pending block, from a connection that never registered
    before = live.counters()
    live.grads(good, job=job, round=rnd, block=list(last_block))
    live.counted(before, "unknown_worker")
    # another job, another round: late; a block nobody holds: not accepted
    for name, fields, key in [
        ("wrong job", dict(job="job-999999", round=rnd, block=list(last_block)), "late_grads"),
        ("earlier round", dict(job=job, round=rnd - 1, block=list(last_block)), "late_grads"),
        ("future round", dict(job=job, round=rnd + 1000, block=list(last_block)), "late_grads"),
        ("block nobody holds", dict(job=job, round=rnd, block=[9999, 10000]), "unknown_block"),
        ("misaligned block", dict(job=job, round=rnd, block=[0, 3]), "unknown_block"),
        ("block not a list", dict(job=job, round=rnd, block="0-1"), "bad_message"),
    ]:
        before = live.counters()
        live.grads(good, **fields)
        live.counted(before, key, what=name)
    assert c.status(job)["job"]["round"] == rnd, "a wrong GRADS completed the round"
    assert "internal_error" not in live.counters()


def test_malformed_messages_on_both_ports_while_a_job_runs(make_cluster, svc):
    # verify 0: a checked block's copy would go to the stopped worker after its own blocks,
    # so its last own block could be in already while the round waits for the copy
    raw = svc.spec_with(svc.SPEC_SGD, name="protocol-live", epochs=15, verify=0.0)  # 210 rounds
    spec = parse_spec(raw)
    model = nn.build(list(spec.model), list(spec.input_shape), spec.seed)
    shapes = [p.data.shape for p in model.parameters()]
    ref_state, _ = svc.local_reference(raw)
    # long liveness: the SIGSTOPped worker must not be declared dead while it is stopped
    # liveness 60 and no backup tasks: the wrong-GRADS phase keeps a round stalled on purpose
    cluster = make_cluster(workers=2, liveness=60, env={"SHARDGRAD_MIN_DEADLINE": "600"})
    stopped = live = None
    try:
        with cluster.client(timeout=10) as c:
            job = c.submit(raw)
            svc.wait_for(lambda: c.status(job)["job"]["round"] >= 2, 60, "the job to run")
            live = Live(svc, cluster, c, job, shapes)
            live.n_micro = spec.n_micro_batches
            n_bad = _phase_malformed_traffic(live)
            rnd, last_block, stopped = _stall(live)
            _phase_wrong_grads(live, rnd, last_block)
            # ---- the job goes on to the bitwise-correct end ------------------------------
            os.kill(stopped.pid, signal.SIGCONT)
            stopped = None
            status = c.wait(job, timeout=90, poll=0.05)
            assert status["state"] == "done", status
            svc.assert_bitwise_equal(c.fetch(job), ref_state, "the job under malformed traffic")
            final = c.status()
            assert "internal_error" not in final["counters"], final["counters"]
            assert all(p.poll() is None for p in [cluster.coordinator, *cluster.workers])
        dropped = len(_logged_drops(cluster))
        assert dropped >= n_bad, f"only {dropped} logged drops for {n_bad} bad messages"
    finally:
        if stopped is not None:
            os.kill(stopped.pid, signal.SIGCONT)
        if live is not None:
            live.close()


def _probe_malformed_worker_fields(c, cluster, sock, wid, job, rnd):
    """A GRADS claiming the real worker's id from another connection; self-consistent
    probes whose READY `info` tries to overwrite the table or is not a map, and a GRADS
    whose block is a list of lists: each sanitised or refused, never an internal error."""
    base = c.status()["counters"]
    sock.send_multipart(
        wire.encode(wire.GRADS, {"worker": wid, "job": job, "round": rnd, "block": [0, 1]})
    )
    ctx = zmq.Context.instance()
    spoof, listy = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for probe, ident in ((spoof, b"probe-spoof"), (listy, b"probe-list-info")):
        probe.setsockopt(zmq.LINGER, 0)
        probe.setsockopt(zmq.IDENTITY, ident)
        probe.connect(cluster.worker_address)
    try:
        info = {"id": "spoofed", "state": "alive"}
        spoof.send_multipart([header(type="READY", v=V, worker="probe-spoof", info=info)])
        listy.send_multipart([header(type="READY", v=V, worker="probe-list-info", info=[1, 2])])
        block = [[0], [1]]
        fields = {"worker": "probe-spoof", "job": job, "round": rnd, "block": block}
        spoof.send_multipart(wire.encode(wire.GRADS, fields))
        wait_for(
            lambda: (
                c.status()["counters"].get("bad_message", 0) >= base.get("bad_message", 0) + 2
                and {"probe-spoof", "probe-list-info"} <= {w["id"] for w in c.status()["workers"]}
            ),
            "the coordinator to read the probes",
            10,
            retry=RETRY,
        )
    finally:
        spoof.close(0)
        listy.close(0)
    status = c.status()  # must not fail because of a malformed READY
    counters = status["counters"]
    assert counters.get("internal_error", 0) == base.get("internal_error", 0), (
        "a malformed worker message raised inside the coordinator",
        counters,
    )
    ids = [w["id"] for w in status["workers"]]
    assert "spoofed" not in ids, f"READY info overwrote the worker table's id: {ids}"


def test_worker_port_fields_of_the_wrong_kind_are_counted_drops(make_cluster, svc):
    """Well-formed worker messages whose *fields* have the wrong kind: a GRADS block that is
    a list of lists (for a block pending in the current round), a READY whose `info` is not
    a map, a READY whose `info` tries to overwrite the id / state columns of the worker
    table. Each must be a counted drop (or ignored), never an internal error, and STATUS /
    wait must keep working; the job still ends bitwise equal to train_local."""
    raw = svc.spec_with(svc.SPEC_SGD, name="protocol-fields", epochs=15, verify=0.0)
    ref_state, _ = svc.local_reference(raw)
    # No lease: a lone worker on one may have computed the rest of the job before the
    # SIGSTOP lands, so no round would be left pending on it.
    env = {"SHARDGRAD_MIN_DEADLINE": "600", "SHARDGRAD_LEASE_WINDOW": "0"}
    cluster = make_cluster(workers=1, liveness=60, env=env)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.worker_address)
    worker = cluster.workers[0]
    stopped = False
    try:
        with cluster.client(timeout=10) as c:
            job = c.submit(raw)
            svc.wait_for(lambda: c.status(job)["job"]["round"] >= 2, 60, "the job to run")
            (wid,) = [w["id"] for w in c.status()["workers"]]
            os.kill(worker.pid, signal.SIGSTOP)  # its round cannot complete: blocks pending
            stopped = True

            def settled():  # the round it is stuck in (it may finish the one it was in)
                before = c.status(job)["job"]
                assert before["state"] == "running", f"the job ended before the stall: {before}"
                probe = [header(type="HEARTBEAT", v=V, worker=wid)]
                sock.send_multipart(probe)  # a harmless round trip through the worker port
                return before["round"] if c.status(job)["job"]["round"] == before["round"] else None

            rnd = svc.wait_for(settled, 10, "the round to stall")
            _probe_malformed_worker_fields(c, cluster, sock, wid, job, rnd)
            os.kill(worker.pid, signal.SIGCONT)
            stopped = False
            done = c.wait(job, timeout=60, poll=0.05)
            assert done["state"] == "done", done
            svc.assert_bitwise_equal(c.fetch(job), ref_state, "the job after bad worker fields")
    finally:
        if stopped:
            os.kill(worker.pid, signal.SIGCONT)
        sock.close(0)
