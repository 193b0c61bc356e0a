"""The rounds a worker runs ahead of the coordinator on a lease: its own RoundEngine, and
the lease a TASK carries (docs/architecture.md, "A round, in order"). The worker's loop
drives it."""

from ..core.sampling import tree_sum
from ..shm import usable


class Lease:
    """The rounds a worker runs ahead: its own RoundEngine, restored from the state the
    coordinator sent, stepped with the round's block sums (its own, and its `peers'`), which
    are the coordinator's bit for bit (the determinism contract); so its next round's
    weights are the coordinator's too."""

    def __init__(self, job, lease_id, window, blocks, engine, by_shm, peers, follow=0,
                 reports=False):  # fmt: skip
        self.job, self.id, self.window, self.blocks = job, lease_id, window, blocks
        self.engine, self.by_shm = engine, by_shm
        self.peers: dict = peers  # peer -> (endpoint, its blocks): a lease of several
        self.got: dict = {}  # round -> block -> a peer's sum (Peers.take)
        self.known = engine.next_round  # the coordinator's next round, as far as we know
        # Followed (coordinator/lease.py follow_rounds): past the TASK's round we send the
        # coordinator no sums, and the reporter sends it our state at each sync_due.
        self.follow, self.reports = follow, reports
        self.first = engine.next_round  # the TASK's round, reported as any
        self.rows: list = []  # metrics rows of the rounds since the last STATE
        self.compute_s = 0.0  # the last round's compute, for its row

    def sync_due(self) -> bool:
        """The reporter sends its state now: every `follow` rounds, at an epoch's end (the
        coordinator evaluates there) and at the job's."""
        e = self.engine
        n = e.next_round
        return bool(self.rows) and (n % self.follow == 0 or e.done or e.rt.position(n)[1] == 0)

    def can_go(self) -> bool:
        e = self.engine
        return not e.done and e.next_round < self.known + self.window

    def missing(self) -> bool:
        """Some peer's sum of the round we are in has not come yet."""
        have = self.got.get(self.engine.next_round, {})
        return len(have) < sum(len(blocks) for _, blocks in self.peers.values())

    def step(self, known: dict) -> None:
        rnd = self.engine.next_round
        self.got.pop(rnd, None)
        row = self.engine.step(tree_sum(_never, 0, self.engine.rt.n_micro, known=known))
        if self.follow and self.reports and rnd > self.first:
            self.rows.append({**row, "compute_s": self.compute_s})


def lease_of(msg) -> tuple | None:
    """A TASK's lease: (id, window, state arrays, state meta, peers, follow, reports), or
    None. `peers`: peer -> (endpoint, its blocks), in a lease of several; `follow`: rounds
    between our states (a lease of several the coordinator follows; else 0); `reports`: we
    are the member that sends them."""
    lease = msg.get("lease")
    if lease is None:
        return None
    if not isinstance(lease, dict):
        raise ValueError("TASK 'lease' must be a map")
    lid, window, meta = lease.get("id"), lease.get("window"), lease.get("state")
    if type(lid) is not int or type(window) is not int or not 1 <= window <= 64:
        raise ValueError(f"TASK lease: bad id or window ({lid!r}, {window!r})")
    follow, reports = lease.get("follow", 0), lease.get("reports", False) is True
    if type(follow) is not int or not 0 <= follow <= 32:
        raise ValueError(f"TASK lease: bad follow {follow!r}")
    if not isinstance(meta, dict):
        raise ValueError("TASK lease: 'state' must be a map")
    arrays = {k[6:]: a for k, a in msg.arrays.items() if k.startswith("state.")}
    peers = {}
    for entry in lease.get("peers", []):
        wid, endpoint, blocks = entry if isinstance(entry, list) and len(entry) == 3 else (0,) * 3
        if not (isinstance(wid, str) and isinstance(endpoint, str) and usable(endpoint)):
            raise ValueError(f"TASK lease: bad peer {str(entry)[:100]}")
        peers[wid] = (endpoint, [(int(lo), int(hi)) for lo, hi in blocks])
    return lid, window, arrays, meta, peers, (follow if peers else 0), reports


def _never(i):
    raise AssertionError(f"micro-batch {i} is in no block of the lease")
