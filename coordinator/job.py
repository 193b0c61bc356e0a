"""What the coordinator knows: its configuration, and the job it is running (`ActiveJob`:
the round engine, the round under way, the lease, the width, what came early)."""

from dataclasses import dataclass, field

from .. import wire
from ..engine import RoundEngine
from ..training import JobRuntime
from .placement import DEFAULT_INLINE_BELOW_S
from .rounds import Round
from .verify import Verifier
from .width import Width


@dataclass
class Config:
    heartbeat_interval: float = 0.5  # seconds between worker heartbeats
    liveness: int = 5  # missed heartbeats before a worker is dead (2.5 s by default)
    min_deadline: float = 5.0  # a round's straggler deadline is never shorter than this
    deadline_factor: float = 3.0  # ... and otherwise this many times the median round
    blocks_per_worker: int = 2
    max_queued_jobs: int = 100
    dry_run_seconds: float = 10.0  # bound on the submit-time dry run of micro-batch 0
    inline_below_s: float = DEFAULT_INLINE_BELOW_S  # rounds cheaper than this run here
    lease_window: int = 8  # rounds workers on a lease may run ahead of our step (0: never)
    follow: int = 8  # a lease of several sends us its state every this many rounds (0: never)
    peer_leases: bool = True  # workers on our host may share a lease (worker/peers.py)
    width_probe: int = 32  # rounds to time all workers vs one on a lease (0: always all)
    write_retry_s: float = 300.0  # a job's result that cannot be written: retried this long
    # Our process's niceness: workers sharing our host get the CPU first. Ahead on a lease
    # they never wait on our step, so what we do is off their path; and at the window's
    # end they wait, so we get the CPU then (docs/architecture.md, the round).
    nice: int = 10
    limits: wire.Limits = field(default_factory=lambda: wire.DEFAULT_LIMITS)
    # The client port gets much tighter limits (requests carry no arrays), a small queue per
    # peer and a per-peer token bucket (messages/s, burst); rate 0 turns the bucket off.
    client_limits: wire.Limits = field(default_factory=lambda: wire.CLIENT_PORT_LIMITS)
    client_hwm: int = 100
    client_rate: float = 200.0
    client_burst: int = 400
    worker_rate: float = 2000.0  # per worker connection: far above heartbeats + GRADS
    worker_burst: int = 4000


@dataclass
class Lease:
    """Workers running ahead of our step (worker.Lease): one alone, or several on our host
    that send each other their sums (worker/peers.py)."""

    id: int
    blocks: dict  # member -> its blocks of every round (together: the whole round)
    told: int = 0  # the round the last STEPPED said (sent every few rounds, not each)
    # Rounds between the training states `reporter` sends us (STATE), which we take in
    # place of our own steps; 0: we step every round with the members' sums (Leases.follow)
    follow: int = 0
    reporter: str | None = None


@dataclass
class ActiveJob:
    id: str
    engine: RoundEngine
    spec: dict  # the spec as sent in every TASK, built once
    verifier: Verifier
    round: Round | None = None
    round_times: list = field(default_factory=list)
    warm: bool = False  # a round has finished since this job (re)started here
    state: str = "running"
    gen: int = 0  # bumped by a rollback: workers drop TASKs of the abandoned timeline
    layout: list = field(default_factory=list)  # what a GRADS carries: rt.sum_layout()
    placement: str = "workers"  # or "coordinator": its rounds are computed here
    here_from: int = 0  # the round from which this coordinator life placed it
    next_checkpoint: float = 0.0  # (monotonic) placed here: none before this, see after_step
    lease: Lease | None = None  # the workers running ahead of us, if any
    # Every lease of this timeline, id -> its members. What a worker computed ahead under one
    # of them stands on this timeline's weights, so it is right for its round whoever else
    # computed the rounds between (the determinism contract); a rollback voids them all.
    leases: dict = field(default_factory=dict)
    width: Width = field(default_factory=lambda: Width(probe=0))  # (Jobs.start_next_job sets it)
    early: dict = field(default_factory=dict)  # round -> GRADS / FAULTs computed ahead
    early_states: dict = field(default_factory=dict)  # first round -> (worker, STATE), early
    last_step: float = 0.0  # (monotonic) when a round last stepped, for the width's pace
    window: int = 0  # rounds its lease may run ahead: lease_window, less for a big model
    unwritten: str | None = None  # why its result could not be written yet (retried)
    write_retry: tuple = (0.0, 0.0, 1.0)  # (first failure, next attempt, delay): monotonic

    @property
    def rt(self) -> JobRuntime:
        return self.engine.rt

    @property
    def here(self) -> bool:
        """Its rounds are computed by the coordinator itself (placement)."""
        return self.placement == "coordinator"
