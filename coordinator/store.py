"""What survives a coordinator crash: the job queue in SQLite (WAL) and checkpoints written
atomically (temp file, fsync, rename), all under one state directory.

A submit is acknowledged only after its row is committed; a checkpoint file is either the
old one or the new one, never half of one.
"""

import json
import os
import signal
import sqlite3
import time

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    owner TEXT,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    updated REAL NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    total_rounds INTEGER NOT NULL DEFAULT 0,
    checkpoint_round INTEGER,
    error TEXT,
    result TEXT,
    placement TEXT,
    summary TEXT
)
"""
# Every column but `result`, which holds a finished job's metrics, a row per round: reading
# and parsing it costs tens of ms per 10,000 rounds, and `status` lists a hundred jobs. Its
# small part (digest, eval) is kept apart in `summary`; `metrics()` reads the rest.
_COLUMNS = (
    "seq, id, name, spec, owner, state, submitted, updated, round, total_rounds, "
    "checkpoint_round, error, placement, summary"
)
ACTIVE = ("queued", "running", "paused")
FINAL = ("done", "failed", "cancelled")
_META = "__meta__"


class Store:
    def __init__(self, state_dir: str):
        self.dir = os.path.abspath(state_dir)
        os.makedirs(os.path.join(self.dir, "jobs"), exist_ok=True)
        self.db = sqlite3.connect(os.path.join(self.dir, "queue.sqlite3"), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we ack
        self.db.execute(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        if "placement" not in columns:  # a state directory from before placement
            self.db.execute("ALTER TABLE jobs ADD COLUMN placement TEXT")
        if "summary" not in columns:  # ... or before summary
            self.db.execute("ALTER TABLE jobs ADD COLUMN summary TEXT")
        # Results without their summary (from before it, or written since by an older
        # coordinator): made on every open, so a crash half-way only leaves work for the next.
        done = self.db.execute(
            "SELECT id, result FROM jobs WHERE result IS NOT NULL AND summary IS NULL"
        )
        for job_id, result in done.fetchall():
            summary = json.dumps(_summary(json.loads(result)))
            self.db.execute("UPDATE jobs SET summary = ? WHERE id = ?", (summary, job_id))

    # ---- the queue --------------------------------------------------------------------------
    def add_job(self, name: str, spec: dict, owner: str | None, total_rounds: int) -> str:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO jobs (id, name, spec, owner, state, submitted, updated, total_rounds)"
                " VALUES ('', ?, ?, ?, 'queued', ?, ?, ?)",
                (name, json.dumps(spec), owner, now, now, total_rounds),
            )
            job_id = f"job-{cur.lastrowid:06d}"
            self.db.execute("UPDATE jobs SET id = ? WHERE seq = ?", (job_id, cur.lastrowid))
        return job_id

    def update(self, job_id: str, **fields) -> None:
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db:
            self.db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def job(self, job_id: str) -> dict | None:
        """The job's row; its "result" is the summary (digest, eval), without the metrics."""
        row = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row) if row else None

    def jobs(self, limit: int = 100) -> list[dict]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        return [_row(r) for r in rows][::-1]

    def metrics(self, job_id: str) -> list[dict]:
        """A finished job's metrics rows ([] for a job with no result)."""
        row = self.db.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0])["metrics"] if row and row[0] else []

    def count(self, states=ACTIVE) -> int:
        marks = ",".join("?" * len(states))
        return self.db.execute(
            f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states
        ).fetchone()[0]

    def next_job(self) -> dict | None:
        """The job to run: an unfinished one that was running (resume it), else the oldest
        queued one (FIFO)."""
        row = (
            self.db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('running', 'paused') "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
            or self.db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
        )
        return _row(row) if row else None

    # ---- checkpoints and results ------------------------------------------------------------
    def _path(self, job_id: str, kind: str) -> str:
        return os.path.join(self.dir, "jobs", f"{job_id}.{kind}.npz")

    def save_checkpoint(self, job_id: str, arrays: dict, meta: dict) -> None:
        atomic_save(self._path(job_id, "checkpoint"), arrays, meta)
        self.update(job_id, checkpoint_round=meta["round"], round=meta["round"])

    def load_checkpoint(self, job_id: str):
        return load(self._path(job_id, "checkpoint"))

    def save_result(self, job_id: str, arrays: dict, result: dict) -> None:
        atomic_save(self._path(job_id, "weights"), arrays, result)
        summary = json.dumps(_summary(result))
        self.update(job_id, state="done", result=json.dumps(result), summary=summary)

    def load_result(self, job_id: str):
        return load(self._path(job_id, "weights"))

    def drop_checkpoint(self, job_id: str) -> None:
        try:
            os.unlink(self._path(job_id, "checkpoint"))
        except FileNotFoundError:
            pass


def _row(row) -> dict:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    summary = d.pop("summary")
    d["result"] = json.loads(summary) if summary else None
    return d


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "metrics"}


def atomic_save(path: str, arrays: dict, meta: dict) -> None:
    """Write `arrays` + JSON `meta` as .npz to a temp file, fsync it, rename it over `path`,
    fsync the directory: a crash at any point leaves either the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    _fault_point()
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str):
    """(arrays, meta) of a file written by atomic_save, or None if there is none."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != _META}
            meta = json.loads(z[_META].tobytes().decode())
    except FileNotFoundError:
        return None
    return arrays, meta


_writes = [0]


def _fault_point() -> None:
    """Fault injection for the crash-during-checkpoint test: with
    SHARDGRAD_FAULT_KILL_AT_WRITE=N the process kills itself (SIGKILL) between writing and
    renaming its N-th file. Never set in production."""
    at = os.environ.get("SHARDGRAD_FAULT_KILL_AT_WRITE")
    if at:
        _writes[0] += 1
        if _writes[0] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
