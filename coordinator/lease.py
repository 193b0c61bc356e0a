"""A lone worker runs ahead of the coordinator on a lease (docs/architecture.md, "Leases").

When a round goes to exactly one worker, its TASK also carries the job's whole training
state; the worker steps its own RoundEngine with its own sums (the coordinator's, bit for
bit) and computes up to `window` rounds ahead. The coordinator still steps its own engine
and sends STEPPED instead of a TASK while the lease lasts. What a worker sent for a round
we have not started yet is kept (`ActiveJob.early`) and handed in when it starts.

`Leases` is the part of the Coordinator that does this; it uses the coordinator's job,
members, sockets and counters.
"""

import logging
import secrets

from .. import wire
from .workers import check_grads

log = logging.getLogger("shardgrad.coordinator")


class Leases:
    def grant_lease(self, wid, blocks, fields) -> list | None:
        """Put a lease and the job's training state into the TASK `fields` for `wid`: the
        frames to send with it, or None if the state would not fit (then a plain TASK)."""
        job = self.job
        state, meta = job.engine.pack(copy=True)  # the weights too (a copy: ours step on)
        if not self.fits(state):
            return None
        meta["metrics"] = []
        job.lease = (wid, secrets.randbits(31), blocks)
        job.leases[job.lease[1]] = wid
        fields["lease"] = {"id": job.lease[1], "window": job.window, "state": meta}
        if self.members.on_this_host(wid):
            fields.update(self.local.acked(wid))
        return [(f"state.{k}", a) for k, a in state.items()]

    def keep_early(self, wid, msg, rnd):
        """A worker ahead on a lease sent a round we have not started (we wait on a check,
        a fault, our own evaluation): keep it for that round (hand_in_early)."""
        job = self.job
        kept = job.early.setdefault(rnd, []) if rnd >= job.engine.next_round else None
        if kept is None or rnd > job.engine.next_round + job.window or len(kept) >= 64:
            self.counters["late_grads"] += 1  # before our round, or beyond any window we gave
            return None
        if any(m.get("block") == msg.get("block") and m.type == msg.type for m in kept):
            self.counters["duplicate_grads"] += 1
            return None
        if msg.type == wire.GRADS:
            self.local.load(wid, msg)  # out of the ring now: its slot is acked from here on
            msg.fields.pop("shm", None)
            check_grads(msg, job.layout)  # malformed: refused now, as any GRADS would be
        else:
            wire.field_of(msg, "error", str)
        kept.append(msg)
        return None

    def hand_in_early(self):
        """What a worker ahead sent for the round now running (kept by keep_early)."""
        job = self.job
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

    def lone_worker(self, use) -> str | None:
        """The one worker a round goes to, if it may run ahead of us alone (a lease)."""
        if self.cfg.lease_window <= 0 or len(use) != 1:
            return None
        w = self.members.workers[use[0]]
        return w.id if w.info.get("lease") is True and "role" not in w.info else None

    def stand_in(self, live) -> str | None:
        """The worker that would compute alone on a lease while the others stand by (and
        check the blocks `verify` draws), one on our host first; none with aggregators."""
        infos = [self.members.workers[w].info for w in live]
        if any("role" in i for i in infos):
            return None
        able = [w for w, i in zip(live, infos, strict=True) if self.lone_worker([w])]
        return min(able, key=lambda w: (not self.members.on_this_host(w), w), default=None)

    def stepped(self, wid):
        """Tell the lone worker the rounds before this one are in the weights: its lease's
        window moves on (and, on our host, how far we read its ring)."""
        job = self.job
        fields = {"job": job.id, "lease": job.lease[1], "round": job.round.index}
        if self.members.on_this_host(wid):
            fields.update(self.local.acked(wid))
        if not self._send(self.workers, wid.encode(), wire.STEPPED, fields):
            self.end_lease(wid)
            self.members.leave(wid)

    def fits(self, arrays: dict) -> bool:
        """Whether a lease's state fits one message within the worker's limits (half of
        them: the TASK carries more than the state)."""
        lim = self.cfg.limits
        sizes = [a.nbytes for a in arrays.values()]
        return sum(sizes) <= lim.max_message_bytes // 2 and max(sizes, default=0) <= (
            lim.max_frame_bytes
        )

    def end_lease(self, wid):
        """`wid` no longer runs ahead (a TASK, or its READY, said so): the next round goes
        to it as a TASK. (What it computed ahead still counts: see ActiveJob.leases.)"""
        if self.job.lease is not None and self.job.lease[0] == wid:
            self.job.lease = None
