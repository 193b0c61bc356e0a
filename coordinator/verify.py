"""Verified gradients: which blocks a second worker recomputes, and what to roll back to
when a worker is caught lying.

Every block's right answer is a pure function of the spec (the determinism contract), so
two honest workers always agree bit for bit. The coordinator draws the checked blocks
itself from the OS's randomness, so no worker can tell which of its blocks are checked.
A block accepted on one worker's word is an *unverified contribution*: once that worker is
caught, everything since its first one is suspect, and the job rolls back to the snapshot
taken before it (kept in memory; they are only taken while some worker has no unverified
contribution yet, so in steady state there is none to take).
"""

import random


class Verifier:
    def __init__(self, fraction: float):
        self.fraction = fraction
        self._rng = random.SystemRandom()  # unpredictable to workers, unlike the job seed
        self.first_unverified: dict[str, int] = {}  # worker -> round of its first one
        self.snapshots: dict[int, tuple] = {}  # round -> engine.pack(copy=True) before it

    def draw(self, block) -> bool:
        return self.fraction > 0 and self._rng.random() < self.fraction

    def needs_snapshot(self, round_: int, workers) -> bool:
        """Before round `round_`: would a rollback ever need to land exactly here?"""
        if not 0 < self.fraction < 1 or round_ in self.snapshots:
            return False  # all blocks checked (or none): nothing unverified to undo
        return any(w not in self.first_unverified for w in workers)

    def keep(self, round_: int, snapshot: tuple) -> None:
        self.snapshots[round_] = snapshot

    def contributed(self, round_: int, workers) -> None:
        """Round `round_` finished with unverified blocks from `workers`."""
        for w in workers:
            self.first_unverified.setdefault(w, round_)
        needed = set(self.first_unverified.values())
        for r in [r for r in self.snapshots if r <= round_ and r not in needed]:
            del self.snapshots[r]

    def rollback_target(self, liar: str) -> int | None:
        """The round to restart from so that nothing `liar` said unchecked survives; None
        if it never contributed unchecked (nothing to undo before this round)."""
        first = self.first_unverified.pop(liar, None)
        if first is None:
            return None
        return max((r for r in self.snapshots if r <= first), default=None)

    def recall_target(self, since: int) -> int | None:
        """The round to restart from so that nothing said from round `since` on survives."""
        return max((r for r in self.snapshots if r <= since), default=None)

    def rolled_back(self, round_: int) -> None:
        """Contributions from `round_` on were undone."""
        for w in [w for w, r in self.first_unverified.items() if r >= round_]:
            del self.first_unverified[w]
        for r in [r for r in self.snapshots if r > round_]:
            del self.snapshots[r]
