"""The live set: who registered, when each worker was last heard from, and the Paranoid
Pirate verdict (alive, suspect after two missed heartbeats, dead after `liveness`)."""

import time
from dataclasses import dataclass, field


@dataclass
class WorkerInfo:
    id: str
    joined: float
    last_seen: float
    blocks_done: int = 0
    state: str = "alive"  # alive | suspect | dead | left | quarantined
    reason: str = ""  # why it is quarantined
    info: dict = field(default_factory=dict)
    idle: bool = False  # its last heartbeat said it had nothing to do (none since a TASK)


class Membership:
    def __init__(self, interval: float = 0.5, liveness: int = 5):
        self.interval, self.liveness = interval, liveness
        self.workers: dict[str, WorkerInfo] = {}

    def heard(self, wid: str, info: dict | None = None) -> bool:
        """Record a sign of life; True if this worker is new (or back from the dead)."""
        now = time.monotonic()
        w = self.workers.get(wid)
        if w is None or w.state in ("dead", "left"):
            # Back from the dead by a heartbeat (which carries no info): keep its host / pid.
            self.workers[wid] = WorkerInfo(wid, now, now, info=info or (w.info if w else {}))
            return True
        w.last_seen = now
        if w.state != "quarantined":  # caught lying: it stays out until it is restarted
            w.state = "alive"
        if info and (
            info.get("pid") != w.info.get("pid") or info.get("seq", 0) >= w.info.get("seq", 0)
        ):
            # Replaced, not merged: a restarted process under the same id may no longer
            # offer what the old one did (shared memory, a lease, a peer port).
            w.info = dict(info)  # (never an older count from the same process)
        return False

    def quarantine(self, wid: str, reason: str) -> None:
        if wid in self.workers:
            self.workers[wid].state, self.workers[wid].reason = "quarantined", reason

    def leave(self, wid: str, state: str = "left") -> None:
        """Out of the live set: "left" (a BYE, or not reading) or "dead" (gone without one)."""
        if wid in self.workers:
            self.workers[wid].state = state

    def unreachable(self, wid: str, gone: bool) -> bool:
        """A send to live `wid` failed: its connection is `gone` (EHOSTUNREACH: dead, as the
        sweep would say) or it is not reading (left; alive after all, its next heartbeat
        registers it again). A quarantined one stays so. True if it just died."""
        if not self.is_live(wid):
            return False
        self.leave(wid, "dead" if gone else "left")
        return gone

    def sweep(self) -> list[str]:
        """Update verdicts; the ids that just died."""
        now, died = time.monotonic(), []
        for w in self.workers.values():
            if w.state in ("dead", "left", "quarantined"):
                continue
            silent = now - w.last_seen
            if silent > self.interval * self.liveness:
                w.state = "dead"
                died.append(w.id)
            elif silent > self.interval * 2:
                w.state = "suspect"
        # forget the long dead so the table stays small
        for wid in [
            w.id
            for w in self.workers.values()
            if w.state in ("dead", "left", "quarantined") and now - w.last_seen > 300
        ]:
            del self.workers[wid]
        return died

    def live(self) -> list[str]:
        """Workers that can take work, in a fixed order (assignment never depends on arrival
        order, though results would not either). An aggregator with no live workers behind
        it cannot."""
        return sorted(
            w.id
            for w in self.workers.values()
            if w.state in ("alive", "suspect") and self.capacity(w.id)
        )

    def capacity(self, wid: str) -> int:
        """How many workers compute behind this member: 1, or an aggregator's count."""
        return self.workers[wid].info.get("workers", 1)

    def on_this_host(self, wid: str) -> bool:
        """It said it reaches us over ipc:// and can read the weights from shared memory."""
        w = self.workers.get(wid)
        return w is not None and w.info.get("shm") is True

    def is_aggregator(self, wid: str) -> bool:
        w = self.workers.get(wid)
        return w is not None and w.info.get("role") == "aggregator"

    def capacities(self, wids) -> dict[str, int]:
        return {w: self.capacity(w) for w in wids}

    def beat(self, wid: str, idle) -> None:
        """What a heartbeat says of the worker's main loop (True: nothing to do; from an
        aggregator: all it was given has gone up)."""
        if wid in self.workers:
            self.workers[wid].idle = idle is True

    def busy(self, wid: str) -> None:
        """A TASK is on its way to it: whatever its last heartbeat said is out of date."""
        if wid in self.workers:
            self.workers[wid].idle = False

    def idle(self, wids) -> list[str]:
        return [w for w in wids if w in self.workers and self.workers[w].idle]

    def is_live(self, wid: str) -> bool:
        w = self.workers.get(wid)
        return w is not None and w.state in ("alive", "suspect")

    def table(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                **w.info,
                "id": w.id,
                "state": w.state,
                "last_heartbeat_s": round(now - w.last_seen, 3),
                "blocks_done": w.blocks_done,
                **({"reason": w.reason} if w.reason else {}),
            }
            for w in sorted(self.workers.values(), key=lambda w: w.id)
        ]
