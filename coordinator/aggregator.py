"""An aggregator: one per host (or swarm node), between the coordinator and that host's
workers, so the coordinator's traffic per round does not grow with the number of workers
(docs/scaling.md, "Hierarchical").

Upstream it is one worker whose capacity is the number of live workers behind it: it
registers with READY {"role": "aggregator", "workers": n} (again whenever n changes), the
coordinator deals it a contiguous share of the tree's blocks in one TASK (one weights
copy), and it sends back one GRADS per block.
Downstream it is a small coordinator over the same protocol (a worker cannot tell the two
apart): it cuts its blocks into sub-blocks for its workers (`sampling.split_blocks`),
forwards the weights, and finishes each block's sum by the canonical tree once every
sub-block is in. Blocks are nodes of that tree, so where a partial sum is added changes no
bit: the job's weights stay equal to `train --local`'s.

Faults stay local where they can: a dead worker's sub-blocks go to the others; a sub-block
whose job code raises is recomputed once on another worker, and a second failure is
reported upstream as a FAULT for the whole block (the coordinator then decides, as for any
worker). A sample of sub-blocks (the job's `verify` fraction) is computed by two workers;
when they differ, the aggregator computes it itself, quarantines whoever was wrong and, if
that worker had sums accepted on its word alone, sends RECALL {"since": round} so the
coordinator rolls the job back past them. If the aggregator dies, the coordinator sees a
dead worker and re-issues its blocks to other members.
"""

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from .. import wire
from ..core.sampling import all_finite, split_blocks
from ..jobspec import parse_spec
from ..security import RateLimit
from ..shm import HostPeers
from ..training import JobRuntime
from ..worker.worker import Heartbeat
from .job import Config
from .membership import Membership
from .rounds import Round, straggler_deadline
from .verify import Verifier
from .workers import sender_of, worker_info

log = logging.getLogger("shardgrad.aggregator")
MAX_MEMBERS_SHOWN = 256  # rows of our table that travel upstream for `status`


@dataclass
class Share:
    """This aggregator's part of one round of one job: what the coordinator gave it."""

    job: str
    when: tuple  # (gen, round): a newer one replaces this share
    spec: dict
    weights: list  # as received, forwarded to the workers as they are
    layout: list  # [(shape, dtype)] of a GRADS
    round: Round
    blocks: list = field(default_factory=list)  # upstream blocks not yet sent up
    unassigned: list = field(default_factory=list)  # ... and not yet dealt out (no workers)
    sent: set = field(default_factory=set)  # upstream blocks whose sums went up
    # The coordinator's boot id: `gen` is not in its checkpoints, so after a restart the
    # same (gen, round) can stand for other weights (a rollback before the crash).
    boot: str | None = None


class Aggregator:
    def __init__(
        self,
        upstream,
        bind,
        agg_id=None,
        data_root=None,
        heartbeat_interval=0.5,
        liveness=5,
        security=None,
        server=None,
        limits=wire.DEFAULT_LIMITS,
        per_worker=2,
        min_deadline=5.0,
    ):
        self.upstream, self.bind, self.data_root = upstream, bind, data_root
        self.id = agg_id or f"agg-{socket.gethostname()}-{os.getpid()}"
        self.interval, self.liveness = heartbeat_interval, liveness
        self.security, self.server, self.limits = security, server, limits
        self.per_worker = per_worker
        self.min_deadline, self.round_times = min_deadline, []  # straggler backups, as upstream
        self.warm = None  # the job whose first share (the one that loads it) is done
        self.rate = RateLimit(Config.worker_rate, Config.worker_burst)  # as upstream's port
        self.members = Membership(heartbeat_interval, liveness)
        self.boot = os.urandom(4).hex()  # in heartbeat answers, as the coordinator's
        # workers on this host: weights and block sums through shared memory, as upstream
        self.local = HostPeers(limits)
        self.share: Share | None = None
        self.verifier: tuple[str, Verifier] | None = None  # (job, its local verifier)
        self.runtime: tuple[str, JobRuntime] | None = None  # built only to settle a dispute
        self.announced: int | None = None
        self.info = {"role": "aggregator", "workers": 0, "seq": 0}
        self.stopping = False
        self.endpoint = None
        # fault injection (tests): the N-th sum we send up is lost, as a reconnect loses
        # what was in flight
        self.drop_up = int(os.environ.get("SHARDGRAD_FAULT_DROP_UP", "0") or 0)
        self.sent_up = 0
        self.last_busy = 0.0  # when a TASK came or a sum went up (idle)

    # ---- the loop -------------------------------------------------------------------------
    def run(self, ready=None):
        self.ctx = zmq.Context()
        self.up = self.ctx.socket(zmq.DEALER)
        self.up.setsockopt(zmq.IDENTITY, self.id.encode())
        self.up.setsockopt(zmq.LINGER, 2000)
        wire.apply_socket_limits(self.up, self.limits)
        if self.security:
            self.security.apply(self.up)
        self.up.connect(self.upstream)
        self.down = self.ctx.socket(zmq.ROUTER)
        self.down.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.down.setsockopt(zmq.LINGER, 0)
        wire.apply_socket_limits(self.down, self.limits)
        if self.server:
            self.server.apply(self.down)
        self.down.bind(self.bind)
        self.endpoint = self.down.getsockopt_string(zmq.LAST_ENDPOINT)
        heartbeat = Heartbeat(
            self.ctx, self.upstream, self.id, self.interval, self.liveness, self.security,
            info=lambda: self.info, idle=self.idle,
        )  # fmt: skip
        heartbeat.start()
        self.register()
        log.info("aggregator %s: upstream %s, workers on %s", self.id, self.upstream, self.endpoint)
        if ready:
            ready(self)
        poller = zmq.Poller()
        poller.register(self.up, zmq.POLLIN)
        poller.register(self.down, zmq.POLLIN)
        try:
            while not self.stopping:
                poller.poll(timeout=50)
                if heartbeat.reregister.is_set():
                    heartbeat.reregister.clear()
                    self.register()
                self._drain(self.up, wire.TO_WORKER_TYPES, self.on_upstream)
                self._drain(self.down, wire.WORKER_TYPES, self.on_worker)
                self.tick()
        finally:
            try:  # never connected: nobody to say it to
                wire.send_msg(self.up, wire.BYE, {"worker": self.id}, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            heartbeat.stop.set()
            heartbeat.join(2)
            if self.server is not None:
                self.server.auth.stop()
            self.local.close()
            self.up.close()
            self.down.close(0)
            self.ctx.term()

    def _drain(self, sock, types, handler, budget=256):
        for _ in range(budget):
            try:
                _, msg = wire.recv_msg(
                    sock, self.limits, router=sock is self.down, expect_types=types,
                    flags=zmq.NOBLOCK,
                )  # fmt: skip
            except zmq.Again:
                return
            except wire.ProtocolError as e:
                log.warning("dropped a bad message: %s", e)
                continue
            try:
                handler(msg)
            except (wire.ProtocolError, ValueError, TypeError, KeyError) as e:
                log.warning("dropped a bad %s message: %s", msg.type, e)
            except Exception:  # a bug must cost one message, never the aggregator
                log.exception("error handling %s", msg.type)

    def capacity(self) -> int:
        """Our live workers, counting those behind aggregators below us (a tree of them)."""
        return sum(self.members.capacities(self.members.live()).values())

    def idle(self) -> bool:
        """Nothing we were given is still to send up, and nothing came or went for a beat:
        our heartbeats say so (read on their thread), so a block the coordinator still waits
        for from us was lost on its way, either way, and it asks again (as it does a
        worker's). The beat goes on its own connection and may pass a big sum still on its
        way; asked again, we would recompute the whole block."""
        s = self.share
        quiet = time.monotonic() - self.last_busy > self.interval
        return quiet and (s is None or not (s.blocks or s.unassigned))

    def register(self):
        """READY upstream with our capacity: the coordinator deals blocks by it."""
        n = self.capacity()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "role": "aggregator"}
        seq = self.info.get("seq", 0) + 1
        self.info = {**info, "workers": n, "seq": seq, "members": self.table()}
        # (the heartbeat thread sends it too)
        wire.send_msg(self.up, wire.READY, {"worker": self.id, "info": self.info})
        self.announced = n

    def table(self) -> list[dict]:
        """Our members for the coordinator's `status`: id, state, why if quarantined."""
        rows = self.members.table()[:MAX_MEMBERS_SHOWN]
        return [{k: r[k] for k in ("id", "state", "reason", "workers") if k in r} for r in rows]

    def send_up(self, msg_type, fields, arrays=None):
        wire.send_msg(self.up, msg_type, {"worker": self.id, **fields}, arrays)

    def send_down(self, wid, msg_type, fields, arrays=None) -> bool:
        try:
            wire.send_msg(self.down, msg_type, fields, arrays, identity=wid.encode(),
                          flags=zmq.NOBLOCK)  # fmt: skip
            return True
        except zmq.ZMQError as e:  # gone (EHOSTUNREACH), or its queue is full
            if self.members.is_live(wid):
                log.warning("worker %s is gone (could not send %s: %s)", wid, msg_type, e)
            if self.members.unreachable(wid, e.errno == zmq.EHOSTUNREACH):
                self.local.forget(wid)
            return False

    def tick(self):
        """Liveness, then the share's repair. A bug here costs the round's share, never the
        aggregator (left alone it would raise again on every pass): with nothing left to
        send, our heartbeats say idle, and the coordinator asks again for what it waits on."""
        try:
            self._tick()
        except Exception:
            log.exception("the aggregator's tick failed: the round's share is dropped")
            self.share = None

    def _tick(self):
        for wid in self.members.sweep():
            log.warning("worker %s is gone (no heartbeat)", wid)
            self.local.forget(wid)
        table = self.table()
        if self.capacity() != self.announced or table != self.info.get("members"):
            self.register()  # a count or a state changed: say so (READY, then heartbeats)
        if self.share is not None:
            self.repair()

    # ---- upstream: the coordinator ----------------------------------------------------------
    def on_upstream(self, msg):
        if msg.type == wire.HEARTBEAT:
            return
        self.last_busy = time.monotonic()  # (first: the heartbeat thread reads it)
        if msg.type == wire.STOP_JOB:
            for wid in self.members.live():
                self.send_down(wid, wire.STOP_JOB, {"job": msg.get("job")})
            if self.share is not None and self.share.job == msg.get("job"):
                self.share = None
            self.verifier = self.runtime = None
            return
        if "layout" not in msg:  # a restarted coordinator met our heartbeat before our READY
            log.warning("the coordinator does not know we aggregate: registering again")
            return self.register()
        job, rnd, blocks, spec, layout = wire.require(msg, "job", "round", "blocks", "spec",
                                                      "layout")  # fmt: skip
        when, boot = (msg.get("gen", 0), rnd), msg.get("boot")
        blocks = [(int(lo), int(hi)) for lo, hi in blocks]
        s = self.share
        # Another round replaces the share, even an earlier one: a restarted coordinator
        # resumes from its checkpoint (one connection delivers in order, so never stale).
        if s is None or s.job != job or s.when != when or s.boot != boot:
            s = self.share = self.new_share(job, when, boot, spec, layout, msg)
        # Asked again for a sum that went up and was lost on its way (Round.ask_again): the
        # one we have. Any other block sent again (it failed, here or upstream) starts afresh.
        lost = msg.get("again") is True
        again = [b for b in blocks if lost and b in s.sent and s.round.covers(*b)]
        for b in [b for b in blocks if b not in again]:
            self.forget(b)
            s.blocks.append(b)
            s.unassigned.append(b)
        again = [b for b in again if b in s.sent]  # (what forget left: a TASK never overlaps)
        self.deal()
        if again:
            log.info("asked again for block(s) %s of round %d: sending their sums again",
                     again, rnd)  # fmt: skip
            s.blocks += again
            self.flush()

    def new_share(self, job, when, boot, spec, layout, msg) -> Share:
        old = self.share
        if self.verifier is None or self.verifier[0] != job:
            self.verifier = (job, Verifier(float(spec.get("verify", 0.0))))
        elif old is not None and old.job == job and (when[0], boot) != (old.when[0], old.boot):
            self.verifier[1].rolled_back(when[1])  # rolled back, or resumed by a restart
        n_micro = int(spec["global_batch"]) // int(spec["micro_batch"])
        weights = [msg.arrays[str(i)] for i in range(len(msg.arrays))]
        layout = [(tuple(int(d) for d in shape), np.dtype(dtype)) for shape, dtype in layout]
        r = Round(when[1], n_micro, [], self.per_worker, self.verifier[1].draw, assignment={})
        return Share(job, when, spec, weights, layout, r, boot=boot)

    def forget(self, block):
        """Drop what we hold inside `block`: it is (re)assigned to us whole."""
        r = self.share.round
        for sub in [b for b in r.holders if block[0] <= b[0] < block[1]]:
            for d in (r.holders, r.delivered, r.results, r.failures):
                d.pop(sub, None)
            r.checks.discard(sub)
        self.share.blocks = [b for b in self.share.blocks if b != block]
        self.share.unassigned = [b for b in self.share.unassigned if b != block]
        self.share.sent -= {b for b in self.share.sent if b[0] < block[1] and block[0] < b[1]}

    def deal(self):
        s, live = self.share, self.members.live()
        if not s.unassigned or not live:
            return  # no workers yet: we said so upstream, which re-issues if it must
        capacity = self.members.capacities(live)
        assignment = split_blocks(s.unassigned, s.round.n_micro, live, self.per_worker, capacity)
        s.unassigned = []
        self.send_blocks(s.round.add(assignment, live))

    def send_blocks(self, assignment):
        s = self.share
        fields = {"job": s.job, **wire.timeline(s.when[0], s.boot), "round": s.when[1],
                  "spec": s.spec}  # fmt: skip
        arrays = [(str(i), w) for i, w in enumerate(s.weights)]
        layout = [[list(shape), str(dtype)] for shape, dtype in s.layout]
        for wid, blocks in assignment.items():
            if blocks:
                task = {**fields, "blocks": [list(b) for b in blocks]}
                if self.members.is_aggregator(wid):  # an aggregator below us
                    task["layout"] = layout
                here = self.members.on_this_host(wid)
                if here:
                    version = (s.job, s.boot, *s.when)  # (not just gen: see Share.boot)
                    task.update(self.local.task_fields(wid, s.weights, version))
                if self.send_down(wid, wire.TASK, task, None if here else arrays):
                    self.members.busy(wid)

    # ---- downstream: our workers -----------------------------------------------------------
    def on_worker(self, msg):
        wid = sender_of(msg)
        if self.rate.refused(msg.envelope[0], time.monotonic()) is not None:
            return  # a flooding connection: as on the coordinator's worker port, dropped
        # ZAP checks a key only at connect: a revoked worker's open connection is cut here
        if self.server is not None and (msg.user is None or msg.user not in self.server.allow):
            log.warning("refused %s from %s: its key is not (or no longer) allowed", msg.type, wid)
            return self.members.leave(wid)
        if msg.type == wire.BYE:
            self.local.forget(wid)
            return self.members.leave(wid)
        self.local.taken(wid, msg)  # whatever becomes of a GRADS, its ring slot is free
        if msg.type in (wire.READY, wire.HEARTBEAT):
            if self.members.heard(wid, worker_info(msg)):
                log.info("worker %s joined", wid)
            if msg.type == wire.HEARTBEAT:
                self.members.beat(wid, msg.get("idle"))
                self.send_down(msg.envelope[0].decode(), wire.HEARTBEAT, {"boot": self.boot})
            elif self.share is not None and (owed := self.share.round.owed_by(wid)):
                self.send_blocks({wid: owed})  # it holds nothing now: what it owes, again
            return
        if msg.type == wire.STATE:  # (only a lease we follow sends it; we grant none)
            raise wire.ProtocolError("STATE from a worker that holds no lease of ours")
        if msg.type == wire.RECALL:  # from an aggregator below us: pass it up
            if not self.members.is_aggregator(wid):
                raise wire.ProtocolError("RECALL comes from aggregators, not workers")
            job, since = wire.require(msg, "job", "since")
            reason = str(msg.get("reason", ""))[:200]
            self.send_up(wire.RECALL, {"job": job, "since": since, "reason": reason})
            if self.share is not None and self.share.job == job:
                # what it sent this round and we have not passed up yet may stand on the
                # liar's word too: dropped, and re-issued (the coordinator drops the rest)
                self.share.round.discard(wid)
                self.repair()
            return
        s = self.share
        job, rnd, block = wire.require(msg, "job", "round", "block")
        if s is None or job != s.job or rnd != s.when[1] or not isinstance(block, list):
            return  # late: an earlier round, or a stopped job
        if not wire.of_timeline(msg, s.when[0], s.boot):
            return  # of an abandoned timeline (a rollback, a coordinator restart)
        block = tuple(block)
        r = s.round
        known = self.members.workers.get(wid)
        if block not in r.holders or block in r.delivered or known is None:
            return
        if known.state == "quarantined" or wid in r.results.get(block, ()):
            return
        self.members.heard(wid)
        if msg.type == wire.FAULT:
            return self.failed(wid, block, wire.field_of(msg, "error", str)[:2000], msg)
        self.local.load(wid, msg)  # from a worker on our host: out of its ring
        arrays = wire.check_grads(msg, s.layout)
        if not all_finite(arrays):
            return self.failed(wid, block, "the gradient has NaN/Inf", msg)
        verdict = r.deliver(block, arrays, wid, float(msg.get("compute_s", 0.0)))
        if verdict == "mismatch":
            self.settle(block)
        self.flush()

    def failed(self, wid, block, error, msg):
        """Once: recompute elsewhere here. Twice: the whole block fails upstream."""
        r, s = self.share.round, self.share
        r.failures.setdefault(block, []).append(wid)
        r.holders[block].discard(wid)
        live = self.members.live()
        if len(r.failures[block]) < 2 and set(live) - {wid}:
            return self.send_blocks(r.reissue([block], live, avoid={wid}))
        up = next(b for b in s.blocks if b[0] <= block[0] < b[1])
        fields = {"job": s.job, "round": s.when[1], "block": list(up), "error": error}
        if type(msg.get("micro_batch")) is int:
            fields["micro_batch"] = msg.get("micro_batch")
        self.send_up(wire.FAULT, fields)
        self.forget(up)

    def settle(self, block):
        """Two of our workers differ on a checked sub-block: compute it ourselves."""
        s, r = self.share, self.share.round
        liars = r.settle(block, self.compute(block))
        verifier = self.verifier[1]
        for wid in liars:
            why = (
                f"round {r.index}, micro-batches {block[0]}..{block[1] - 1}: its gradient "
                "differed from the aggregator's recomputation"
            )
            log.error("worker %s quarantined: %s", wid, why)
            self.members.quarantine(wid, why)
            r.discard(wid)
            since = verifier.first_unverified.pop(wid, None)
            if since is not None:  # it had sums taken on its word: undo them upstream
                self.send_up(wire.RECALL, {"job": s.job, "since": since,
                                           "reason": f"worker {wid} was caught lying"})  # fmt: skip

    def compute(self, block):
        s = self.share
        if self.runtime is None or self.runtime[0] != s.job:
            rt = JobRuntime(parse_spec(s.spec, files=False), self.data_root, verify_data=False)
            self.runtime = (s.job, rt)
        rt = self.runtime[1]
        rt.set_weights(s.weights)
        return rt.block_grad(s.when[1], *block)

    def flush(self):
        """Send up every block whose sub-blocks are all in."""
        s = self.share
        for b in [b for b in s.blocks if b not in s.unassigned and s.round.covers(*b)]:
            r = s.round
            unverified = [w for w, blocks in r.unverified.items() if blocks]
            self.verifier[1].contributed(r.index, unverified)
            fields = {"job": s.job, "round": r.index, "block": list(b)}
            fields.update(wire.timeline(s.when[0], s.boot))
            fields["compute_s"] = max(r.compute_s.values(), default=0.0)
            sums = r.node_sum(*b)
            names = wire.sum_names(len(sums))
            self.sent_up += 1
            self.last_busy = time.monotonic()
            if self.sent_up != self.drop_up:
                self.send_up(wire.GRADS, fields, list(zip(names, sums, strict=True)))
            else:
                log.warning("fault injection: sum %d (round %d block %s) not sent up",
                            self.sent_up, r.index, list(b))  # fmt: skip
            s.blocks.remove(b)
            first = b not in s.sent  # (a sum sent again says nothing of how long a round takes)
            s.sent.add(b)
            if first and not s.blocks and not s.unassigned:  # all we were given is in: its time
                took = r.half_time if r.half_time is not None else time.monotonic() - r.started
                if self.warm == s.job:  # not the job's first share: that one loads the job
                    self.round_times = [*self.round_times[-19:], took]
                self.warm = s.job

    def repair(self):
        """Deal what waited for workers; re-issue what dead workers held."""
        s, live = self.share, self.members.live()
        if not live:
            return
        if s.unassigned:
            self.deal()
        r = s.round
        lost, _ = r.lost(live)
        if lost:
            log.info("round %d: re-issuing %d sub-block(s) of lost workers", r.index,
                     sum(map(len, lost.values())))  # fmt: skip
            self.send_blocks(lost)
        if s.blocks and time.monotonic() - r.started > self.deadline():
            backups = r.backups(live)
            if backups:
                log.info("round %d: backing up %d straggling sub-block(s)", r.index,
                         len(backups))  # fmt: skip
                self.send_blocks(backups)
            # a result lost on its way, which no backup takes
            if again := r.ask_again(self.members.idle(live), self.deadline(), live):
                log.info("round %d: asking again for %d sub-block(s)", r.index,
                         sum(map(len, again.values())))  # fmt: skip
                self.send_blocks(again)
        self.flush()

    def deadline(self):
        return straggler_deadline(self.round_times, self.min_deadline)


def main(
    upstream,
    bind,
    agg_id=None,
    data_root=None,
    heartbeat_interval=0.5,
    liveness=5,
    security=None,
    server=None,
    min_deadline=5.0,
):
    """Run an aggregator until SIGTERM / SIGINT."""
    import signal

    agg = Aggregator(upstream, bind, agg_id, data_root, heartbeat_interval, liveness, security,
                     server, min_deadline=min_deadline)  # fmt: skip

    def stop(*_):
        agg.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agg.run()
