"""Human-readable views of the coordinator's state: `shardgrad status` and `shardgrad watch`.

Both only read what the client port returns (STATUS and METRICS); nothing here changes a job.
"""

import sys
import time

from tqdm import tqdm

from .engine import row_seconds

FINAL_STATES = ("done", "failed", "cancelled")
POLL_S = 0.2  # often enough for a lively bar, rare enough not to load the coordinator


# ---- status table ------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned text table (no dependency; copes with any terminal width)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _eval_text(job: dict) -> str:
    # A finished job has its final "eval"; a running one may have evaluated after an epoch.
    ev = job.get("eval") or {
        k: v for k, v in (job.get("last") or {}).items() if k in ("accuracy", "mse")
    }
    if "accuracy" in ev:
        return f"acc {ev['accuracy']:.2%}"
    if "mse" in ev:
        return f"mse {ev['mse']:.4g}"
    return "-"


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _one_line(text) -> str:
    # Errors can span lines (a spec's problems): keep each job on one row of the table.
    return " / ".join(line.strip() for line in (text or "").splitlines() if line.strip())


def _with_members(w: dict) -> list[list[str]]:
    """A worker's row; an aggregator's, then one indented row per worker behind it."""
    name = w["id"] + (f" (aggregator of {w['workers']})" if "workers" in w else "")
    rows = [[name, w["state"], _age(w.get("last_heartbeat_s")), str(w.get("blocks_done", 0))]]
    for m in w.get("members", []):
        state = m.get("state", "?") + (f": {m['reason']}" if m.get("reason") else "")
        rows.append([f"  └ {m.get('id', '?')}", state, "", ""])
    return rows


def format_status(status: dict) -> str:
    """The STATUS reply as text: a workers table, then the job (or jobs) table."""
    workers = status.get("workers", [])
    jobs = [status["job"]] if status.get("job") else status.get("jobs", [])
    parts = []
    if workers:
        rows = [row for w in workers for row in _with_members(w)]
        parts.append(_table(["WORKER", "STATE", "HEARTBEAT", "BLOCKS"], rows))
    else:
        parts.append("no workers connected")
    if jobs:
        rows = [
            [
                j["id"],
                j.get("name") or "-",
                j["state"],
                f"{j.get('round', 0)}/{_dash(j.get('total_rounds'))}",
                _dash(j.get("checkpoint_round")),
                _eval_text(j),
                _one_line(j.get("error")),
            ]
            for j in jobs
        ]
        parts.append(_table(["JOB", "NAME", "STATE", "ROUND", "CHECKPOINT", "EVAL", "ERROR"], rows))
    elif "jobs" in status:
        parts.append("no jobs")
    job = status.get("job")
    here = job and job.get("placement") == "coordinator"
    if job and job.get("micro_batches") and not here:
        k = job["micro_batches"]
        parts.append(
            f"{k} micro-batches of {job['micro_batch']} samples a round: up to {k} workers "
            "share one (smaller micro-batches let more share, at the contract's tax)"
        )
    if here:
        parts.append(
            "computed on the coordinator: its rounds cost less there than a round trip to a "
            "worker (placement = 'workers' in the spec sends it to the workers)"
        )
    for w in workers:
        if w.get("reason"):
            parts.append(f"{w['id']} {w['state']}: {w['reason']}")
    # Counters are the coordinator's dropped/bad-message tallies: worth seeing when nonzero.
    counters = {k: v for k, v in (status.get("counters") or {}).items() if v}
    if counters:
        parts.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return "\n\n".join(parts)


def print_status(status: dict, file=None) -> None:
    print(format_status(status), file=file or sys.stdout)


# ---- progress bar ------------------------------------------------------------------------


def _describe(job: dict) -> str:
    if job["state"] == "paused":
        return f"{job['id']} paused (waiting for workers)"
    if job["state"] == "queued":
        return f"{job['id']} queued"
    return f"{job['id']} {job.get('name') or ''}".rstrip()


class _Postfix:
    """The latest loss / samples/s / accuracy seen in the metrics stream."""

    def __init__(self):
        self.seen = 0  # metrics rows already read: the next METRICS asks only for newer ones
        self.values: dict[str, str] = {}

    def update(self, rows: list[dict]) -> bool:
        self.seen += len(rows)
        for row in rows:
            # With accumulate_steps > 1 only the step's last round carries "loss".
            if row.get("loss") is not None:
                self.values["loss"] = f"{row['loss']:.4f}"
            if row.get("accuracy") is not None:
                self.values["acc"] = f"{row['accuracy']:.2%}"
        rate = _throughput(rows)
        if rate is not None:
            self.values["samples/s"] = f"{rate:,.0f}"
        return bool(rows)


def _throughput(rows: list[dict]) -> float | None:
    """Samples/s over the new rows, weighted by what each round cost (its pace, else its
    span: engine.row_seconds): one round's own figure jumps around too much to read."""
    timed = [(r["samples_per_s"], row_seconds(r)) for r in rows if r.get("samples_per_s")]
    timed = [(rate, s) for rate, s in timed if isinstance(s, int | float) and s > 0]
    seconds = sum(s for _, s in timed)
    if seconds > 0:
        return sum(rate * s for rate, s in timed) / seconds
    last = [r["samples_per_s"] for r in rows if r.get("samples_per_s")]
    return last[-1] if last else None


def watch(client, job_id: str, poll: float = POLL_S, file=None) -> dict:
    """Show a progress bar over the job's rounds until it is done, failed or cancelled.
    Returns the job's final status (the "job" table of STATUS: state, error, eval, ...)."""
    job = client.status(job_id)["job"]
    post = _Postfix()
    with tqdm(
        total=job.get("total_rounds") or None,
        desc=_describe(job),
        unit="round",
        file=file or sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        while True:
            if post.update(client.metrics(job_id, since=post.seen)):
                bar.set_postfix(post.values, refresh=False)
            bar.set_description(_describe(job), refresh=False)
            bar.n = job.get("round") or 0
            bar.refresh()
            if job["state"] in FINAL_STATES:
                break
            time.sleep(poll)
            job = client.status(job_id)["job"]
    return job  # the caller reports a failure: it knows whether that is an error
