"""The coordinator: a ZeroMQ server that runs one job at a time on the live workers.

It reads top to bottom as a state machine. Each pass of `serve` drains the two ROUTER
sockets (workers, clients) and then `tick`s:

    no job ──(queued job, min_workers live)──> running ──(all rounds)──> done
                                               │  ^
               (fewer than min_workers live)   v  │ (workers back)
                                               paused

A running job's round: TASK to every live worker (its aligned blocks + current weights),
GRADS back per block, tree completed, optimizer stepped, next round. Dead workers' blocks
are re-issued in the same round, stragglers get backups, late results are ignored.
"""

import logging
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import zmq

from .. import wire
from ..core.sampling import add_arrays
from ..jobspec import SpecError, parse_spec
from ..security import Gate
from ..training import JobRuntime, weights_digest
from . import checkpoint
from .clients import ClientHandler
from .http import http_server
from .membership import Membership
from .rounds import Round
from .store import Store

log = logging.getLogger("shardgrad.coordinator")


@dataclass
class Config:
    heartbeat_interval: float = 0.5  # seconds between worker heartbeats
    liveness: int = 5  # missed heartbeats before a worker is dead (2.5 s by default)
    min_deadline: float = 5.0  # a round's straggler deadline is never shorter than this
    deadline_factor: float = 3.0  # ... and otherwise this many times the median round
    blocks_per_worker: int = 2
    max_queued_jobs: int = 100
    limits: wire.Limits = field(default_factory=lambda: wire.DEFAULT_LIMITS)
    # The client port gets much tighter limits (requests carry no arrays), a small queue per
    # peer and a per-peer token bucket (messages/s, burst); rate 0 turns the bucket off.
    client_limits: wire.Limits = field(default_factory=lambda: wire.CLIENT_PORT_LIMITS)
    client_hwm: int = 100
    client_rate: float = 200.0
    client_burst: int = 400
    worker_rate: float = 2000.0  # per worker connection: far above heartbeats + GRADS
    worker_burst: int = 4000


@dataclass
class ActiveJob:
    id: str
    rt: JobRuntime
    opt: object
    next_round: int = 0
    acc: list | None = None
    round: Round | None = None
    weights: list = field(default_factory=list)  # snapshot sent to workers this step
    spec: dict = field(default_factory=dict)  # the spec as sent in every TASK, built once
    metrics: list = field(default_factory=list)
    round_times: list = field(default_factory=list)
    state: str = "running"


class Coordinator:
    def __init__(
        self, worker_bind, client_bind, state_dir, data_root=None, config=None, auth=None, http=None
    ):
        self.cfg = config or Config()
        self.data_root = data_root
        self.store = Store(state_dir)
        self.members = Membership(self.cfg.heartbeat_interval, self.cfg.liveness)
        self.counters: Counter = Counter()
        self.job: ActiveJob | None = None
        self.stopping = False
        self.ctx = zmq.Context()
        self.workers = self._router(worker_bind, auth and auth.worker_domain)
        self.clients = self._router(
            client_bind, auth and auth.client_domain, self.cfg.client_limits, self.cfg.client_hwm
        )
        self.limits = {self.workers: self.cfg.limits, self.clients: self.cfg.client_limits}
        # Per-message admission: revoked keys (ZAP only checks at connect) and client rates.
        cfg = self.cfg
        self.gate = Gate(
            self, auth, cfg.client_rate, cfg.client_burst, cfg.worker_rate, cfg.worker_burst
        )
        self.worker_endpoint = self.workers.getsockopt_string(zmq.LAST_ENDPOINT)
        self.client_endpoint = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.client_handler = ClientHandler(self)
        self.http = http_server(http, self.store.dir)  # dashboard, JSON API, /metrics
        if auth is None:
            log.warning(
                "running without --keys: anyone who can reach %s and %s can join or submit",
                self.worker_endpoint,
                self.client_endpoint,
            )

    def _router(self, bind, domain, limits=None, hwm=1000):
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send is an error, not a drop
        sock.setsockopt(zmq.LINGER, 0)
        wire.apply_socket_limits(sock, limits or self.cfg.limits, hwm)
        if domain:
            domain.apply(sock)
        sock.bind(bind)
        return sock

    # ---- the loop -------------------------------------------------------------------------
    def serve(self):
        poller = zmq.Poller()
        poller.register(self.workers, zmq.POLLIN)
        poller.register(self.clients, zmq.POLLIN)
        log.info(
            "coordinator: workers on %s, clients on %s", self.worker_endpoint, self.client_endpoint
        )
        try:
            while not self.stopping:
                ready = dict(poller.poll(timeout=50))
                if self.workers in ready:
                    self._drain(self.workers, wire.WORKER_TYPES, self.on_worker)
                if self.clients in ready:
                    self._drain(self.clients, wire.CLIENT_TYPES, self.client_handler.handle)
                self.tick()
                self.http.publish(self)  # a fresh snapshot for the HTTP threads, <= 4/s
        finally:
            self.shutdown()

    def _drain(self, sock, types, handler, budget=256):
        for _ in range(budget):
            try:
                _, msg = wire.recv_msg(
                    sock, self.limits[sock], router=True, expect_types=types, flags=zmq.NOBLOCK
                )
            except zmq.Again:
                return
            except wire.ProtocolError as e:
                self.counters["bad_message"] += 1
                log.warning("dropped a bad message: %s", e)
                if sock is self.clients and e.envelope:
                    self._send(sock, e.envelope, wire.ERROR, {"message": str(e)})
                continue
            if not self.gate.admit(sock, msg):
                continue
            try:
                handler(msg)
            except wire.ProtocolError as e:
                self.counters["bad_message"] += 1
                log.warning("dropped a bad %s message: %s", msg.type, e)
                if sock is self.clients:
                    self._send(
                        sock, msg.envelope, wire.ERROR, {"message": str(e), "req": msg.get("req")}
                    )
            except Exception as e:  # a bug must cost one request, never the coordinator
                self.counters["internal_error"] += 1
                log.exception("error handling %s", msg.type)
                if sock is self.clients:
                    self._send(
                        sock,
                        msg.envelope,
                        wire.ERROR,
                        {"message": f"internal error: {e}", "req": msg.get("req")},
                    )

    def _send(self, sock, identity, msg_type, fields=None, arrays=None) -> bool:
        try:
            wire.send_msg(sock, msg_type, fields, arrays, identity=identity, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH (gone) or EAGAIN (its queue is full)
            self.counters["unroutable"] += 1
            log.info("could not send %s: %s", msg_type, e)
            return False

    def tick(self):
        for wid in self.members.sweep():
            log.warning(
                "worker %s is dead (no heartbeat for %.1f s)",
                wid,
                self.cfg.heartbeat_interval * self.cfg.liveness,
            )
            self.counters["workers_died"] += 1
        job = self.job
        if job is None:
            self.start_next_job()
        elif job.round is None:
            self.start_round()
        else:
            self.repair_round()

    # ---- workers --------------------------------------------------------------------------
    def on_worker(self, msg):
        wid = wire.field_of(msg, "worker", str)
        # The id a worker claims must be the identity of the connection it speaks on (its
        # heartbeat socket's is id + "#hb"): nobody can speak for another worker.
        expected = f"{wid}#hb" if msg.type == wire.HEARTBEAT else wid
        if not msg.envelope or msg.envelope[0] != expected.encode():
            raise wire.ProtocolError(f"{msg.type} claims worker {wid!r} from another connection")
        if msg.type == wire.BYE:
            self.members.leave(wid)
            log.info("worker %s left", wid)
            return
        if self.members.heard(wid, _worker_info(msg) if msg.type == wire.READY else None):
            log.info("worker %s joined", wid)
        if msg.type == wire.GRADS:
            self.on_grads(wid, msg)

    def on_grads(self, wid, msg):
        job, r = self.job, self.job and self.job.round
        job_id, rnd, block = wire.require(msg, "job", "round", "block")
        if r is None or job_id != job.id or rnd != r.index:
            self.counters["late_grads"] += 1  # an earlier round, or a cancelled job
            return
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int for b in block)):
            raise wire.ProtocolError(f"GRADS 'block' must be [lo, hi] integers, got {block!r}")
        block = tuple(block)
        if block not in r.holders:
            self.counters["unknown_block"] += 1
            return
        if block in r.delivered:
            self.counters["duplicate_grads"] += 1
            return
        arrays = self._check_grads(msg, job)
        bad = next((i for i, a in enumerate(arrays) if not np.isfinite(a).all()), None)
        if bad is not None:
            return self.on_bad_numerics(wid, block, msg.get("nonfinite"))
        r.deliver(block, arrays, wid, float(msg.get("compute_s", 0.0)))
        self.members.workers[wid].blocks_done += 1
        if r.complete():
            self.finish_round()

    def _check_grads(self, msg, job):
        want = [(p.shape, p.dtype) for p in job.rt.params] + [((1,), np.dtype(np.float64))]
        names = [str(i) for i in range(len(job.rt.params))] + ["loss"]
        arrays = []
        for name, (shape, dtype) in zip(names, want, strict=True):
            a = msg.arrays.get(name)
            if a is None or a.shape != shape or a.dtype != dtype:
                got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
                raise wire.ProtocolError(
                    f"GRADS array '{name}': expected {dtype}{list(shape)}, got {got}"
                )
            arrays.append(a)
        return arrays

    def on_bad_numerics(self, wid, block, where):
        r = self.job.round
        r.failures.setdefault(block, []).append(wid)
        which = (
            f"micro-batch {where}"
            if isinstance(where, int)
            else f"micro-batches {block[0]}..{block[1] - 1}"
        )
        if len(r.failures[block]) >= 2:
            return self.fail_job(
                f"round {r.index}, {which}: the gradient has NaN/Inf again after recomputing "
                f"on another worker ({', '.join(r.failures[block])}); the data or the learning "
                "rate is at fault, not the cluster"
            )
        log.warning("round %d %s from %s has NaN/Inf: recomputing elsewhere", r.index, which, wid)
        r.holders[block] = set()
        self.send_blocks(r.reissue([block], self.members.live(), avoid={wid}))

    # ---- jobs -----------------------------------------------------------------------------
    def start_next_job(self):
        row = self.store.next_job()
        if row is None:
            return
        if row["state"] == "queued" and len(self.members.live()) < row["spec"]["min_workers"]:
            return  # FIFO: the head of the queue waits for its workers
        try:
            spec = parse_spec(row["spec"], files=False)
            rt = self.client_handler.prepared.pop(row["id"], None) or JobRuntime(
                spec, self.data_root
            )
        except (SpecError, ValueError, OSError) as e:
            self.store.update(row["id"], state="failed", error=f"could not start: {e}")
            return
        job = ActiveJob(row["id"], rt, rt.make_optimizer(), spec=rt.spec.to_dict())
        ckpt = self.store.load_checkpoint(job.id)
        if ckpt is not None:
            checkpoint.restore(job, *ckpt)
            log.info("job %s resumes from its checkpoint at round %d", job.id, job.next_round)
        job.weights = [w.copy() for w in rt.weights()]
        self.job = job
        self.store.update(job.id, state="running", round=job.next_round)
        self.start_round()

    def start_round(self):
        job = self.job
        live = self.members.live()
        if len(live) < job.rt.spec.min_workers:
            if job.state != "paused":
                log.warning(
                    "job %s paused: %d live worker(s), needs %d",
                    job.id,
                    len(live),
                    job.rt.spec.min_workers,
                )
                job.state = "paused"
                self.store.update(job.id, state="paused")
            return
        if job.state == "paused":
            log.info("job %s resumed with %d workers", job.id, len(live))
            job.state = "running"
            self.store.update(job.id, state="running")
        job.round = Round(job.next_round, job.rt.n_micro, live, self.cfg.blocks_per_worker)
        self.send_blocks(job.round.assignment)

    def send_blocks(self, assignment: dict):
        job, r = self.job, self.job.round
        arrays = [(str(i), w) for i, w in enumerate(job.weights)]
        for wid, blocks in assignment.items():
            if not blocks:
                continue
            fields = {
                "job": job.id,
                "round": r.index,
                "blocks": [list(b) for b in blocks],
                "spec": job.spec,
            }
            if not self._send(self.workers, wid.encode(), wire.TASK, fields, arrays):
                self.members.leave(wid)  # unreachable: repair_round re-issues its blocks

    def repair_round(self):
        """Re-issue what dead workers held; back up stragglers past the deadline."""
        job, r = self.job, self.job.round
        live = self.members.live()
        orphans = r.orphans(set(live))
        if orphans and live:
            log.info("round %d: re-issuing %d block(s) of lost workers", r.index, len(orphans))
            self.send_blocks(r.reissue(orphans, live))
        elif orphans and job.state != "paused":
            job.state = "paused"
            self.store.update(job.id, state="paused")
        elif not orphans and job.state == "paused" and live:
            job.state = "running"
            self.store.update(job.id, state="running")
        if time.monotonic() - r.started > self.deadline():
            idle = r.idle(live)
            slow = [b for b in r.pending() if len(r.holders[b]) == 1]
            if idle and slow:
                backups = slow[: len(idle)]
                log.info("round %d: backing up %d straggling block(s)", r.index, len(backups))
                self.counters["backup_blocks"] += len(backups)
                self.send_blocks(r.reissue(backups, idle))

    def deadline(self):
        recent = self.job.round_times[-20:]
        median = statistics.median(recent) if recent else 0.0
        return max(self.cfg.min_deadline, self.cfg.deadline_factor * median)

    def finish_round(self):
        job, rt, r = self.job, self.job.rt, self.job.round
        t0 = time.monotonic()
        total = r.total()
        t1 = time.monotonic()
        job.acc = total if job.acc is None else add_arrays(job.acc, total)
        row = {
            "round": r.index,
            "epoch": rt.position(r.index)[0],
            "round_loss": float(total[-1][0]) / rt.global_batch,
        }
        if rt.group_end(r.index):
            row["loss"] = rt.apply_step(job.opt, job.acc, rt.group_samples(r.index))
            job.acc = None
            job.weights = [w.copy() for w in rt.weights()]
        t2 = time.monotonic()
        round_s = t2 - r.started
        compute = max(r.compute_s.values(), default=0.0)
        row.update(
            round_s=round_s,
            compute_s=compute,
            reduce_s=t1 - t0,
            step_s=t2 - t1,
            overhead_s=round_s - compute,
            transfer_s=round_s - compute - (t2 - t0),  # messaging and waiting, the rest
            workers=len(r.compute_s),
            samples_per_s=rt.global_batch / max(round_s, 1e-9),
        )
        # The deadline adapts to how long the healthy half of a round takes, so a
        # persistent straggler cannot stretch it to its own pace.
        job.round_times.append(r.half_time if r.half_time is not None else round_s)
        job.next_round, job.round = r.index + 1, None
        done = job.next_round == rt.total_rounds
        if not done:
            # The next round goes out first: workers compute while we evaluate and write
            # the checkpoint (the weights stay as they are until that round's step).
            self.start_round()
        if done or rt.position(job.next_round)[1] == 0:
            row.update(rt.evaluate())
        job.metrics.append(row)
        self.http.observe_round(job.id, row)
        if done:
            return self.finish_job()
        if job.next_round % rt.spec.checkpoint_every == 0:
            self.checkpoint()  # also records the round in the queue database

    def checkpoint(self):
        arrays, meta = checkpoint.pack(self.job)
        self.store.save_checkpoint(self.job.id, arrays, meta)

    def finish_job(self):
        job = self.job
        state = job.rt.state_dict()
        last = job.metrics[-1]
        result = {
            "digest": weights_digest(state),
            "metrics": job.metrics,
            "eval": {k: v for k, v in last.items() if k in ("accuracy", "mse")},
        }
        self.store.save_result(job.id, state, result)
        self.store.update(job.id, round=job.next_round)
        self.store.drop_checkpoint(job.id)
        log.info("job %s done: %s", job.id, result["eval"])
        self.end_job()

    def fail_job(self, message):
        log.error("job %s failed: %s", self.job.id, message)
        self.store.update(self.job.id, state="failed", error=message)
        self.end_job()

    def end_job(self):
        for wid in self.members.live():
            self._send(self.workers, wid.encode(), wire.STOP_JOB, {"job": self.job.id})
        self.job = None

    # ---- shutdown -------------------------------------------------------------------------
    def request_stop(self, *_):
        self.stopping = True

    def shutdown(self):
        if self.job is not None:
            self.checkpoint()  # the last completed round; the partial one is redone
            log.info("checkpointed job %s at round %d", self.job.id, self.job.next_round)
            self.job = None
        self.workers.close(0)
        self.clients.close(0)
        self.gate.close()  # the ZAP thread's sockets would block ctx.term()
        self.http.close()
        self.ctx.term()


def _worker_info(msg) -> dict:
    """What a READY may say about its worker, for `status`: host and pid, nothing else."""
    info = msg.get("info")
    info = info if isinstance(info, dict) else {}
    out = {}
    if isinstance(info.get("host"), str):
        out["host"] = info["host"][:100]
    if type(info.get("pid")) is int:
        out["pid"] = info["pid"]
    return out


def main(
    worker_bind,
    client_bind,
    state_dir,
    data_root=None,
    config=None,
    auth=None,
    ready=None,
    http=None,
):
    """Run a coordinator until SIGTERM / SIGINT (it checkpoints, then exits)."""
    coord = Coordinator(worker_bind, client_bind, state_dir, data_root, config, auth, http)
    signal.signal(signal.SIGTERM, coord.request_stop)
    signal.signal(signal.SIGINT, coord.request_stop)
    if ready:
        ready(coord)
    coord.serve()
