"""worker/peers.py: what a member of a lease of several takes from its peers. Real ZeroMQ
sockets over ipc and real shared memory, in one process."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from shardgrad import wire
from shardgrad.shm import GradsRing
from shardgrad.worker.peers import Peers

LAYOUT = [((3, 2), np.dtype("float32")), ((1,), np.dtype("float64"))]


@pytest.fixture
def pair():
    ctx = zmq.Context()
    me, them = Peers(ctx, wire.DEFAULT_LIMITS), Peers(ctx, wire.DEFAULT_LIMITS)
    yield me, them
    me.close()
    them.close()
    ctx.term()


def _lease(lid=7, next_round=3):
    return SimpleNamespace(id=lid, engine=SimpleNamespace(next_round=next_round),
                           peers={"w2": ("ipc://unused", [(2, 4)])}, got={})  # fmt: skip


def _sums(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in LAYOUT]


def _send(them, me, fields, arrays=None):
    fields = {"worker": "w2", "lease": 7, "round": 3, "block": [2, 4], **fields}
    frames = (
        None if arrays is None else list(zip(wire.sum_names(len(arrays)), arrays, strict=False))
    )
    them.send([me.endpoint], fields, frames)


def _take_all(me, lease, n):
    """Take until `n` messages were received (kept, set aside or dropped)."""
    deadline = time.monotonic() + 10
    seen = 0
    while seen < n and time.monotonic() < deadline:
        if me.inbox.poll(100):
            while True:
                try:
                    msg = wire.recv_msg(me.inbox, flags=zmq.NOBLOCK)[1]
                except zmq.Again:
                    break
                seen += 1
                if msg.get("lease") != lease.id:
                    me.later.append(msg)
                else:
                    me.keep(lease, msg, LAYOUT)
    assert seen == n


def test_sums_as_frames_and_in_place_from_the_ring(pair):
    me, them = pair
    lease, sums = _lease(), _sums()
    _send(them, me, {}, sums)
    _take_all(me, lease, 1)
    assert all(np.array_equal(a, b) for a, b in zip(lease.got[3][(2, 4)], sums, strict=True))
    ring = GradsRing()
    try:
        slot = ring.slot(LAYOUT)
        for view, a in zip(slot, _sums(1), strict=True):
            view[...] = a
        _send(them, me, {"round": 4, **ring.put(slot)})
        _take_all(me, lease, 1)
        got = lease.got[4][(2, 4)]
        assert all(np.array_equal(a, b) for a, b in zip(got, _sums(1), strict=True))
        assert not got[0].flags.writeable  # a peer's ring is read, never written
        del got, slot
        lease.got.clear()
    finally:
        ring.close()


def test_what_a_peer_must_not_send_is_dropped(pair, caplog):
    me, them = pair
    lease = _lease()
    bad = [
        ({"block": [0, 2]}, _sums()),  # not its block
        ({"worker": "w9"}, _sums()),  # not a peer
        ({}, [np.zeros((2, 3), np.float32), np.zeros(1)]),  # the wrong shape
        ({}, [np.zeros((3, 2), np.float64), np.zeros(1)]),  # the wrong dtype
        ({}, _sums()[:1]),  # an array missing
        ({"shm": "sg_0123456789abcdef", "shm_layout": [], "seq": 1}, None),  # no such segment
        ({"shm": "/etc/passwd", "shm_layout": [], "seq": 1}, None),  # not a name of ours
        ({"block": "all"}, _sums()),
        ({"round": 2}, _sums()),  # a round it has stepped: stale, quietly
    ]
    for fields, arrays in bad:
        _send(them, me, fields, arrays)
    _take_all(me, lease, len(bad))
    assert lease.got == {} or all(not v for v in lease.got.values())
    assert caplog.text.count("dropped a bad SUMS") == len(bad) - 1


def test_sums_of_a_newer_lease_wait_for_it(pair):
    """A peer that got its TASK first sends for the new lease while we still hold the old
    one: kept aside, and taken when ours comes (dropped, we would wait forever)."""
    me, them = pair
    _send(them, me, {"lease": 8}, _sums())
    _take_all(me, _lease(7), 1)
    newer = _lease(8)
    me.take(newer, LAYOUT)
    assert (2, 4) in newer.got[3] and not me.later


def test_a_member_waiting_on_its_peers_says_it_is_idle_and_a_task_ends_the_wait(tmp_path):
    """A member whose peer never sends its sum waits, computing nothing: its heartbeats say
    it is idle (so the coordinator may ask it again for a block it still lacks from it),
    and a TASK ends the wait and the lease."""
    import threading

    from shardgrad.cluster import wait_for
    from shardgrad.worker.worker import Worker

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"ipc://{tmp_path}/c")
    w = Worker(f"ipc://{tmp_path}/c", worker_id="m1")
    w.sock = ctx.socket(zmq.DEALER)
    w.sock.setsockopt(zmq.IDENTITY, b"m1")
    w.sock.connect(f"ipc://{tmp_path}/c")
    w.peers = Peers(ctx, wire.DEFAULT_LIMITS)
    w.poller = zmq.Poller()
    w.poller.register(w.sock, zmq.POLLIN)
    w.poller.register(w.peers.inbox, zmq.POLLIN)
    engine = SimpleNamespace(next_round=3, rt=SimpleNamespace(sum_layout=lambda: LAYOUT))
    peers = {"w2": ("ipc://unused", [(2, 4)])}
    lease = SimpleNamespace(id=7, engine=engine, blocks=[(0, 2)], got={}, reports=False,
                            peers=peers, missing=lambda: True)  # fmt: skip
    w.lease = lease
    waiting = threading.Thread(target=w.advance, args=(lease, [_sums()]), daemon=True)
    try:
        waiting.start()
        wait_for(lambda: w.idle, "the member to say it is idle", 10)
        wire.send_msg(router, wire.TASK, {"job": "j", "round": 3}, identity=b"m1")
        waiting.join(10)
        assert not waiting.is_alive() and w.lease is None
        assert [m.type for m in w.queue] == [wire.TASK]
    finally:
        w.stopping = True
        waiting.join(10)
        w.peers.close()
        w.ring.close()
        w.sock.close(0)
        router.close(0)
        ctx.term()
