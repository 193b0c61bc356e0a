"""When a block goes wrong: it raised or came back non-finite (recomputed once elsewhere,
then the job fails), two workers disagree on a checked block (the coordinator decides; the
liar is quarantined and the job rolls back past its word), an aggregator RECALLs what one
of its workers said. (docs/architecture.md, "Failure handling".)

`Checks` is the part of the Coordinator that does this; it uses the coordinator's job,
members, store and counters.
"""

import logging

from .. import wire

log = logging.getLogger("shardgrad.coordinator")


class Checks:
    def block_failed(self, wid, block, what, micro):
        """A block raised or came back non-finite: once is the worker's bad luck (recompute
        elsewhere), twice on different workers is the job's fault (it fails, naming why)."""
        r = self.job.round
        r.failures.setdefault(block, []).append(wid)
        lo, hi = block
        where = f"micro-batch {micro}" if type(micro) is int else f"micro-batches {lo}..{hi - 1}"
        if len(r.failures[block]) >= 2:
            hint = (
                "; the data or the learning rate is at fault, not the cluster"
                if what.startswith("the gradient has NaN/Inf")
                else ""
            )
            return self.fail_job(
                f"round {r.index}, {where}: {what} again after recomputing on another worker "
                f"({', '.join(r.failures[block])}){hint}"
            )
        log.warning("round %d %s from %s: %s; recomputing elsewhere", r.index, where, wid, what)
        self.end_lease(wid)  # it dropped its lease: the next round goes to it as a TASK
        r.holders[block].discard(wid)
        answered = set(r.results.get(block, ()))
        if block in r.checks and answered and not set(self.members.live()) - answered - {wid}:
            # A checked block whose other holder answered, with nobody left to check it:
            # take that answer, as when a checker dies (not the failed worker once more).
            r.accept_unchecked(block)
            self.counters["verify_skipped"] += 1
            return self.finish_round() if r.complete() else None
        self.send_blocks(r.reissue([block], self.members.live(), avoid={wid, *answered}))

    def settle(self, block):
        """Two workers disagree on a checked block: a third computation, the coordinator's
        own, decides. Whoever differs from it is quarantined, and the job rolls back past
        everything it said unchecked."""
        job, r = self.job, self.job.round
        lo, hi = block
        self.counters["verify_mismatches"] += 1
        liars = r.settle(block, job.rt.block_grad(r.index, lo, hi))
        targets = []
        for wid in liars:
            self.quarantine(wid, f"round {r.index}, micro-batches {lo}..{hi - 1}: its gradient "
                            "differed from the coordinator's recomputation")  # fmt: skip
            target = job.verifier.rollback_target(wid)
            if target is not None:
                targets.append(target)
            r.discard(wid)
        if targets:
            return self.rollback(min(targets))
        if r.complete():
            self.finish_round()

    def on_recall(self, wid, msg):
        """An aggregator caught one of its workers lying: what it sent since round `since`
        stood partly on that worker's word. Roll back past it, as for a liar of our own."""
        job, since = wire.require(msg, "job", "since")
        if type(since) is not int or not self.members.is_aggregator(wid):
            raise wire.ProtocolError(f"RECALL from {wid!r}: not an aggregator, or a bad round")
        if self.job is None or job != self.job.id:
            return
        if self.job.here and since >= self.job.here_from:
            return  # (what it computes here stands on nobody's word)
        self.counters["recalls"] += 1
        reason = str(msg.get("reason", ""))[:200]
        log.warning("aggregator %s recalls its sums since round %d (%s)", wid, since, reason)
        if since >= self.job.engine.next_round:
            # Nothing it said is in the weights yet, but what it sent this round may stand
            # on the liar's word: drop it, and the round re-issues those blocks (to it too:
            # it recomputes them without the liar).
            if self.job.round is not None:
                self.job.round.discard(wid)
                self.repair_round()
            return
        target = self.job.verifier.recall_target(since)
        if target is None:
            return self.fail_job(f"aggregator {wid} recalled its sums since round {since} "
                                 f"({reason}), and no snapshot that old is kept")  # fmt: skip
        self.rollback(target)

    def quarantine(self, wid, reason):
        log.error("worker %s quarantined: %s", wid, reason)
        self.counters["quarantined"] += 1
        self.members.quarantine(wid, reason)

    def rollback(self, target):
        job = self.job
        arrays, meta = job.verifier.snapshots[target]
        log.warning("job %s rolls back from round %d to %d", job.id, job.engine.next_round, target)
        self.counters["rollbacks"] += 1
        job.engine.restore(arrays, meta)
        job.verifier.rolled_back(target)
        self.end_lease()
        job.gen, job.round = job.gen + 1, None
        job.leases.clear()
        job.early.clear()
        if not self.checkpoint():  # the one on disk may hold what the liar said: never resume
            self.store.drop_checkpoint(job.id)  # from it (a restart redoes the job instead)
        self.start_round()

    def unchecked_contributors(self, r):
        """Who had sums in round `r` accepted on its word alone. An aggregator counts even
        when we checked its sums: they may stand on its workers' unchecked word, which it
        can RECALL, and the rollback then needs a snapshot from before its first round."""
        answered = {w for res in r.results.values() for w in res}
        below = {w for w in answered if self.members.is_aggregator(w)}
        return sorted(below | {w for w, blocks in r.unverified.items() if blocks})
