"""The worker's heartbeat thread against a real ROUTER playing the coordinator: an answer
from a restarted coordinator (a new boot id) makes the worker register anew, even when the
restart was too fast for any beat to go unanswered. Beats say whether the worker is idle."""

import time

import zmq

from shardgrad import wire
from shardgrad.worker.heartbeat import Heartbeat


def test_a_new_boot_id_in_the_answers_makes_the_worker_register_anew(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{tmp_path}/w")
    beat = Heartbeat(
        ctx, f"ipc://{tmp_path}/w", "w1", interval=0.02, liveness=1000, idle=lambda: True
    )

    def answer(boot, beats):
        for _ in range(beats):
            assert router.poll(10_000), "no heartbeat came"
            _, msg = wire.recv_msg(router, router=True, expect_types=(wire.HEARTBEAT,))
            assert msg["worker"] == "w1" and msg["idle"] is True  # (nothing to do)
            wire.reply(router, msg, wire.HEARTBEAT, {"boot": boot})

    try:
        beat.start()
        answer("first", 5)
        assert not beat.reregister.is_set(), "the same coordinator answering is no restart"
        answer("second", 1)
        deadline = time.monotonic() + 10
        while not beat.reregister.wait(0.05):
            answer("second", 1)
            assert time.monotonic() < deadline, "the worker did not see the restart"
    finally:
        beat.stop.set()
        beat.join(5)
        router.close(0)
        ctx.term()
