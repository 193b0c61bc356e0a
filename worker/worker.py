"""A worker: register, heartbeat from its own thread, and turn TASKs into GRADS.

The loop is short on purpose: take the next message, compute the blocks a TASK assigns
(each block's micro-batches summed by the canonical tree, in shardgrad.training), send one
GRADS per block. Stale TASKs (a newer round of the same job is already queued) are skipped;
bad messages are logged and dropped. On SIGTERM it finishes its block, hands back the rest
(BYE) and leaves.
"""

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections import deque

import numpy as np
import zmq

from .. import wire
from ..jobspec import parse_spec
from ..training import JobRuntime

log = logging.getLogger("shardgrad.worker")


class Heartbeat(threading.Thread):
    """Sends HEARTBEAT every `interval` on its own socket, so a long backward never looks
    like death (and a stopped or killed process does)."""

    def __init__(self, ctx, address, worker_id, interval, security=None):
        super().__init__(daemon=True, name="heartbeat")
        self.ctx, self.address, self.worker_id, self.interval = ctx, address, worker_id, interval
        self.security = security
        self.stop = threading.Event()

    def run(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.worker_id}#hb".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # never queue up a backlog of stale heartbeats
        if self.security:
            self.security.apply(sock)
        sock.connect(self.address)
        try:
            while not self.stop.wait(self.interval):
                try:
                    wire.send_msg(
                        sock, wire.HEARTBEAT, {"worker": self.worker_id}, flags=zmq.NOBLOCK
                    )
                except zmq.Again:
                    pass
        finally:
            sock.close(0)


class Worker:
    def __init__(
        self,
        address,
        data_root=None,
        worker_id=None,
        heartbeat_interval=0.5,
        security=None,
        limits=wire.DEFAULT_LIMITS,
    ):
        self.address, self.data_root, self.limits = address, data_root, limits
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.interval, self.security = heartbeat_interval, security
        self.runtimes: dict[str, JobRuntime] = {}
        self.queue: deque = deque()
        self.stopping = False
        self.dropped = 0
        # Test hook: seconds of extra "compute" per micro-batch, to make rounds slow enough
        # for fault tests to land a signal mid-round. Never set in production.
        self.delay = float(os.environ.get("SHARDGRAD_FAULT_DELAY", "0") or 0)

    def run(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.id.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)  # let the BYE out on the way down
        wire.apply_socket_limits(self.sock, self.limits)
        if self.security:
            self.security.apply(self.sock)
        self.sock.connect(self.address)
        self.send(wire.READY, {"info": {"host": socket.gethostname(), "pid": os.getpid()}})
        heartbeat = Heartbeat(self.ctx, self.address, self.id, self.interval, self.security)
        heartbeat.start()
        log.info("worker %s connected to %s", self.id, self.address)
        returned = []
        try:
            while not self.stopping:
                if not self.queue:
                    if self.sock.poll(200):
                        self.drain()
                    continue
                msg = self.queue.popleft()
                if msg.type == wire.TASK:
                    returned = self.do_task(msg)
                elif msg.type == wire.STOP_JOB:
                    self.runtimes.pop(msg.get("job"), None)
        finally:
            self.send(wire.BYE, {"returned": returned})
            heartbeat.stop.set()
            heartbeat.join(2)
            self.sock.close()
            self.ctx.term()

    def send(self, msg_type, fields, arrays=None):
        wire.send_msg(self.sock, msg_type, {"worker": self.id, **fields}, arrays)

    def drain(self):
        while True:
            try:
                _, msg = wire.recv_msg(
                    self.sock, self.limits, expect_types=wire.TO_WORKER_TYPES, flags=zmq.NOBLOCK
                )
            except zmq.Again:
                return
            except wire.ProtocolError as e:
                self.dropped += 1
                log.warning("dropped a bad message: %s", e)
                continue
            self.queue.append(msg)

    def superseded(self, job, rnd):
        """A newer round of `job` is queued, or the job was stopped: this work is stale."""
        for m in self.queue:
            if m.get("job") != job:
                continue
            later = isinstance(m.get("round"), int) and m.get("round") > rnd
            if m.type == wire.STOP_JOB or (m.type == wire.TASK and later):
                return True
        return False

    def do_task(self, msg):
        """Compute and send every block of a TASK; the blocks not done if we must stop."""
        try:
            job, rnd, blocks, spec = wire.require(msg, "job", "round", "blocks", "spec")
            rt = self.runtime(job, spec)
            rt.set_weights([msg.arrays[str(i)] for i in range(len(rt.params))])
            blocks = [(int(lo), int(hi)) for lo, hi in blocks]
        except (wire.ProtocolError, KeyError, ValueError, TypeError) as e:
            self.dropped += 1
            log.warning("dropped a bad TASK: %s", e)
            return []
        for k, (lo, hi) in enumerate(blocks):
            self.drain()
            if self.superseded(job, rnd):
                return []
            if self.stopping:
                return [list(b) for b in blocks[k:]]
            t0 = time.perf_counter()
            grads = rt.block_grad(rnd, lo, hi)
            if self.delay:  # fault injection: a slow worker (numerics unchanged)
                time.sleep(self.delay * (hi - lo))
            fields = {
                "job": job,
                "round": rnd,
                "block": [lo, hi],
                "compute_s": time.perf_counter() - t0,
            }
            if not all(np.isfinite(g).all() for g in grads):
                fields["nonfinite"] = self.first_nonfinite(rt, rnd, lo, hi)
            names = [str(i) for i in range(len(grads) - 1)] + ["loss"]
            self.send(wire.GRADS, fields, list(zip(names, grads, strict=True)))
        return []

    @staticmethod
    def first_nonfinite(rt, rnd, lo, hi):
        for i in range(lo, hi):
            if not all(np.isfinite(g).all() for g in rt.micro_batch_grad(rnd, i)):
                return i
        return None

    def runtime(self, job, spec):
        rt = self.runtimes.get(job)
        if rt is None:
            log.info("loading job %s", job)
            # The coordinator verified the data at submit; a worker reads only its samples.
            rt = JobRuntime(parse_spec(spec, files=False), self.data_root, verify_data=False)
            self.runtimes = {job: rt}  # one job at a time: drop the previous one's data
        return rt


def main(address, data_root=None, worker_id=None, heartbeat_interval=0.5, security=None):
    worker = Worker(address, data_root, worker_id, heartbeat_interval, security)

    def stop(*_):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
