"""The worker's heartbeat: its own thread and socket, both ways (Paranoid Pirate)."""

import logging
import threading
import time

import zmq

from .. import wire

log = logging.getLogger("shardgrad.worker")


class Heartbeat(threading.Thread):
    """Sends HEARTBEAT every `interval` on its own socket, so a long backward never looks
    like death (and a stopped or killed process does); and listens for the coordinator's
    answers, so a silent coordinator is noticed here too (Paranoid Pirate, both ways)."""

    def __init__(
        self, ctx, address, worker_id, interval, liveness=5, security=None, info=None, idle=None
    ):
        super().__init__(daemon=True, name="heartbeat")
        self.ctx, self.address, self.worker_id, self.interval = ctx, address, worker_id, interval
        self.liveness, self.security = liveness, security
        # An aggregator's beats carry its role and worker count, so a restarted coordinator
        # that hears a beat before a READY still deals it the right share.
        self.info = info
        # A worker's beats say whether its main loop has nothing to do (an aggregator's: all
        # it was given has gone up): one that owes a block yet is idle lost a TASK or a
        # result on the way, and is asked again.
        self.idle = idle
        self.stop = threading.Event()
        self.reregister = threading.Event()  # set when the coordinator answers again

    def run(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.worker_id}#hb".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # never queue up a backlog of stale heartbeats
        if self.security:
            self.security.apply(sock)
        sock.connect(self.address)
        heard, silent, boot = time.monotonic(), False, None
        try:
            while not self.stop.is_set():
                try:
                    beat = {"worker": self.worker_id}
                    if self.info is not None:
                        beat["info"] = self.info()
                    if self.idle is not None:
                        beat["idle"] = self.idle()
                    wire.send_msg(sock, wire.HEARTBEAT, beat, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                deadline = time.monotonic() + self.interval
                while (wait := deadline - time.monotonic()) > 0 and not self.stop.is_set():
                    if sock.poll(wait * 1000):
                        heard = time.monotonic()  # any answer will do: it is alive
                        answer = _boot_of(sock)
                        if silent:
                            silent = False
                            log.warning("coordinator answers again: registering anew")
                            self.reregister.set()
                        elif answer is not None and boot is not None and answer != boot:
                            # restarted faster than `liveness` beats: it knows nothing of
                            # what we hold or offer (a lease, a peer port) until a READY
                            log.warning("coordinator restarted: registering anew")
                            self.reregister.set()
                        boot = answer if answer is not None else boot
                silence = time.monotonic() - heard
                if not silent and silence > self.interval * self.liveness:
                    silent = True
                    log.warning(
                        "coordinator silent for %.1f s (%d heartbeats unanswered)",
                        silence,
                        self.liveness,
                    )
        finally:
            sock.close(0)


def _boot_of(sock) -> str | None:
    """The answering process's boot id (a new one each start), or None if the answer
    has none or is not a well-formed HEARTBEAT."""
    try:
        _, msg = wire.recv_msg(sock, expect_types=(wire.HEARTBEAT,))
        return wire.field_of(msg, "boot", str, None)
    except wire.ProtocolError:
        return None
