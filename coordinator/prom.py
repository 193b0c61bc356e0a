"""The coordinator's Prometheus side, served at `/metrics` by http.py: per-round
histograms and counters that the loop observes, and gauges read at scrape time from the
HTTP snapshot (workers by state, counters, jobs), never from the loop's own dicts.
"""

import math

from ..engine import row_seconds

WORKER_STATES = ("alive", "suspect", "quarantined", "dead", "left")
# Counters `status` can show, exported at 0 before they first happen so that a PromQL rate()
# has a series from the start; any other counter name is exported as soon as it appears.
KNOWN_COUNTERS = (
    "asked_again",
    "backup_blocks",
    "bad_message",
    "duplicate_grads",
    "forbidden",
    "internal_error",
    "job_faults",
    "late_grads",
    "leases_granted",
    "quarantined",
    "rate_limited",
    "refused",
    "revoked_key",
    "rollbacks",
    "unknown_block",
    "unknown_worker",
    "unroutable",
    "verified_blocks",
    "verify_mismatches",
    "verify_skipped",
    "worker_rate_limited",
    "workers_died",
    "write_errors",
)
# Rounds range from milliseconds (small MLPs on one machine) to minutes.
TIME_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
PHASES = ("pace", "round", "compute", "transfer", "reduce", "step")
HELP = {
    "pace": "Seconds per round from the previous step to its own: what a round costs the job "
    "(rounds on workers only)",
    "round": "Seconds per round, TASK sent to the last block reduced and stepped (ahead on a "
    "lease, the coordinator's part alone)",
}


class Metrics:
    def __init__(self, snapshot):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # the *_created series only double what a scrape shows

        # A private registry: several coordinators may live in one process (the tests).
        self.registry = CollectorRegistry(auto_describe=True)
        self.rounds = Counter(
            "shardgrad_rounds", "Rounds completed (all jobs)", registry=self.registry
        )
        self.samples = Counter(
            "shardgrad_samples", "Training samples processed (all jobs)", registry=self.registry
        )
        self.steps = Counter(
            "shardgrad_optimizer_steps", "Optimizer steps taken (all jobs)", registry=self.registry
        )
        self.hist = {
            phase: Histogram(
                f"shardgrad_{phase}_seconds",
                HELP.get(phase, f"Seconds of each round spent in {phase}"),
                buckets=TIME_BUCKETS,
                registry=self.registry,
            )
            for phase in PHASES
        }
        self.samples_per_s = Gauge(
            "shardgrad_samples_per_second",
            "Samples per second over the last round",
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshot))

    def observe_round(self, row: dict) -> None:
        """A round's metrics row (loop thread)."""
        self.rounds.inc()
        self.samples.inc(_num(row.get("samples_per_s")) * _num(row_seconds(row)))
        if row.get("loss") is not None:
            self.steps.inc()
        for phase in PHASES:
            v = row.get(f"{phase}_s")
            if v is not None and math.isfinite(v):
                self.hist[phase].observe(max(0.0, v))
        if row.get("samples_per_s") is not None:
            self.samples_per_s.set(row["samples_per_s"])


def _num(v) -> float:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else 0.0


class _SnapshotCollector:
    """Gauges and counters read from the latest snapshot at scrape time."""

    def __init__(self, snapshot):
        self.snapshot = snapshot  # () -> the latest snapshot, or None

    def describe(self):
        return []  # built per scrape from the snapshot; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot() or {"workers": [], "counters": {}, "jobs": []}
        by_state = GaugeMetricFamily(
            "shardgrad_workers", "Workers known to the coordinator, by state", labels=["state"]
        )
        states = {s: 0 for s in WORKER_STATES}
        for w in snap["workers"]:
            states[w["state"]] = states.get(w["state"], 0) + 1
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state
        blocks = CounterMetricFamily(
            "shardgrad_worker_blocks_done",
            "Gradient blocks delivered by each worker (since it last joined)",
            labels=["worker"],
        )
        beat = GaugeMetricFamily(
            "shardgrad_worker_last_heartbeat_seconds",
            "Seconds since each worker was last heard from",
            labels=["worker", "state"],
        )
        for w in snap["workers"]:
            blocks.add_metric([w["id"]], w["blocks_done"])
            beat.add_metric([w["id"], w["state"]], w["last_heartbeat_s"])
        yield blocks
        yield beat
        counts = dict.fromkeys(KNOWN_COUNTERS, 0)
        counts.update(snap["counters"])
        for name, value in sorted(counts.items()):
            metric = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
            yield CounterMetricFamily(
                f"shardgrad_{metric}", f"Coordinator counter '{name}' (as in status)", value
            )
        yield from _job_metrics(snap["jobs"], snap.get("metrics", {}))


def _last(rows, key):
    """The latest value of `key` in a job's metrics rows (loss is only on step rounds,
    accuracy / mse only at epoch ends)."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def _job_metrics(jobs, metrics):
    from prometheus_client.core import GaugeMetricFamily

    fams = {
        "state": GaugeMetricFamily(
            "shardgrad_jobs", "Jobs in the queue database, by state", labels=["state"]
        ),
        "round": GaugeMetricFamily(
            "shardgrad_job_round", "Rounds done by each job", labels=["job_id", "name"]
        ),
        "total": GaugeMetricFamily(
            "shardgrad_job_rounds", "Rounds each job runs in all", labels=["job_id", "name"]
        ),
        "loss": GaugeMetricFamily(
            "shardgrad_job_loss", "Training loss at the last optimizer step", labels=["job_id"]
        ),
        "accuracy": GaugeMetricFamily(
            "shardgrad_job_heldout_accuracy",
            "Held-out accuracy at the last evaluation (epoch end)",
            labels=["job_id"],
        ),
        "mse": GaugeMetricFamily(
            "shardgrad_job_heldout_mse",
            "Held-out mean squared error at the last evaluation (epoch end)",
            labels=["job_id"],
        ),
    }
    states: dict[str, int] = {}
    for j in jobs:
        states[j["state"]] = states.get(j["state"], 0) + 1
        fams["round"].add_metric([j["id"], j["name"]], j["round"] or 0)
        fams["total"].add_metric([j["id"], j["name"]], j["total_rounds"] or 0)
        rows = metrics.get(j["id"], ())
        for key in ("loss", "accuracy", "mse"):
            v = _last(rows, key)
            if isinstance(v, int | float):
                fams[key].add_metric([j["id"]], v)
    for state in ("queued", "running", "paused", "done", "failed", "cancelled"):
        fams["state"].add_metric([state], states.get(state, 0))
    yield from fams.values()
