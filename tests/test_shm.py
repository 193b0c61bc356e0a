"""shardgrad/shm.py: the round's weights through shared memory for workers on the
coordinator's host. Bits are unchanged; a TASK that points outside the segment, or at a
segment that is not ours, is a ProtocolError; a worker that cannot read the segment asks for
the weights as frames instead (and then computes as usual)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import zmq

from shardgrad import shm, wire


def task(fields):
    return wire.Message(wire.TASK, fields)


@pytest.fixture
def board():
    b = shm.WeightsBoard()
    yield b
    b.close()


def test_weights_read_back_bit_for_bit(board):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) for s in [(64, 8), (64,), (3, 64)]]
    weights[1][0] = -0.0
    reader = shm.WeightsReader()
    try:
        got = reader.arrays(task(board.publish(weights, ("job", 0, 0))))
        for a, b in zip(weights, got, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
            assert not b.flags.writeable
        weights[0] += 1  # the next round: the same segment, rewritten
        got = reader.arrays(task(board.publish(weights, ("job", 0, 1))))
        assert got[0].tobytes() == weights[0].tobytes()
    finally:
        reader.close()


def test_the_segment_is_written_once_per_round(board):
    w = [np.ones(4, np.float32)]
    fields = board.publish(w, ("job", 0, 3))
    w[0][:] = 2  # changed in place, but the same (job, gen, round): not written again
    assert board.publish(w, ("job", 0, 3)) == fields
    view = np.ndarray((4,), np.float32, buffer=board.seg.buf)
    assert view.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "change, error",
    [
        ({"shm": "psm_1234"}, "not a name of ours"),
        ({"shm": "sg_" + "0" * 16}, "shared memory"),  # ours in form, but no such segment
        ({"shm_layout": [["float32", [1 << 20], 0]]}, "past the segment"),
        ({"shm_layout": [["float32", [4], -8]]}, "past the segment"),
        ({"shm_layout": [["object", [4], 0]]}, "is not allowed"),
        ({"shm_layout": [["float32", [4.0], 0]]}, "non-negative ints"),
        ({"shm_layout": [["float32", [4]]]}, "must be [dtype, shape, offset]"),
        ({"shm_layout": "all of it"}, "must be list"),
    ],
)
def test_a_task_that_points_anywhere_else_is_refused(board, change, error):
    fields = {**board.publish([np.ones(4, np.float32)], ("job", 0, 0)), **change}
    reader = shm.WeightsReader()
    with pytest.raises(wire.ProtocolError, match=error.replace("[", r"\[")):
        reader.arrays(task(fields))
    reader.close()


def test_only_ipc_workers_use_it():
    assert shm.usable("ipc:///tmp/x/workers")
    assert not shm.usable("tcp://10.0.0.2:5555")


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_read_the_segment_asks_for_frames(tmp_path):
    """A fake coordinator (this test) sends a TASK pointing at a segment that does not
    exist: the worker registers again without shared memory instead of failing."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/workers"
    router.bind(address)
    cmd = [sys.executable, "-m", "shardgrad.cli", "worker", "--coordinator-workers", address]
    proc = subprocess.Popen(cmd, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:

        def next_ready():
            while True:
                assert router.poll(30_000), "no READY from the worker"
                _, msg = wire.recv_msg(router, router=True)
                if msg.type == wire.READY:
                    return msg

        first = next_ready()
        assert first["info"]["shm"] is True  # it reaches us over ipc://
        fields = {"job": "j", "gen": 0, "round": 0, "blocks": [[0, 1]], "spec": {}}
        fields.update(shm="sg_" + "f" * 16, shm_layout=[["float32", [4], 0]])
        wire.send_msg(router, wire.TASK, fields, identity=first.envelope[0])
        again = next_ready()
        assert again["info"]["shm"] is False
    finally:
        proc.terminate()
        proc.wait(10)
        router.close(0)
        ctx.term()


def grads_msg(fields):
    return wire.Message(wire.GRADS, dict(fields))


def test_block_sums_through_the_ring_bit_for_bit_and_a_slot_waits_for_its_ack():
    ring, reader = shm.GradsRing(slots=2), shm.GradsReader()
    try:
        sums = [[np.full((3, 2), i, np.float32), np.array([i], np.float64)] for i in range(4)]
        first = ring.put(sums[0])
        second = ring.put(sums[1])
        assert (first["seq"], second["seq"]) == (1, 2)
        assert ring.put(sums[2]) is None  # both slots wait to be read: frames instead
        for fields, want in ((first, sums[0]), (second, sums[1])):
            msg = grads_msg(fields)
            reader.load("w", msg)
            reader.taken("w", msg)
            assert [msg.arrays["0"].tobytes(), msg.arrays["loss"].tobytes()] == [
                a.tobytes() for a in want
            ]
        assert reader.read["w"] == 2
        ring.ack(reader.read["w"])  # as the next TASK says
        third = ring.put(sums[2])
        msg = grads_msg(third)
        reader.load("w", msg)
        assert msg.arrays["0"].tobytes() == sums[2][0].tobytes()
        held = msg.arrays["0"]
        ring.ack(3)
        ring.put(sums[3])  # overwrites the slot: what was loaded is a copy, unchanged
        assert held.tobytes() == sums[2][0].tobytes()
    finally:
        reader.forget("w")
        ring.close()


def test_a_holding_reader_reads_in_place_and_acks_only_at_release():
    """The coordinator's reader: a sum is a view of its slot, not a copy, and its slot is
    acked (may be written again) only at release(), when the round is done with it; a
    copy asked for (a checked block) is one."""
    ring, reader = shm.GradsRing(slots=2), shm.GradsReader(hold=True)
    try:
        one, two = [np.full(4, 1.0, np.float32)], [np.full(4, 2.0, np.float32)]
        msg = grads_msg(ring.put(one))
        reader.load("w", msg)
        reader.taken("w", msg)
        view = msg.arrays["loss"]
        assert not view.flags.owndata and not view.flags.writeable
        checked = grads_msg(ring.put(two))
        reader.load("w", checked, copy=True)
        reader.taken("w", checked)
        assert checked.arrays["loss"].flags.owndata
        assert reader.read.get("w", 0) == 0, "nothing acked while the round may use it"
        ring.ack(reader.read.get("w", 0))
        assert ring.put(two) is None  # so the worker cannot write over the view
        assert view.tolist() == [1.0] * 4
        reader.release()
        assert reader.read["w"] == 2 and reader.seen == {}
        ring.ack(reader.read["w"])
        assert ring.put([np.full(4, 3.0, np.float32)]) is not None
        assert view.tolist() == [3.0] * 4  # (the round was over: the slot was its writer's)
        assert checked.arrays["loss"].tolist() == [2.0] * 4
    finally:
        reader.forget("w")
        ring.close()


def test_a_model_too_big_for_the_ring_goes_as_frames():
    ring = shm.GradsRing(slots=4, max_bytes=1024)
    assert ring.put([np.zeros(1024, np.float32)]) is None
    ring.close()


def test_a_ring_closes_while_a_sum_computed_into_it_is_still_referenced():
    """A worker computes sums straight into its ring's slots, and a lease's open
    accumulation may still hold one when the ring goes (a new job, shutdown): the segment
    is unlinked at once, and unmapped once nothing refers to it, never a BufferError."""
    ring = shm.GradsRing()
    held = ring.slot([((3,), np.float32)])
    held[0][:] = 1.0
    name = ring.seg.name
    ring.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    assert held[0].tolist() == [1.0, 1.0, 1.0]  # still mapped for whoever holds it
    del held  # (unmapped now: nothing to see, and nothing to crash)


def test_a_reader_closes_a_segment_while_a_view_of_it_lives():
    """The readers' views keep their mapping too: a segment closed (the worker left, a new
    ring) while a view of it lives is unmapped only when the view goes, never under it."""
    ring, reader = shm.GradsRing(), shm.GradsReader()
    try:
        fields = ring.put([np.full(3, 7.0, np.float32)])
        (view,) = reader.views(grads_msg(fields))
        reader.forget("w")  # nothing recorded for "w": closes nothing
        reader.close()
        assert reader.segs == {}
        assert view.tolist() == [7.0, 7.0, 7.0]  # still mapped for whoever holds it
        del view
    finally:
        ring.close()


def test_a_retired_ring_segment_stays_for_its_readers_until_two_more_retire():
    """After a lease of several ends, a worker's next sums go to a new segment: a slow peer
    (or a GRADS still in flight) reads the old one, untouched and still linked, until two
    newer segments have retired too."""
    ring, reader = shm.GradsRing(), shm.GradsReader()
    try:
        old = ring.put([np.full(3, 1.0, np.float32)])
        names = [old["shm"]]
        for value in (2.0, 3.0, 4.0):
            ring.retire()
            names.append(ring.put([np.full(3, value, np.float32)])["shm"])
            if value == 2.0:  # one retire on: the old sum is still there, by name
                msg = wire.Message(wire.GRADS, {**old, "worker": "w"}, {})
                reader.load("w", msg)
                assert msg.arrays["loss"].tolist() == [1.0, 1.0, 1.0]
        assert len(set(names)) == 4
        assert not os.path.exists(f"/dev/shm/{names[0]}")  # the third retire let it go
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names[1:])
    finally:
        ring.close()
        reader.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
