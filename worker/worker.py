"""A worker: register, heartbeat from its own thread, and turn TASKs into GRADS.

The loop is short on purpose: take the next message, compute the blocks a TASK assigns
(each block's micro-batches summed by the canonical tree, in shardgrad.training), send one
GRADS per block. If job code raises (building the model, loading data, a block), the
worker reports a FAULT for that block and goes on: a bad job fails alone, never the worker.
Stale TASKs (a newer round or timeline of the same job is already queued) are skipped;
bad messages are logged and dropped. On SIGTERM it finishes its block and says BYE.

A worker may get a lease with its TASK (the job's whole training state): it then steps
its own copy of the RoundEngine and runs up to `window` rounds ahead of the coordinator,
whose STEPPED messages move the window. Alone, it steps with its own sums; in a lease of
several (workers on one host), with everyone's, which its peers send it straight
(worker/peers.py). Any TASK ends the lease.
"""

import logging
import os
import secrets
import signal
import socket
import time
from collections import deque

import numpy as np
import zmq

from .. import wire
from ..core.sampling import all_finite, tiles
from ..engine import RoundEngine
from ..jobspec import parse_spec
from ..malloc import give_back_memory
from ..shm import GradsRing, WeightsReader, usable
from ..training import JobRuntime
from .heartbeat import Heartbeat
from .lease import Lease, lease_of
from .peers import Peers

log = logging.getLogger("shardgrad.worker")


class Worker:
    def __init__(
        self,
        address,
        data_root=None,
        worker_id=None,
        heartbeat_interval=0.5,
        security=None,
        limits=wire.DEFAULT_LIMITS,
        liveness=5,
    ):
        self.address, self.data_root, self.limits = address, data_root, limits
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.interval, self.security, self.liveness = heartbeat_interval, security, liveness
        self.runtimes: dict[str, JobRuntime] = {}
        self.shm = WeightsReader(limits) if usable(address) else None  # on the coordinator's host
        self.ring = GradsRing()  # block sums to it, when its TASKs say how far it has read
        self.queue: deque = deque()
        self.lease: Lease | None = None
        self.steps_seen: tuple = (None, 0)  # (lease id, round) of the newest STEPPED
        self.ended = None  # the lease a STEPPED {"end": true} last ended (it may come first)
        self.peers: Peers | None = None  # our port for a lease of several (on one host)
        self.stopping = False
        self.idle = False  # nothing queued, nothing to compute ahead: our heartbeats say so
        self.dropped = 0
        # Test hooks (docs/architecture.md, fault injection); never set in production.
        env = os.environ.get
        self.delay = float(env("SHARDGRAD_FAULT_DELAY", "0") or 0)  # s per micro-batch
        self.corrupt = float(env("SHARDGRAD_FAULT_CORRUPT", "0") or 0)  # P(noisy block sum)
        self.corrupt_after = int(env("SHARDGRAD_FAULT_CORRUPT_AFTER", "0") or 0)  # from round
        self.corrupt_rng = np.random.default_rng()
        self.raise_from = env("SHARDGRAD_FAULT_RAISE")  # job code raises from this round on

    def run(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.id.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)  # let the BYE out on the way down
        wire.apply_socket_limits(self.sock, self.limits)
        if self.security:
            self.security.apply(self.sock)
        self.sock.connect(self.address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        if self.shm is not None:  # on the coordinator's host: we may share a lease
            self.peers = Peers(self.ctx, self.limits, near=self.address)
            self.poller.register(self.peers.inbox, zmq.POLLIN)
        self.register()
        # (beats carry the READY's info: a restarted coordinator may hear a beat first)
        heartbeat = Heartbeat(
            self.ctx, self.address, self.id, self.interval, self.liveness, self.security,
            self.info, lambda: self.idle,
        )  # fmt: skip
        heartbeat.start()
        log.info("worker %s connected to %s", self.id, self.address)
        try:
            while not self.stopping:
                if heartbeat.reregister.is_set():
                    heartbeat.reregister.clear()
                    self.register()
                if not self.queue and self.lease is not None and self.lease.can_go():
                    self.idle = False
                    self.drain()  # (a STEPPED in it may end the lease)
                    if not self.queue and self.lease is not None:
                        self.run_ahead()
                    continue
                if not self.queue:
                    self.idle = True
                    if self.sock.poll(200):
                        self.drain()
                    continue
                self.idle = False
                msg = self.queue.popleft()
                if not _is_check(msg):
                    self.drop_lease()  # a TASK or STOP_JOB: the coordinator leads again
                if msg.type == wire.TASK:
                    self.do_task(msg)
                elif msg.type == wire.STOP_JOB:
                    self.runtimes.pop(msg.get("job"), None)
                    give_back_memory()  # (what we kept for its next step)
        finally:
            try:  # never connected (wrong key, no coordinator): nobody to say it to
                wire.send_msg(self.sock, wire.BYE, {"worker": self.id}, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            heartbeat.stop.set()
            heartbeat.join(2)
            self.ring.close()
            if self.shm is not None:
                self.shm.close()
            if self.peers is not None:
                self.peers.close()
            self.sock.close()
            self.ctx.term()

    def info(self) -> dict:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "shm": self.shm is not None,
                "lease": True, "follow": True}  # fmt: skip
        if self.peers is not None:
            info["peer"] = self.peers.endpoint
        return info

    def drop_lease(self):
        """We no longer run ahead. After a lease of several, our ring starts a new segment:
        within the lease, the lockstep kept us from writing a slot a peer might still read
        (worker/peers.py); outside it nothing does, and a peer may be slow to learn the end."""
        if self.lease is not None and self.lease.peers:
            self.ring.retire()
        self.lease = None

    def register(self):
        self.drop_lease()  # READY says we hold nothing
        self.send(wire.READY, {"info": self.info()})

    def send(self, msg_type, fields, arrays=None):
        wire.send_msg(self.sock, msg_type, {"worker": self.id, **fields}, arrays)

    def drain(self):
        # (asking first: a receive that finds nothing raises, and that costs more)
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
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
            if msg.type == wire.STEPPED:
                self.stepped(msg)
            elif msg.type != wire.HEARTBEAT:
                self.queue.append(msg)

    def stepped(self, msg):
        """The coordinator stepped rounds before msg["round"]: the lease's window moves."""
        self.ring.ack(msg.get("grads_ack"))
        lid, rnd = msg.get("lease"), msg.get("round")
        if type(lid) is int and type(rnd) is int:
            self.steps_seen = (lid, rnd)  # (it may come before its lease is set up)
            if self.lease is not None and lid == self.lease.id:
                self.lease.known = max(self.lease.known, rnd)
        if msg.get("end") is True:  # a lease of several ended: a peer will not go on
            self.ended = lid
            if self.lease is not None and lid == self.lease.id:
                self.drop_lease()

    def superseded(self, job, when):
        """A newer round (or rollback timeline) of `job` is queued, or the job was stopped:
        this work is stale."""
        for m in self.queue:
            if m.get("job") != job:
                continue
            if m.type == wire.STOP_JOB or (m.type == wire.TASK and _when(m) > when):
                return True
        return False

    def do_task(self, msg):
        """Compute and send every block of a TASK (FAULT for a block whose code raises); with
        a lease, step our own engine and go on ahead (run_ahead)."""
        try:
            job, rnd, blocks, spec = wire.require(msg, "job", "round", "blocks", "spec")
            blocks = [(int(lo), int(hi)) for lo, hi in blocks]
            when = _when(msg)
            lease = lease_of(msg)
            weights = None if lease else self.weights_of(msg)
            by_shm = self.shm is not None and "grads_ack" in msg  # it reads our ring
            self.ring.ack(msg.get("grads_ack"))
        except (wire.ProtocolError, ValueError, TypeError) as e:
            self.dropped += 1
            log.warning("dropped a bad TASK: %s", e)
            return
        if _is_check(msg) and self.lease is not None and self.lease.job == job:
            return self.check(msg, job, rnd, blocks, weights)
        rt = engine = setup_error = None
        try:  # once per TASK, not per block: the weights are the same for all of them
            rt = self.runtime(job, spec)
            if lease is not None:
                engine = RoundEngine(rt)
                engine.restore(lease[2], lease[3])  # the weights, optimizer, accumulation, buffers
            else:
                rt.set_weights(weights)
        except Exception as e:  # job code (model, data): every block reports it
            setup_error = e
        stale = lambda: self.superseded(job, when)  # noqa: E731
        share = self.sharing(lease[0], lease[4]) if lease is not None else None
        sums = self.compute_blocks(job, rnd, blocks, rt, stale, by_shm, setup_error,
                                   extra=_timeline(msg), share=share)  # fmt: skip
        if sums is not None and engine is not None and engine.next_round == rnd:
            peers = lease[4]
            everyone = blocks + [b for _, theirs in peers.values() for b in theirs]
            able = not peers or self.peers is not None  # (granted only to those with a port)
            if tiles(rt.n_micro, everyone) and self.ended != lease[0] and able:
                self.lease = Lease(job, *lease[:2], blocks, engine, by_shm, peers, *lease[5:])
                if self.lease.follow:  # what we put from now on only our peers read
                    self.ring.peers_only()
                if self.peers is not None:
                    self.peers.only(peers)  # (those who left: their sockets and rings go)
                if self.steps_seen[0] == lease[0]:
                    self.lease.known = max(self.lease.known, self.steps_seen[1])
                self.advance(self.lease, sums)

    def check(self, msg, job, rnd, blocks, weights):
        """A peer's blocks to check, on the round's weights, while our lease goes on: its
        engine shares our parameters, so they are put back after."""
        rt, when = self.lease.engine.rt, _when(msg)
        ours = [np.array(p.data, copy=True) for p in rt.params]
        try:
            rt.set_weights(weights)
        except Exception as e:  # (the coordinator's weights: what raises here is malformed)
            self.dropped += 1
            log.warning("dropped a bad check TASK: %s", e)
        else:
            stale = lambda: self.superseded(job, when)  # noqa: E731
            # As frames: a put into our ring would bring the reuse of a slot a peer may
            # still read closer (worker/peers.py).
            self.compute_blocks(job, rnd, blocks, rt, stale, by_shm=False, extra=_timeline(msg))
        finally:
            rt.set_weights(ours)

    def run_ahead(self):
        """One round of the lease, on our own weights; a message from the coordinator
        (a TASK, STOP_JOB) ends it, as does a block that raises or is not finite."""
        lease = self.lease
        rnd, stale = lease.engine.next_round, lambda: not all(map(_is_check, self.queue))
        share = self.sharing(lease.id, lease.peers)
        extra = {"lease": lease.id}
        t0 = time.perf_counter()
        sums = self.compute_blocks(lease.job, rnd, lease.blocks, lease.engine.rt, stale,
                                   lease.by_shm, extra=extra, share=share,
                                   report=not lease.follow)  # fmt: skip
        lease.compute_s = time.perf_counter() - t0
        if sums is None:
            self.drop_lease()
        else:
            self.advance(lease, sums)

    def sharing(self, lease_id, peers):
        """What tells a lease's peers where each of our sums is (None: it has none). It goes
        before our GRADS: they wait for it, the coordinator does not."""
        if not peers or self.peers is None:
            return None
        endpoints = [endpoint for endpoint, _ in peers.values()]

        def share(rnd, block, grads, ring):
            fields = {"worker": self.id, "lease": lease_id, "round": rnd, "block": list(block)}
            frames = None if ring else list(zip(wire.sum_names(len(grads)), grads, strict=True))
            self.peers.send(endpoints, {**fields, **(ring or {})}, frames)

        return share

    def advance(self, lease, sums):
        """Step the lease with its round's sums: ours, and in a lease of several our peers'
        (ours went to them as they were made). Should the coordinator speak meanwhile, the
        lease ends."""
        rnd, known = lease.engine.next_round, dict(zip(lease.blocks, sums, strict=True))
        if lease.peers:
            layout = lease.engine.rt.sum_layout()
            self.peers.take(lease, layout)  # (what came before this lease did)
            while lease.missing():
                while self.queue and _is_check(self.queue[0]):  # (a peer waits on it too)
                    self.idle = False
                    self.do_task(self.queue.popleft())
                if self.stopping or self.queue or self.lease is not lease:
                    self.drop_lease()
                    return
                # Waiting, not computing: our heartbeats say so. Should the coordinator
                # still lack a sum of ours (or a lease end never reach us), it asks again
                # past its deadline, and its TASK ends the wait.
                self.idle = True
                ready = dict(self.poller.poll(200))
                if self.sock in ready:
                    self.drain()
                if self.peers.inbox in ready:
                    self.peers.take(lease, layout)
            known.update(lease.got[rnd])
            self.idle = False
        lease.step(known)
        if lease.reports and lease.sync_due():
            self.send_state(lease)

    def send_state(self, lease):
        """Our training state, to the coordinator that follows our lease (a copy: our
        arrays step on while the frames are on their way), with the rows since the last."""
        state, meta = lease.engine.pack(copy=True)
        meta["metrics"] = []
        fields = {"job": lease.job, "lease": lease.id, "round": lease.engine.next_round,
                  "rows": lease.rows, "state": meta}  # fmt: skip
        lease.rows = []
        self.send(wire.STATE, fields, [(f"state.{k}", a) for k, a in state.items()])

    def compute_blocks(
        self,
        job,
        rnd,
        blocks,
        rt,
        stale,
        by_shm,
        setup_error=None,
        extra=None,
        share=None,
        report=True,
    ):
        """Send each block's sum (a FAULT if it raises); the sums if all went out finite.
        A finite sum goes to `share(rnd, block, sum, ring fields or None)` first, and to the
        coordinator only if `report` (a lease it follows: only what is not finite)."""
        sums, clean = [], True
        for lo, hi in blocks:
            self.drain()
            if self.stopping or stale():
                return None
            fields = {"job": job, "round": rnd, "block": [lo, hi], **(extra or {})}
            try:
                if setup_error is not None:
                    raise setup_error
                t0 = time.perf_counter()
                if self.raise_from is not None and rnd >= int(self.raise_from):
                    raise RuntimeError(f"injected fault (SHARDGRAD_FAULT_RAISE={self.raise_from})")
                # Straight into the ring's next slot when it has one: no copy of the sum.
                slot = self.ring.slot(rt.sum_layout()) if by_shm else None
                grads = rt.block_grad(rnd, lo, hi, out=slot)
            except Exception as e:  # job code: report it, stay alive for other work
                self.fault(fields, e)
                clean = False
                continue
            if self.delay:  # fault injection: a slow worker (numerics unchanged)
                time.sleep(self.delay * (hi - lo))
            fields["compute_s"] = time.perf_counter() - t0
            if not all_finite(grads):
                fields["nonfinite"] = self.first_nonfinite(rt, rnd, lo, hi)
                clean = False
            if self.corrupt and rnd >= self.corrupt_after:
                self.maybe_corrupt(grads)
            ring = self.ring.put(grads) if by_shm else None
            if share is not None and "nonfinite" not in fields:
                share(rnd, (lo, hi), grads, ring)
            if not report and "nonfinite" not in fields:
                sums.append(grads)
                continue
            if ring is not None:
                self.send(wire.GRADS, {**fields, **ring})
            else:
                names = wire.sum_names(len(grads))
                self.send(wire.GRADS, fields, list(zip(names, grads, strict=True)))
            sums.append(grads)
        return sums if clean else None

    def weights_of(self, msg) -> list | None:
        """The weights a TASK carries: in shared memory, or its frames "0", "1", .... If
        they cannot be read here, ask for frames from now on: READY re-sends what we owe."""
        if "shm" not in msg:  # (a count that does not fit the model fails in set_weights)
            return [msg.arrays.get(str(i)) for i in range(len(msg.arrays))]
        if self.shm is not None:
            try:
                return self.shm.arrays(msg)
            except wire.ProtocolError as e:
                log.warning("cannot read the weights from shared memory (%s): using frames", e)
                self.shm = None
        self.register()
        raise wire.ProtocolError("the TASK's weights are in shared memory we cannot read")

    def fault(self, fields, exc):
        micro = getattr(exc, "micro_batch", None)
        error = f"{type(exc).__name__}: {exc}"
        log.warning("job %s round %d block %s raised %s", fields["job"], fields["round"],
                    fields["block"], error, exc_info=True)  # fmt: skip
        fields = {**fields, "error": error[:2000]}
        if type(micro) is int:
            fields["micro_batch"] = micro
        self.send(wire.FAULT, fields)

    def maybe_corrupt(self, grads):
        """Fault injection: a dishonest worker adds noise to a fraction of its block sums."""
        if self.corrupt_rng.random() < self.corrupt:
            g = grads[0]
            grads[0] = g + self.corrupt_rng.normal(0, 1e-3, g.shape).astype(g.dtype)

    @staticmethod
    def first_nonfinite(rt, rnd, lo, hi):
        for i in range(lo, hi):
            if not all_finite(rt.micro_batch_grad(rnd, i)):
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


def _is_check(msg) -> bool:
    """A TASK that only asks a member of a lease of several to check a peer's block."""
    return msg.type == wire.TASK and msg.get("check") is True


def _timeline(msg) -> dict:
    """The fields that say which timeline a TASK's sums belong to, echoed in each GRADS
    and FAULT: a sum of an abandoned one (a rollback, a coordinator restart) is late."""
    boot = msg.get("boot")
    return wire.timeline(_when(msg)[0], boot if isinstance(boot, str) else None)


def _when(msg) -> tuple[int, int]:
    """A TASK's place in its job's history: (rollback timeline, round)."""
    gen, rnd = msg.get("gen", 0), msg.get("round")
    if type(gen) is not int or type(rnd) is not int:
        raise ValueError(f"TASK 'gen' and 'round' must be integers, got {gen!r}, {rnd!r}")
    return gen, rnd


def main(
    address, data_root=None, worker_id=None, heartbeat_interval=0.5, security=None, liveness=5
):
    worker = Worker(address, data_root, worker_id, heartbeat_interval, security, liveness=liveness)

    def stop(*_):
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()
