"""One round's bookkeeping: which aligned blocks of the micro-batch tree are out with whom,
what has come back, which blocks are checked by a second worker, and what to re-issue when
a worker dies, straggles, faults or lies.

Blocks are keyed by (lo, hi); a block is accepted once, whoever sends it, so late and
duplicate results can never change the sum (docs/architecture.md, failure handling).
A checked block is accepted only when two different workers sent the same bits.
"""

import statistics
import time

import numpy as np

from ..core.sampling import assign_blocks, tree_sum


def straggler_deadline(times: list, floor: float, factor: float = 3.0) -> float:
    """Seconds before a round's stragglers get backups: `factor` × the median of how long
    recent rounds took to get half their blocks in, never below `floor`. Fewer than three
    rounds are no pace yet (one slowed by a backup would hold the next ones hostage)."""
    recent = times[-20:]
    if len(recent) < 3:
        return floor
    return max(floor, factor * statistics.median(recent))


def same_bits(a: list, b: list) -> bool:
    """Bitwise equality of two block sums (not ==: -0.0 and 0.0 differ here)."""
    pairs = zip(a, b, strict=True)
    return all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in pairs)


class Round:
    def __init__(
        self,
        index: int,
        n_micro: int,
        workers: list[str],
        per_worker: int = 2,
        checked=lambda block: False,
        capacity: dict | None = None,
        assignment: dict | None = None,
        checkers: list[str] | None = None,
    ):
        self.index, self.n_micro = index, n_micro
        self.started = time.monotonic()
        self.delivered: dict[tuple, list] = {}  # accepted block sums
        self.results: dict[tuple, dict[str, list]] = {}  # block -> worker -> its sum
        self.holders: dict[tuple, set[str]] = {}  # block -> workers it is out with
        self.failures: dict[tuple, list[str]] = {}  # block -> workers whose attempt failed
        self.unverified: dict[str, set] = {}  # worker -> blocks accepted on its word alone
        self.compute_s: dict[str, float] = {}
        # When half the blocks were in: what the healthy workers take, stragglers aside.
        self.half_time: float | None = None
        self.checks: set[tuple] = set()
        self.checking: dict[str, list] = {}  # worker -> the blocks it got as a check
        self.ahead = 0  # block sums a worker computed ahead on a lease
        self.asked: dict[str, float] = {}  # worker -> when it was last asked again
        self.said_waiting = 0.0  # when the log last said who it waits on, past the deadline
        self.checked = checked
        self.assignment: dict[str, list] = {}
        if assignment is None:
            assignment = assign_blocks(n_micro, workers, per_worker, capacity)
        # Checked blocks go to a second worker among `checkers` (default: `workers`): while
        # one worker computes ahead on a lease, those standing by still check it.
        self.add(assignment, checkers or workers)

    def add(self, assignment: dict, workers: list[str]) -> dict[str, list]:
        """Take on new blocks (an aggregator's round grows as its upstream sends more);
        those drawn for checking also go to a second, different worker. Returns what was
        added, worker -> blocks."""
        new = []
        for wid, blocks in assignment.items():
            self.assignment.setdefault(wid, []).extend(blocks)
            for b in blocks:
                self.holders.setdefault(b, set()).add(wid)
                new.append(b)
        added = {w: list(b) for w, b in assignment.items()}
        # Checked blocks also go to a second, different worker (needs two workers).
        checks = sorted(b for b in new if len(workers) > 1 and self.checked(b))
        self.checks.update(checks)
        for b in checks:
            for wid, blocks in self.reissue([b], workers, avoid=set(self.holders[b])).items():
                self.assignment.setdefault(wid, []).extend(blocks)
                self.checking.setdefault(wid, []).extend(blocks)
                added.setdefault(wid, []).extend(blocks)
        return added

    @property
    def blocks(self) -> list[tuple]:
        return sorted(self.holders)

    def pending(self) -> list[tuple]:
        return [b for b in self.blocks if b not in self.delivered]

    def waiting_on(self, block: tuple, live=None) -> set[str]:
        """Holders of a pending block that have not answered for it yet; with `live` (a
        set), only those still live: one that left or died is waited on no more."""
        waiting = self.holders[block] - set(self.results.get(block, ()))
        return waiting if live is None else waiting & live

    def owed_by(self, wid: str) -> list[tuple]:
        return [b for b in self.pending() if wid in self.waiting_on(b)]

    def deliver(self, block: tuple, arrays: list, wid: str, compute_s: float) -> str:
        """Take worker `wid`'s sum for a pending block: 'accepted' (on its word alone),
        'waiting' (a checked block needs a second result), 'verified' (two agree) or
        'mismatch' (they differ: someone must decide who lied)."""
        res = self.results.setdefault(block, {})
        res[wid] = arrays
        self.compute_s[wid] = self.compute_s.get(wid, 0.0) + compute_s
        if block not in self.checks:
            self._accept(block, arrays)
            self.unverified.setdefault(wid, set()).add(block)
            return "accepted"
        if len(res) < 2:
            return "waiting"
        first, *others = res.values()
        if all(same_bits(first, o) for o in others):
            self._accept(block, first)
            return "verified"
        return "mismatch"

    def accept_unchecked(self, block: tuple) -> str:
        """A checked block whose checker is gone with nobody else to ask: take the one
        result on its giver's word."""
        (wid, arrays), *_ = self.results[block].items()
        self.checks.discard(block)
        self._accept(block, arrays)
        self.unverified.setdefault(wid, set()).add(block)
        return wid

    def settle(self, block: tuple, truth: list) -> list[str]:
        """Accept `truth` (a third computation) for a mismatched block; who was wrong."""
        liars = [w for w, a in self.results[block].items() if not same_bits(a, truth)]
        self._accept(block, truth)
        return liars

    def discard(self, wid: str) -> None:
        """Forget everything `wid` sent or holds this round (it was caught lying)."""
        for block, res in self.results.items():
            if res.pop(wid, None) is not None and block in self.delivered:
                if block not in self.checks or not res:
                    del self.delivered[block]  # it stood on wid's word
        for holders in self.holders.values():
            holders.discard(wid)
        self.unverified.pop(wid, None)

    def unhold(self, wid: str, blocks: list[tuple]) -> None:
        """`wid` never got `blocks` (its TASK could not be sent): they are not out with it."""
        for b in blocks:
            if b in self.holders:
                self.holders[b].discard(wid)

    def _accept(self, block, arrays):
        self.delivered[block] = arrays
        if self.half_time is None and 2 * len(self.delivered) >= len(self.holders):
            self.half_time = time.monotonic() - self.started

    def complete(self) -> bool:
        return len(self.delivered) == len(self.holders)

    def total(self) -> list:
        """Finish the canonical tree from the accepted block sums: new arrays, never a
        block's own (it may be a view of a worker's ring, written again after the round)."""
        node = self.node_sum(0, self.n_micro)
        return [a.copy() for a in node] if (0, self.n_micro) in self.delivered else node

    def node_sum(self, lo: int, hi: int) -> list:
        """Node [lo, hi) of the canonical tree from the accepted blocks inside it."""
        return tree_sum(_never, lo, hi, known=self.delivered)

    def covers(self, lo: int, hi: int) -> bool:
        """Every block inside [lo, hi) is accepted (an aggregator can send that node)."""
        inside = [b for b in self.holders if lo <= b[0] < hi]
        return bool(inside) and all(b in self.delivered for b in inside)

    def orphans(self, live: set[str]) -> list[tuple]:
        """Pending blocks that no live worker is still working on."""
        return [b for b in self.pending() if not self.waiting_on(b, live)]

    def reissue(self, blocks: list[tuple], live: list[str], avoid=()) -> dict[str, list]:
        """Hand `blocks` to the least-loaded live workers (not those in `avoid` if there is
        any other choice). Returns worker -> blocks to send."""
        choices = [w for w in live if w not in avoid] or list(live)
        load = {w: len(self.owed_by(w)) for w in choices}
        out: dict[str, list] = {}
        for b in blocks:
            w = min(choices, key=lambda w: (load[w], w))
            load[w] += 1
            self.holders[b].add(w)
            out.setdefault(w, []).append(b)
        return out

    def lost(self, live: list[str]) -> tuple[dict[str, list], int]:
        """What dead workers held: a checked block whose checker is gone with nobody else to
        ask is taken on its one answer (counted); the rest go to live workers other than
        those who already answered for them. (worker -> blocks to send, checks skipped)"""
        orphans = self.orphans(set(live))
        skipped = 0
        for b in orphans:
            # (a worker whose attempt failed is no checker either: it would fail again)
            others = set(live) - set(self.results.get(b, ())) - set(self.failures.get(b, ()))
            if b in self.checks and self.results.get(b) and not others:
                self.accept_unchecked(b)
                skipped += 1
        orphans = [b for b in orphans if b not in self.delivered]
        return (self.reissue_avoiding_answerers(orphans, live) if live else {}), skipped

    def reissue_avoiding_answerers(self, blocks: list[tuple], live: list[str]) -> dict:
        """`blocks` to live workers other than those who already answered for each."""
        out: dict[str, list] = {}
        for b in blocks:
            for wid, got in self.reissue([b], live, avoid=set(self.results.get(b, ()))).items():
                out.setdefault(wid, []).extend(got)
        return out

    def ask_again(self, idle: list[str], every: float, live: list[str]) -> dict[str, list]:
        """Blocks that only one live worker is still expected to answer for (a backup makes
        two) while it says it has nothing to do (`idle`, by its heartbeat): its TASK or its
        result was lost on the way (a reconnect drops what was in flight). Nobody else may
        take a check, so the round would wait forever. Each worker at most once every
        `every` seconds. Worker -> blocks."""
        now, out, live = time.monotonic(), {}, set(live)
        for w in idle:
            sole = [b for b in self.owed_by(w) if self.waiting_on(b, live) == {w}]
            if sole and now - self.asked.get(w, -every) >= every:
                self.asked[w], out[w] = now, sole
        return out

    def idle(self, live: list[str]) -> list[str]:
        return [w for w in live if not self.owed_by(w)]

    def backups(self, live: list[str]) -> dict[str, list]:
        """Straggling blocks (one live holder still owes them: one that left or died is
        waited on no more) for idle workers, one each. A worker that already answered for a
        block never backs it up (its second answer would be dropped, and a checked block
        needs a different worker), nor one whose attempt at it failed. Worker -> blocks."""
        idle, out, alive = self.idle(live), {}, set(live)
        for b in self.pending():
            if len(self.waiting_on(b, alive)) != 1:
                continue
            free = [w for w in idle if w not in out and w not in self.holders[b]]
            free = [w for w in free if w not in self.results.get(b, ())]
            free = [w for w in free if w not in self.failures.get(b, ())]  # (it would again)
            if free:
                self.holders[b].add(free[0])
                out[free[0]] = [b]
        return out


def _never(i):
    raise AssertionError(f"micro-batch {i} was not covered by any accepted block")
