"""Workers run ahead of the coordinator on a lease (docs/architecture.md, "Leases").

When a round goes to one worker alone, or to workers that all share our host, their TASKs
also carry the job's whole training state and a lease; each worker steps its own
RoundEngine with the round's sums (the coordinator's, bit for bit): alone, its own; in a
lease of several, everyone's, which the members send each other straight (worker/peers.py).
So they compute up to `window` rounds ahead of us without waiting for our step. The
coordinator still steps its own engine (it stays the one truth) and sends STEPPED instead
of TASKs while the lease lasts. What a worker sent for a round we have not started yet is
kept (`ActiveJob.early`) and handed in when it starts.

`Leases` is the part of the Coordinator that does this; it uses the coordinator's job,
members, sockets and counters.
"""

import logging
import secrets
import time

from .. import wire
from ..core.sampling import tiles
from ..shm import RING_SLOTS
from .job import Lease
from .workers import state_of

log = logging.getLogger("shardgrad.coordinator")


class Leases:
    def lease_group(self, use) -> list | None:
        """The workers a round goes to, if they may run ahead of us on a lease: one alone,
        or several on our host, each with a port for its peers' sums."""
        if self.cfg.lease_window <= 0 or not use:
            return None
        infos = [self.members.workers[w].info for w in use]
        if any(i.get("lease") is not True or "role" in i for i in infos):
            return None
        if len(use) > 1 and not self.cfg.peer_leases:
            return None
        if len(use) > 1 and not all(
            "peer" in i and self.members.on_this_host(w) for w, i in zip(use, infos, strict=True)
        ):
            return None
        return list(use)

    def new_lease(self, assignment: dict, group: list) -> tuple | None:
        """(Lease, state frames, state meta) for `group` with its blocks in `assignment`, or
        None when it cannot have one: its blocks are not the whole round once (a check among
        them), a member has more than its peers may read in place, the state is too big."""
        job = self.job
        blocks = {w: list(assignment.get(w, ())) for w in group}
        if not tiles(job.rt.n_micro, [b for bs in blocks.values() for b in bs]):
            return None
        if len(group) > 1 and max(map(len, blocks.values())) > RING_SLOTS // 2:
            return None
        state, meta = job.engine.pack(copy=True)  # the weights too (a copy: ours step on)
        if not self.fits(state):
            return None
        meta["metrics"] = []
        self.counters["leases_granted"] += 1
        frames = [(f"state.{k}", a) for k, a in state.items()]
        follow = self.follow_rounds(group)
        lease = Lease(secrets.randbits(31), blocks, told=job.engine.next_round, follow=follow,
                      reporter=min(group) if follow else None)  # fmt: skip
        return lease, frames, meta

    def follow_rounds(self, group) -> int:
        """How many rounds a lease of `group` may run between the states it sends us, when
        we follow it rather than step every round ourselves (0: we step).

        A lease of several on our host shares its cores with us. Stepping our own copy of
        every round (taking in, checking and adding the members' sums, then the step: a
        third replica of the members' work) cost the members 10-15 % of their pace on 2
        cores. Followed, the members send no sums to us: every `follow` rounds, at each
        epoch's end and at the job's end, one of them sends its whole training state, and
        we take it in place of the rounds' steps (the same bits: the determinism contract).
        Our round stays the first of the span, on weights we hold: whatever ends the lease
        (a member lost, a fault, a deadline) re-issues that round as TASKs, which loses at
        most a span and the window of work and never a bit. Only when nothing is checked
        (`verify` 0: a state is taken on its sender's word, as its sums would be), and a
        span stays far within the straggler deadline. (While the width is probed, a span
        is at most a stretch: Width.observe takes a span's rounds at once.)"""
        job, cfg = self.job, self.cfg
        if cfg.follow <= 0 or len(group or ()) < 2 or job.rt.spec.verify > 0:
            return 0
        if not all(self.members.workers[w].info.get("follow") is True for w in group):
            return 0
        if job.rt.dry_run_s is None:
            return 0
        per_round = job.rt.dry_run_s * job.rt.n_micro / len(group)  # (warm-up included)
        n = min(cfg.follow, 32)  # (a window of 2n: at most 64)
        if job.width.dealt is not None and job.width.choice is None:
            n = min(n, job.width.stretch_rounds())  # (probing: a span about a stretch)
        while n >= 2 and n * per_round > cfg.min_deadline / 10:
            n //= 2
        return n if n >= 2 else 0

    def lease_fields(self, wid, granted, fields) -> list:
        """Put lease `granted` into `wid`'s TASK `fields`; the frames to send with it."""
        lease, frames, meta = granted
        window = 2 * lease.follow if lease.follow else self.job.window  # (a state every half)
        fields["lease"] = {"id": lease.id, "window": window, "state": meta}
        if lease.follow:
            fields["lease"]["follow"] = lease.follow
            if wid == lease.reporter:
                fields["lease"]["reports"] = True
        if len(lease.blocks) > 1:
            peers = self.members.workers
            fields["lease"]["peers"] = [
                [p, peers[p].info["peer"], [list(b) for b in bs]]
                for p, bs in lease.blocks.items()
                if p != wid
            ]
        if self.members.on_this_host(wid):
            fields.update(self.local.acked(wid))
        return frames

    def keep_early(self, wid, msg, rnd):
        """A worker ahead on a lease sent a round we have not started (we wait on a check,
        a fault, our own evaluation): keep it for that round (hand_in_early)."""
        job = self.job
        kept = job.early.setdefault(rnd, []) if rnd >= job.engine.next_round else None
        if kept is None or rnd > job.engine.next_round + job.window or len(kept) >= 64:
            self.counters["late_grads"] += 1  # before our round, or beyond any window we gave
            return None
        same = ("block", "lease")  # (of another lease it is no duplicate: one may be void)
        if any(m.type == msg.type and all(m.get(k) == msg.get(k) for k in same) for m in kept):
            self.counters["duplicate_grads"] += 1
            return None
        if msg.type == wire.GRADS:
            self.local.load(wid, msg, copy=True)  # kept past the next release()
            msg.fields.pop("shm", None)
            wire.check_grads(msg, job.layout)  # malformed: refused now, as any GRADS would be
        else:
            wire.field_of(msg, "error", str)
        kept.append(msg)
        return None

    def hand_in_early(self):
        """What a worker ahead sent for the round now running (kept by keep_early), and the
        state of a lease we follow that came before our round before it was in."""
        job = self.job
        while job is not None and self.job is job and job.round is not None and job.early_states:
            first = min(job.early_states)
            if first > job.engine.next_round:
                break
            wid, msg = job.early_states.pop(first)  # (of a round before ours: it says no more)
            try:
                self.on_state(wid, msg)
            except Exception:  # (checked by on_state: what raises here is a bug)
                self.counters["internal_error"] += 1
                log.exception("error handing in an early STATE")
        while job is not None and self.job is job and job.round is not None and job.early:
            index = job.round.index
            due = [r for r in job.early if r <= index]
            if not due:
                return
            for msg in job.early.pop(min(due)):  # (of an earlier round: counted late)
                if self.job is not job or job.round is None or job.round.index != index:
                    break  # it completed the round, and the next handed in its own
                try:  # (checked when kept: what raises here is a bug, and costs one message)
                    self.handing_in = True  # (what it sent long ago is no sign of life now)
                    self.on_worker(msg)
                except Exception:
                    self.counters["internal_error"] += 1
                    log.exception("error handing in an early %s", msg.type)
                finally:
                    self.handing_in = False

    def stand_in(self, live) -> str | None:
        """The worker that would compute alone on a lease while the others stand by (and
        check the blocks `verify` draws), one on our host first; none with aggregators."""
        infos = [self.members.workers[w].info for w in live]
        if any("role" in i for i in infos):
            return None
        able = [w for w in live if self.lease_group([w])]
        return min(able, key=lambda w: (not self.members.on_this_host(w), w), default=None)

    def stepped(self, wid, lease=None, end=False):
        """Tell a member of `lease` (the job's) the rounds before this one are in the
        weights: its lease's window moves on (and, on our host, how far we read its ring).
        `end`: the lease is over (a lease of several: a peer will not go on)."""
        job = self.job
        lease = lease or job.lease
        fields = {"job": job.id, "lease": lease.id, "round": job.engine.next_round}
        if end:
            fields["end"] = True
        if self.members.on_this_host(wid):
            fields.update(self.local.acked(wid))
        if not self._send(self.workers, wid.encode(), wire.STEPPED, fields) and not end:
            self.end_lease(wid)  # (it has left: its blocks are re-issued)

    def fits(self, arrays: dict) -> bool:
        """Whether a lease's state fits one message within the worker's limits (half of
        them: the TASK carries more than the state)."""
        lim = self.cfg.limits
        sizes = [a.nbytes for a in arrays.values()]
        return sum(sizes) <= lim.max_message_bytes // 2 and max(sizes, default=0) <= (
            lim.max_frame_bytes
        )

    def end_lease(self, wid=None, sending=None):
        """The lease `wid` is a member of (any, if None) ends: a TASK to it, its READY or a
        fault said so. The members of a lease of several are told, since they wait for each
        other's sums: each live one gets what it still owes of the round under way as a
        TASK, beyond what `sending` (the assignment whose TASKs end it) gives it, and those
        owing nothing a STEPPED {end}. `wid` gets what it owes only when `sending` gives it
        blocks (any other caller sends it its own). Not only the others: a member computing
        ahead drops the rest of its round when a TASK comes (worker.compute_blocks), so a
        TASK for one block must not leave its other block of the round owed and unasked.
        The next round goes out as TASKs. (What they computed ahead still counts, see
        ActiveJob.leases, but for a lease we follow: follow_rounds.)"""
        job = self.job
        lease = job.lease
        if lease is None or (wid is not None and wid not in lease.blocks):
            return
        job.lease = None  # (first: the TASKs below end nothing more)
        sending = sending or {}
        if lease.follow:  # (its members wrote their rings over what nobody read)
            job.leases.pop(lease.id, None)
            job.early_states.clear()
        elif len(lease.blocks) == 1:
            return
        owed = {}
        if job.round is not None:  # (a pause: nobody owes anything, nobody may wait on a peer)
            members = [m for m in lease.blocks if m != wid or sending.get(m)]
            for w, blocks in self.owed(members).items():
                rest = [b for b in blocks if b not in sending.get(w, ())]
                if rest:
                    owed[w] = rest
        if owed:
            if lease.follow:
                self.counters["follow_ended"] += 1  # (not a lease that the next one replaces)
            self.send_blocks(owed)
        for member in lease.blocks:
            if member != wid and member not in owed and not sending.get(member):
                if self.members.is_live(member):
                    self.stepped(member, lease, end=True)

    def owed(self, workers) -> dict:
        """What each live one of `workers` still owes of the round under way (the blocks
        to send it again, as a TASK), leaving out those that owe nothing."""
        r, live = self.job.round, self.members.is_live
        return {w: o for w in workers if live(w) and (o := r.owed_by(w))}

    # ---- a lease we follow (follow_rounds) ---------------------------------------------
    def followed(self, wid, lease_id) -> bool:
        """Whether `lease_id` is the lease we follow, with `wid` a member."""
        lease = self.job.lease
        return (
            lease is not None
            and lease.follow > 0
            and lease.id == lease_id
            and (wid in lease.blocks)
        )

    def unfollow(self, why: str):
        """The lease we follow ends (end_lease): its members get our round, the span's first
        (on the weights we hold), as TASKs; what they computed past it is lost."""
        log.info("round %d: the lease we follow ends (%s)", self.job.engine.next_round, why)
        self.end_lease()

    def on_state(self, wid, msg):
        """The state a lease we follow reached: it takes our round's span in at once."""
        job = self.job
        jid, lid = wire.require(msg, "job", "lease")
        if job is None or jid != job.id or job.round is None or not self.followed(wid, lid):
            self.counters["late_grads"] += 1  # (an ended lease, another job)
            return
        if wid != job.lease.reporter:
            raise wire.ProtocolError(f"STATE from {wid!r}: not the lease's reporter")
        engine, r, members = job.engine, job.round, list(job.lease.blocks)
        first, ahead = _first_round(msg), engine.next_round + 2 * job.lease.follow
        if type(first) is int and engine.next_round < first < ahead:
            # Our round before its first is not in yet (a member's GRADS of the lease's
            # first round, a TASK's, sent as any, is still on its way), nor maybe the
            # STATEs before it: hand_in_early takes them in order.
            job.early_states[first] = (wid, msg)
            return
        try:
            until = min(ahead, job.rt.total_rounds)
            arrays, meta, rows = state_of(msg, engine, engine.next_round, until)
        except Exception as e:  # (ProtocolError; anything else is a gap in state_of)
            self.counters["bad_message"] += 1
            log.warning("dropped a bad STATE from %s: %s", wid, e)
            return self.unfollow("a bad STATE")
        since = engine.next_round
        engine.restore(arrays, {**meta, "metrics": engine.metrics})
        now = time.monotonic()
        n = engine.next_round - since
        pace, job.last_step = (now - (job.last_step or r.started)) / n, now
        why = job.width.observe(pace, rounds=n)
        if why:
            log.info("job %s: %s", job.id, why)
        if job.warm:
            job.round_times.append(now - r.started)  # (the deadline is for a whole span)
        job.warm = True
        self.counters["rounds_followed"] += n
        self.counters["blocks_ahead"] += n * len(r.holders)
        known = [w for w in members if w in self.members.workers]
        workers = sum(self.members.capacities(known).values())
        for row in rows:
            compute = row.get("compute_s", 0.0)
            row.update(round_s=pace, pace_s=pace, compute_s=compute, reduce_s=0.0,
                       overhead_s=pace - compute, transfer_s=pace - compute, workers=workers,
                       blocks=len(r.holders), checked=0,
                       samples_per_s=job.rt.global_batch / max(pace, 1e-9))  # fmt: skip
        job.round = None
        if not engine.done:
            self.start_round()  # (the next span: STEPPED moves the members' window)
        for row in rows[:-1]:  # (none ends an epoch: state_of)
            engine.metrics.append(row)
            self.http.observe_round(job.id, row)
        self.after_step(rows[-1], since=since)


def _first_round(msg):
    """The round of a STATE's first row (its span's first), if it says one."""
    rows = msg.get("rows")
    return (
        rows[0].get("round")
        if isinstance(rows, list) and rows and isinstance(rows[0], dict)
        else None
    )
