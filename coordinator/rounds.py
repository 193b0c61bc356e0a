"""One round's bookkeeping: which aligned blocks of the micro-batch tree are out with whom,
which have come back, and what to re-issue when a worker dies or straggles.

Blocks are keyed by (lo, hi); a delivery counts once, whoever sends it, so late and
duplicate results can never change the sum (docs/architecture.md, failure handling).
"""

import time

from ..core.sampling import assign_blocks, tree_sum


class Round:
    def __init__(self, index: int, n_micro: int, workers: list[str], per_worker: int = 2):
        self.index, self.n_micro = index, n_micro
        self.started = time.monotonic()
        self.delivered: dict[tuple, list] = {}
        self.holders: dict[tuple, set[str]] = {}  # block -> workers it is out with
        self.failures: dict[tuple, list[str]] = {}  # block -> workers whose result was bad
        self.compute_s: dict[str, float] = {}
        # When half the blocks were in: what the healthy workers take, stragglers aside.
        self.half_time: float | None = None
        self.assignment = assign_blocks(n_micro, workers, per_worker)
        for wid, blocks in self.assignment.items():
            for b in blocks:
                self.holders.setdefault(b, set()).add(wid)

    @property
    def blocks(self) -> list[tuple]:
        return sorted(self.holders)

    def pending(self) -> list[tuple]:
        return [b for b in self.blocks if b not in self.delivered]

    def owed_by(self, wid: str) -> list[tuple]:
        return [b for b in self.pending() if wid in self.holders[b]]

    def deliver(self, block: tuple, arrays: list, wid: str, compute_s: float) -> bool:
        """Accept a block's sum; False (ignore it) if unknown or already in."""
        if block not in self.holders or block in self.delivered:
            return False
        self.delivered[block] = arrays
        self.compute_s[wid] = self.compute_s.get(wid, 0.0) + compute_s
        if self.half_time is None and 2 * len(self.delivered) >= len(self.holders):
            self.half_time = time.monotonic() - self.started
        return True

    def complete(self) -> bool:
        return len(self.delivered) == len(self.holders)

    def total(self) -> list:
        """Finish the canonical tree from the delivered block sums."""
        return tree_sum(_never, 0, self.n_micro, known=self.delivered)

    def orphans(self, live: set[str]) -> list[tuple]:
        """Pending blocks that no live worker holds."""
        return [b for b in self.pending() if not (self.holders[b] & live)]

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

    def idle(self, live: list[str]) -> list[str]:
        return [w for w in live if not self.owed_by(w)]


def _never(i):
    raise AssertionError(f"micro-batch {i} was not covered by any delivered block")
