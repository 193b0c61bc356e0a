"""The coordinator: a ZeroMQ server that runs one job at a time on the live workers.

It reads top to bottom as a state machine. Each pass of `serve` drains the two ROUTER
sockets (workers, clients) and then `tick`s:

    no job ──(queued job, min_workers live)──> running ──(all rounds)──> done
                                               │  ^  │
               (fewer than min_workers live)   v  │  └──(a block fails twice)──> failed
                                               paused

(A job placed on the coordinator needs no workers: it starts at once and never pauses.)

A job whose rounds cost less than a round trip to a worker runs here instead, on the same
RoundEngine (`placement`: the same bits, no messages). Otherwise a running job's round:
TASK to every live worker (its aligned blocks + current weights),
GRADS back per block, tree completed, the round engine steps, next round. Dead workers'
blocks are re-issued in the same round, stragglers get backups, late results are ignored,
a failed block is recomputed once elsewhere, a sample of blocks is recomputed by a second
worker and a worker caught lying is quarantined (the job rolls back past what it said).
The training state itself (optimizer, accumulation, metrics, checkpoints) is the
`RoundEngine`'s, the same object `train --local` drives. Three concerns live beside this
file as parts of the Coordinator: a job's life from the queue to its result (jobs.py),
leases (lease.py) and what goes wrong with a block (checks.py: recompute, verdicts,
quarantine, rollback).
"""

import logging
import os
import signal
import time
from collections import Counter

import zmq

from .. import wire
from ..core.sampling import all_finite
from ..security import Gate
from ..shm import HostPeers
from .checks import Checks
from .clients import ClientHandler
from .http import http_server
from .job import ActiveJob, Config
from .jobs import Jobs
from .lease import Leases
from .membership import Membership
from .rounds import Round, straggler_deadline
from .store import Store
from .workers import sender_of, worker_info

log = logging.getLogger("shardgrad.coordinator")


class Coordinator(Jobs, Checks, Leases):
    def __init__(
        self, worker_bind, client_bind, state_dir, data_root=None, config=None, auth=None, http=None
    ):
        self.cfg = config or Config()
        self.data_root = data_root
        self.store = Store(state_dir)
        self.members = Membership(self.cfg.heartbeat_interval, self.cfg.liveness)
        self.boot = os.urandom(4).hex()  # in heartbeat answers: a restart, however fast, shows
        # Workers on this host: shared memory. Their sums are read in place, never copied:
        # a slot is acked (may be written again) only when the next round starts.
        self.local = HostPeers(self.cfg.limits, hold=True)
        self.counters: Counter = Counter()
        self.job: ActiveJob | None = None
        self.placements: dict[str, tuple[str, str]] = {}  # queued job -> (where, why)
        self.stopping = False
        self.ctx = zmq.Context()
        self.workers = self._router(worker_bind, auth and auth.worker_domain)
        self.clients = self._router(
            client_bind, auth and auth.client_domain, self.cfg.client_limits, self.cfg.client_hwm
        )
        self.limits = {self.workers: self.cfg.limits, self.clients: self.cfg.client_limits}
        self.authenticated = auth is not None  # (else no message has a ZAP user to look up)
        self.handing_in = False  # a kept early GRADS / FAULT is being handed in
        # Per-message admission: revoked keys (ZAP only checks at connect) and peer rates.
        cfg = self.cfg
        self.gate = Gate(
            auth, self.counters, cfg.client_rate, cfg.client_burst, cfg.worker_rate,
            cfg.worker_burst,
        )  # fmt: skip
        self.worker_endpoint = self.workers.getsockopt_string(zmq.LAST_ENDPOINT)
        self.client_endpoint = self.clients.getsockopt_string(zmq.LAST_ENDPOINT)
        self.client_handler = ClientHandler(self.store, self)
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
                busy = self.job is not None and self.job.here  # its rounds wait for no one
                ready = dict(poller.poll(timeout=0 if busy else 50))
                if self.clients in ready:
                    self._drain(self.clients, wire.CLIENT_TYPES, self.on_client)
                # Workers last, right before the liveness sweep: heartbeats that queued up
                # while we were busy (a submit's dry run, an evaluation) count, so our own
                # stall never makes a live worker look dead.
                self._drain(self.workers, wire.WORKER_TYPES, self.on_worker)
                self.tick()
                self.http.publish(self)  # a fresh snapshot for the HTTP threads, <= 4/s
        finally:
            self.shutdown()

    def _drain(self, sock, types, handler, budget=256):
        is_client = sock is self.clients
        for _ in range(budget):
            try:
                _, msg = wire.recv_msg(sock, self.limits[sock], router=True, expect_types=types,
                                       flags=zmq.NOBLOCK, user=self.authenticated)  # fmt: skip
            except zmq.Again:
                return
            except wire.ProtocolError as e:
                self.counters["bad_message"] += 1
                log.warning("dropped a bad message: %s", e)
                if is_client and e.envelope:
                    self._reply_error(e.envelope, str(e), "bad_message")
                continue
            refusal = self.gate.admit(msg, is_client)
            if refusal is not None:
                if is_client and refusal.reply:
                    self._reply_error(msg.envelope, refusal.reply, "refused", msg.get("req"))
                if refusal.drop_worker in self.members.workers:
                    self.members.leave(refusal.drop_worker)  # its blocks are re-issued at once
                continue
            try:
                handler(msg)
            except wire.Refused as e:  # an ordinary no, to a well-formed request
                self.counters["refused"] += 1
                self._reply_error(msg.envelope, str(e), "refused", msg.get("req"))
            except wire.ProtocolError as e:
                self.counters["bad_message"] += 1
                log.warning("dropped a bad %s message: %s", msg.type, e)
                if is_client:
                    self._reply_error(msg.envelope, str(e), "bad_message", msg.get("req"))
            except Exception as e:  # a bug must cost one request, never the coordinator
                self.counters["internal_error"] += 1
                log.exception("error handling %s", msg.type)
                if is_client:
                    self._reply_error(
                        msg.envelope, f"internal error: {e}", "internal", msg.get("req")
                    )

    def _reply_error(self, envelope, message, kind, req=None):
        self._send(
            self.clients, envelope, wire.ERROR, {"message": message, "kind": kind, "req": req}
        )

    def _send(self, sock, identity, msg_type, fields=None, arrays=None) -> bool:
        try:
            wire.send_msg(sock, msg_type, fields, arrays, identity=identity, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH (gone) or EAGAIN (its queue is full)
            self.counters["unroutable"] += 1
            log.info("could not send %s: %s", msg_type, e)
            if sock is self.workers:  # gone (its connection closed), or not reading
                wid = identity.decode()
                if self.members.unreachable(wid, e.errno == zmq.EHOSTUNREACH):
                    self.worker_died(wid, f"could not send {msg_type}: {e}")
            return False

    def worker_died(self, wid: str, why: str):
        """Gone without a BYE: what it held is re-issued, its shared memory let go. Told by
        the sweep (silent past liveness) or by the socket: a worker killed with -9 is seen
        there first when a TASK or STEPPED is on its way to it."""
        log.warning("worker %s is dead (%s)", wid, why)
        self.counters["workers_died"] += 1
        self.local.forget(wid)

    def tick(self):
        """Liveness, then the job's next move. Whatever raises here (a bug; its evaluation,
        checkpoint or a check) costs that job, never the loop: left alone it would raise
        again on every pass."""
        running = self.job
        try:
            self._tick()
        except Exception as e:
            self.counters["internal_error"] += 1
            log.exception("the coordinator's tick failed")
            reason = f"{type(e).__name__}: {e}"
            try:
                if self.job is not None:
                    self.fail_job(f"round {self.job.engine.next_round}: {reason}")
                elif running is None and (row := self.store.next_job()) is not None:
                    self.store.update(row["id"], state="failed", error=f"could not start: {reason}")
            except Exception:
                log.exception("... and so did failing its job")

    def _tick(self):
        for wid in self.members.sweep():
            silent = self.cfg.heartbeat_interval * self.cfg.liveness
            self.worker_died(wid, f"no heartbeat for {silent:.1f} s")
        job = self.job
        if job is None:
            self.start_next_job()
        elif job.engine.done:  # only a result that could not be written leaves it here
            if time.monotonic() >= job.write_retry[1]:
                self.finish_job()
        elif job.here:
            self.run_here()
        elif job.round is None:
            self.start_round()
        else:
            self.repair_round()
        self.hand_in_early()

    # ---- workers --------------------------------------------------------------------------
    def on_worker(self, msg):
        wid = sender_of(msg)
        if msg.type == wire.BYE:
            self.members.leave(wid)
            self.local.forget(wid)
            log.info("worker %s left", wid)
            return
        self.local.taken(wid, msg)  # whatever becomes of a GRADS, its ring slot is free
        if msg.type == wire.RECALL:
            return self.on_recall(wid, msg)
        if msg.type == wire.STATE:
            return self.on_state(wid, msg)
        if msg.type in (wire.READY, wire.HEARTBEAT):
            # a heartbeat registers too: after a coordinator restart, workers are back
            # without having to notice that anything happened
            if self.members.heard(wid, worker_info(msg)):
                log.info("worker %s joined", wid)
            if msg.type == wire.HEARTBEAT:  # answered, so a worker can tell we are alive
                self.members.beat(wid, msg.get("idle"))
                self._send(self.workers, msg.envelope[0], wire.HEARTBEAT, {"boot": self.boot})
            elif self.job is not None and self.job.round is not None:
                # READY says it holds nothing (restarted, or re-registering): what this round
                # still waits for from it goes out again (a result is accepted once).
                self.end_lease(wid)
                self.send_blocks(self.owed([wid]))
            return
        block = self._block_of(msg, wid)  # checked (and drops counted) before who sent it
        if block is None:
            return
        if msg.type == wire.GRADS:  # from a worker on our host: in its ring
            # A checked block's sum is compared, then summed: a copy, so that what was
            # compared is what is summed, whatever its sender writes meanwhile.
            self.local.load(wid, msg, copy=block in self.job.round.checks)
            arrays = wire.check_grads(msg, self.job.layout)
        else:
            error = wire.field_of(msg, "error", str)[:2000]
        known = self.members.workers.get(wid)
        if known is None or known.state == "quarantined":  # never registered, or caught lying
            self.counters["unknown_worker"] += 1
            return
        if not self.handing_in and self.members.heard(wid):  # a result is a sign of life
            log.info("worker %s is back", wid)
        if msg.type == wire.GRADS:
            self.on_grads(wid, block, arrays, msg)
        else:
            self.on_fault(wid, block, error, msg)

    def _block_of(self, msg, wid):
        """The pending block of the current round a GRADS / FAULT is about, or None
        (counted) if it is late, unknown or already in, or kept for its round (early)."""
        job, r = self.job, self.job and self.job.round
        job_id, rnd, block = wire.require(msg, "job", "round", "block")
        lease = msg.get("lease")  # computed ahead, on this timeline's weights?
        if job is not None and job_id == job.id and self.followed(wid, lease):
            # A member of the lease we follow sends no sums: only a block that raised or is
            # not finite. It dropped the lease; the span's round goes out as TASKs (and the
            # block, when its round comes, fails or not on its own). Nothing of it is read.
            self.counters["late_grads"] += 1
            return self.unfollow(f"{wid}'s round {rnd} failed: {str(msg.get('error'))[:200]}")
        if lease is not None and job is not None and job_id == job.id and type(rnd) is int:
            if wid not in job.leases.get(lease if type(lease) is int else None, ()):
                lease = False  # of another timeline or coordinator life: late
            elif r is None or rnd > r.index:
                return self.keep_early(wid, msg, rnd)
        if (
            r is None
            or job_id != job.id
            or rnd != r.index
            or lease is False
            or not wire.of_timeline(msg, job.gen, self.boot)
        ):  # an earlier round, a cancelled job, or of a timeline since rolled back or restarted
            self.counters["late_grads"] += 1
            return None
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int for b in block)):
            raise wire.ProtocolError(f"{msg.type} 'block' must be [lo, hi] integers, got {block!r}")
        block = tuple(block)
        if block not in r.holders:
            self.counters["unknown_block"] += 1
            return None
        failed = wid in r.failures.get(block, ()) and wid not in r.holders[block]
        if block in r.delivered or wid in r.results.get(block, ()) or failed:
            # (a failure of a block not given back to its worker is the same one again: it
            # sent it ahead on a lease, then once more for a TASK)
            self.counters["duplicate_grads"] += 1
            return None
        return block

    def on_grads(self, wid, block, arrays, msg):
        r = self.job.round
        if not all_finite(arrays):
            what = "the gradient has NaN/Inf"
            return self.block_failed(wid, block, what, msg.get("nonfinite"))
        verdict = r.deliver(block, arrays, wid, float(msg.get("compute_s", 0.0)))
        self.members.workers[wid].blocks_done += 1
        if "lease" in msg:
            self.counters["blocks_ahead"] += 1
            lease = self.job.lease
            if lease is None or msg.get("lease") != lease.id:
                r.ahead += 1  # computed under an earlier lease (see Width.observe)
        if verdict == "verified":
            self.counters["verified_blocks"] += 1
        elif verdict == "mismatch":
            return self.settle(block)
        if r.complete():
            self.finish_round()

    def on_fault(self, wid, block, error, msg):
        log.warning("worker %s: job code raised in round %s: %s", wid, msg.get("round"), error)
        self.counters["job_faults"] += 1
        self.block_failed(wid, block, error, msg.get("micro_batch"))

    def capacity(self) -> int:
        """Live workers, counting those behind aggregators."""
        return sum(self.members.capacities(self.members.live()).values())

    # ---- the client port (ClientHandler's narrow view of us; the job calls are jobs.py's) --
    def on_client(self, msg):
        fields, arrays = self.client_handler.handle(msg)
        fields.setdefault("req", msg.get("req"))
        self._send(self.clients, msg.envelope, wire.OK, fields, arrays)

    def status(self) -> dict:
        return {"workers": self.members.table(), "counters": dict(self.counters)}

    def authorize(self, msg, row, action):
        self.gate.authorize(msg, row, action)

    # ---- the round -------------------------------------------------------------------------
    def start_round(self):
        job = self.job
        self.local.release()  # (no round runs) the sums read in place are done with
        live = self.members.live()
        if self.capacity() < job.rt.spec.min_workers:
            self.end_lease()
            if job.state != "paused":
                log.warning("job %s paused: %d live worker(s), needs %d", job.id,
                            self.capacity(), job.rt.spec.min_workers)  # fmt: skip
            return self._set_state("paused")
        if job.state == "paused":
            log.info("job %s resumed with %d workers", job.id, len(live))
        self._set_state("running")
        index = job.engine.next_round
        use = job.width.use(live, self.stand_in(live))
        # (the workers this round is dealt to: a stand-by's first unchecked round, should it
        # take blocks over, finds an older snapshot, kept for the lease holder's first one)
        if job.verifier.needs_snapshot(index, use):
            job.verifier.keep(index, job.engine.pack(copy=True))
        job.round = Round(index, job.rt.n_micro, use, self.cfg.blocks_per_worker,
                          job.verifier.draw, self.members.capacities(use),
                          checkers=live)  # fmt: skip
        group, assignment = self.lease_group(use), dict(job.round.assignment)
        lease, checking, checks = job.lease, job.round.checking, {}
        going = (
            lease is not None
            and all(  # (their own blocks, what a stand-by checks aside)
                [b for b in assignment.get(w, ()) if b not in checking.get(w, ())] == bs
                for w, bs in lease.blocks.items()
            )
            and (lease.follow > 0) == (self.follow_rounds(group) > 0)  # (follow from now on)
        )
        # They are computing this round already. A STEPPED moves their window and says how
        # far we read their rings: each message costs both sides a wake-up, so it goes every
        # quarter window (the ring has room for that; shm.GradsRing).
        # (Followed, one goes every span: its members' window of 2 spans must move.)
        if going and index - lease.told >= (1 if lease.follow else max(1, job.window // 4)):
            lease.told = index
            for wid in list(lease.blocks):
                if job.lease is lease:  # (a STEPPED that cannot go out ends it)
                    self.stepped(wid)
        if going and job.lease is lease:
            for wid in lease.blocks:
                del assignment[wid]  # (the rest: a stand-by checking a block of theirs)
                if checking.get(wid) and len(lease.blocks) > 1:  # a member checks a peer's:
                    checks[wid] = checking[wid]  # on this round's weights, still on its lease
        self.send_blocks(assignment, lease_to=group)
        if checks:
            self.send_blocks(checks, check=True)

    def send_blocks(self, assignment: dict, lease_to=None, check=False, again=False):
        """TASKs for `assignment`. To the workers `lease_to` they also carry the job's
        training state and a lease, when they can have one (new_lease). Any other TASK to a
        worker ends its lease, but a `check` (a member of a lease of several computes a
        peer's block on this round's weights, and goes on ahead after)."""
        job, r = self.job, self.job.round
        granted = self.new_lease(assignment, lease_to) if lease_to else None
        if granted is not None:
            self.end_lease(sending=assignment)  # (whatever ran before; theirs is on its way)
        # The weights go out zero-copy, straight from the optimizer's arrays. They change
        # only when a round ends, and a TASK is only sent while its round runs: a frame
        # still in flight when they change belongs to a finished round, whose results are
        # late and ignored whatever they are.
        arrays = [(str(i), w) for i, w in enumerate(job.rt.weights())]
        for wid, blocks in assignment.items():
            if not blocks:
                continue
            here = self.members.on_this_host(wid)  # the weights through shared memory
            fields = {
                "job": job.id,
                **wire.timeline(job.gen, self.boot),  # (boot: aggregator.Share.boot)
                "round": r.index,
                "blocks": [list(b) for b in blocks],
                "spec": job.spec,
            }
            if self.members.is_aggregator(wid):  # it checks its workers' GRADS against it
                fields["layout"] = [[list(shape), str(dtype)] for shape, dtype in job.layout]
            member = granted is not None and wid in granted[0].blocks
            if again:  # (an aggregator sends again the sum it has: it was lost on its way)
                fields["again"] = True
            if check:
                fields["check"] = True
            elif not member:
                self.end_lease(wid, sending=assignment)
            frames = self.lease_fields(wid, granted, fields) if member else None
            if frames is None and here:
                version = (job.id, job.gen, r.index)
                fields.update(self.local.task_fields(wid, job.rt.weights(), version))
            elif frames is None:
                frames = arrays
            if self._send(self.workers, wid.encode(), wire.TASK, fields, frames):
                self.members.busy(wid)
            else:
                # It has left; its heartbeat may bring it back before repair_round looks,
                # and a block it still held would wait for it forever (a check, which no
                # backup may take): unheld, they are re-issued.
                r.unhold(wid, blocks)
        if granted is not None:
            job.lease = granted[0]
            if job.lease.follow:  # (its members write their rings over what no one reads now)
                job.leases.clear()
                job.early.clear()
            job.leases[job.lease.id] = set(job.lease.blocks)

    def repair_round(self):
        """Re-issue what dead (or quarantined) workers held; back up stragglers past the
        deadline."""
        r = self.job.round
        live = self.members.live()
        lost, skipped = r.lost(live)
        if skipped:
            self.counters["verify_skipped"] += skipped
        if r.complete():
            return self.finish_round()
        if lost:
            log.info("round %d: re-issuing %d block(s) of lost workers", r.index,
                     sum(map(len, lost.values())))  # fmt: skip
            self.send_blocks(lost)
        # (the round is not complete: with nobody live, its pending blocks wait)
        self._set_state("paused" if not live else "running")
        if time.monotonic() - r.started > self.deadline():
            lease = self.job.lease  # a lost STEPPED, a lease it never got: ask plainly
            owed = self.owed(lease.blocks if lease else ())
            if owed:
                log.info("round %d: the lease ends (%s owe %d block(s))", r.index,
                         ", ".join(owed), sum(map(len, owed.values())))  # fmt: skip
                self.send_blocks(owed)
            backups = r.backups(live)
            if backups:
                log.info("round %d: backing up %d straggling block(s)", r.index, len(backups))
                self.counters["backup_blocks"] += len(backups)
                self.send_blocks(backups)
            # (a result lost on its way: nobody else may take a check)
            idle = self.members.idle(w for w in live if w not in owed)
            again = r.ask_again(idle, self.deadline(), live)
            if not (owed or backups or again):
                self.still_waiting(r, live)
            for w, blocks in again.items():
                log.info("round %d: asking %s again for %d block(s)", r.index, w, len(blocks))
                self.counters["asked_again"] += len(blocks)
                checks = [b for b in blocks if b in r.checking.get(w, ())]
                self.send_blocks({w: [b for b in blocks if b not in checks]}, again=True)
                self.send_blocks({w: checks}, check=True, again=True)  # (a lease member stays)

    def still_waiting(self, r, live):
        """Past the deadline with nothing to do: say, once a deadline, who the round waits
        on (busy by their heartbeats: no backup is free, nobody may be asked again)."""
        if time.monotonic() - r.said_waiting < self.deadline():
            return
        r.said_waiting = time.monotonic()
        alive = set(live)
        waits = {b: sorted(r.waiting_on(b, alive)) for b in r.pending()}
        log.info("round %d: past the deadline, still waiting on %s", r.index,
                 "; ".join(f"{b[0]}..{b[1] - 1} from {', '.join(w) or 'nobody'}"
                           for b, w in waits.items()))  # fmt: skip

    def deadline(self):
        cfg = self.cfg
        return straggler_deadline(self.job.round_times, cfg.min_deadline, cfg.deadline_factor)

    def finish_round(self):
        job, r, engine = self.job, self.job.round, self.job.engine
        t0 = time.monotonic()
        total = r.total()
        t1 = time.monotonic()
        unchecked = self.unchecked_contributors(r)
        job.verifier.contributed(r.index, unchecked)
        if job.leases and any(job.lease is None or w not in job.lease.blocks for w in unchecked):
            # Weights now stand on someone's unchecked word: a lease holder computing on
            # its own weights would no longer match them, should that someone have lied.
            job.leases.clear()
            self.end_lease()
        row = engine.step(total)
        t2 = time.monotonic()
        round_s = t2 - r.started
        # The width is chosen on the pace (step to step): with workers ahead on a lease, a
        # round's own span can be our part alone.
        pace, job.last_step = t2 - (job.last_step or r.started), t2
        why = job.width.observe(pace, ahead=r.ahead > 0)
        if why:
            log.info("job %s: %s", job.id, why)
        compute = max(r.compute_s.values(), default=0.0)
        row.update(
            round_s=round_s,
            pace_s=pace,  # what a round costs the job: ahead on a lease, not its span
            compute_s=compute,
            reduce_s=t1 - t0,
            overhead_s=round_s - compute,
            transfer_s=round_s - compute - (t2 - t0),  # messaging and waiting, the rest
            workers=sum(
                self.members.capacities(
                    w for w in r.compute_s if w in self.members.workers
                ).values()
            ),
            blocks=len(r.holders),
            checked=len(r.checks),  # of which a second worker recomputed (verify)
            samples_per_s=job.rt.global_batch / max(pace, 1e-9),  # (not its span: above)
        )
        # The deadline adapts to how long the healthy half of a round takes, so a
        # persistent straggler cannot stretch it to its own pace. The first round of a run
        # also loads the job on every worker: it says nothing about the pace.
        if job.warm:
            job.round_times.append(r.half_time if r.half_time is not None else round_s)
        job.warm = True
        job.round = None
        if not engine.done:
            # The next round goes out first: workers compute while we evaluate and write
            # the checkpoint (the weights stay as they are until that round's step).
            self.start_round()
        self.after_step(row)
        self.hand_in_early()  # after this round's row: a round it completes comes after it

    # ---- shutdown -------------------------------------------------------------------------
    def request_stop(self, *_):
        self.stopping = True

    def shutdown(self):
        job = self.job
        if job is not None:
            if self.checkpoint():  # the last completed round; the partial one is redone
                log.info("checkpointed job %s at round %d", job.id, job.engine.next_round)
            self.job = None
        self.local.close()
        self.workers.close(0)
        self.clients.close(0)
        self.gate.close()  # the ZAP thread's sockets would block ctx.term()
        self.http.close()
        self.ctx.term()


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
    yield_cpu((config or Config()).nice)  # before any thread: they inherit it
    coord = Coordinator(worker_bind, client_bind, state_dir, data_root, config, auth, http)
    signal.signal(signal.SIGTERM, coord.request_stop)
    signal.signal(signal.SIGINT, coord.request_stop)
    if ready:
        ready(coord)
    coord.serve()


def yield_cpu(nice: int) -> None:
    """Lower this thread's scheduling priority to `nice` (0..19; never raised: that takes
    privileges). Threads it starts inherit it."""
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > now:
        os.setpriority(os.PRIO_PROCESS, 0, min(nice, 19))
        log.info("running at nice %d: workers on this host get the CPU first", min(nice, 19))
