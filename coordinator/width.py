"""How many of the live workers a job's rounds are spread over: all of them, or one on a
lease (worker.Lease), whichever this job's rounds show to be faster.

A round through N workers costs a round trip F plus its compute C/N (on a lease of several
less F, but they share the machine); one worker on a lease pays no round trip at all (it
steps its own copy), only C. So when C/N + F > C, as for a
small model on few cores, a second worker makes the job slower, and the coordinator keeps
the others standing by: live, checking the blocks `verify` draws, and taking over a lost
lease holder's blocks. The bits are the same either way (the determinism contract).

The choice is measured, not guessed: `probe` rounds on all live workers and `probe` on one,
in stretches of STRETCH rounds (after WARMUP more) ordered all, one, one, all, all, one, ...
(so a machine whose speed drifts steadily weighs on both alike), and the lower median
stretch pace wins. A stretch's pace is its span from step to step over its rounds, the
first ones included: ahead on a lease, workers may compute a stretch's later rounds while
the coordinator is still on its first ones (it yields the CPU to them, and steps a few
rounds at once), so the paces of single rounds say little. Rounds completed by what was
computed ahead under an earlier lease (the other way's) do not count. A new set of
live workers, or `hold` rounds, and it probes again.

Two things paid once, not every round, would otherwise decide it. A job's (or a new
worker's) first rounds are slow (data loaded, memory faulted in): the probe begins with a
stretch on all that does not count. And a stretch that switches way pays the switch (a
lease ended and what its holders computed ahead dropped, another granted with the state):
10-15 ms on 2 cores, as much as the rest of a 4-round stretch of a small model. Each way
has as many switching stretches as not; stretches of 8 rounds keep the switch a small part
of each. Measured (784-256-256-10, B=256, k=2, 2 workers on 2 cores, where all is 20 %
faster): stretches of 4 with no first stretch chose all in 2 of 14 jobs; with it, 26 of 36;
stretches of 8, 18 of 18 (and one, rightly, in 12 of 12 jobs of two smaller models).
"""

import statistics

WARMUP = 2  # more rounds at the start of each stretch (its lease's grant), in its span
STRETCH = 8  # counted rounds per stretch


class Width:
    def __init__(self, probe: int, hold: int = 2000):
        self.probe, self.hold = probe, hold
        self.dealt: str | None = None  # how the round under way was dealt, if it counts
        self._restart(())

    def _restart(self, key: tuple):
        self.key, self.held = key, 0
        self.choice: str | None = None
        self.times: dict[str, list] = {"all": [], "one": []}  # stretch paces
        # The stretch under way (-1: the first, on all, which does not count) and the
        # rounds dealt in it
        self.stretch, self.into = -1, 0
        self.spent = 0.0  # seconds of the stretch under way's counted rounds

    def use(self, live: list[str], one: str | None) -> list[str]:
        """The workers the next round goes to: `live`, or [`one`] (the worker that would
        get the lease) while probing it or once it has won."""
        self.dealt = None
        if self.probe <= 0 or one is None or len(live) < 2:
            return live
        if tuple(live) != self.key:
            self._restart(tuple(live))
        if self.choice is None and self.into >= self.stretch_rounds():
            self.stretch, self.into, self.spent = self.stretch + 1, 0, 0.0
        self.dealt = self.choice or ("all" if self.stretch % 4 in (0, 3) else "one")
        return [one] if self.dealt == "one" else live

    def observe(self, round_s: float, ahead: bool = False, rounds: int = 1) -> str | None:
        """The round dealt by the last `use` cost `round_s` (its pace; `ahead`: with sums
        computed ahead under an earlier lease; `rounds` of them at that pace: a span of a
        lease the coordinator follows, which may run a stretch past its length); a sentence
        for the log when a choice is made."""
        mode, self.dealt = self.dealt, None
        if mode is None:
            return None  # not probing (one worker, aggregators, --width-probe 0)
        if ahead and self.choice is None:
            # Done by what the last lease's holders had computed ahead (the lone holder's
            # before a stretch on all, the members' before one on one): it says nothing
            # about this way, and the stretch goes on without it.
            return None
        if self.choice is not None:
            self.held += rounds
            if self.held >= self.hold:  # conditions drift: measure again
                self._restart(self.key)
            return None
        self.into += rounds
        self.spent += round_s * rounds
        ends = self.into >= self.stretch_rounds() and self.into - rounds < self.stretch_rounds()
        if ends and self.stretch >= 0:
            self.times[mode].append(self.spent / self.into)
        one, every = self.times["one"], self.times["all"]
        stretches = self.stretches()
        if len(one) < stretches or len(every) < stretches:
            return None
        a, b = statistics.median(every), statistics.median(one)
        self.choice = "one" if b < a else "all"
        then = "one computes, the others stand by" if self.choice == "one" else "all compute"
        return (
            f"rounds take {b * 1e3:.2f} ms on one worker ahead on a lease and {a * 1e3:.2f} ms "
            f"on all {len(self.key)} (medians of {stretches} interleaved stretches): {then}"
        )

    def stretch_rounds(self) -> int:
        return WARMUP + min(STRETCH, self.probe)

    def stretches(self) -> int:
        """Counted stretches each way."""
        return -(-self.probe // STRETCH)

    def probe_rounds(self) -> int:
        """Rounds a whole probe takes: the first stretch, then each way's stretches."""
        return self.stretch_rounds() * (1 + 2 * self.stretches()) if self.probe > 0 else 0
