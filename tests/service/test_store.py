"""The job queue's rows: a finished job's metrics (a row per round) stay out of what
`status` and `jobs` read, and a state directory from before that split still opens."""

import json
import sqlite3

import numpy as np

from shardgrad.coordinator.store import Store

RESULT = {
    "digest": "ab" * 32,
    "eval": {"accuracy": 0.5},
    "metrics": [{"round": r, "loss": 1.0 / (r + 1)} for r in range(1000)],
}


def test_a_job_row_carries_its_summary_and_the_metrics_are_read_apart(tmp_path):
    store = Store(str(tmp_path))
    job = store.add_job("j", {"micro_batch": 2, "global_batch": 4}, None, 1000)
    assert store.job(job)["result"] is None and store.metrics(job) == []
    store.save_result(job, {"w0": np.zeros(3)}, RESULT)
    row = store.job(job)
    assert row["state"] == "done"
    assert row["result"] == {"digest": RESULT["digest"], "eval": RESULT["eval"]}
    assert [r["result"] for r in store.jobs()] == [row["result"]]
    assert store.metrics(job) == RESULT["metrics"]
    assert store.next_job() is None


def test_a_state_directory_from_before_the_summary_column_opens_with_its_results(tmp_path):
    db = sqlite3.connect(str(tmp_path / "queue.sqlite3"))
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
        "name TEXT NOT NULL, spec TEXT NOT NULL, owner TEXT, state TEXT NOT NULL, "
        "submitted REAL NOT NULL, updated REAL NOT NULL, round INTEGER NOT NULL DEFAULT 0, "
        "total_rounds INTEGER NOT NULL DEFAULT 0, checkpoint_round INTEGER, error TEXT, "
        "result TEXT)"
    )
    db.execute(
        "INSERT INTO jobs (id, name, spec, state, submitted, updated, result) VALUES "
        "('job-000001', 'old', '{}', 'done', 0, 0, ?), "
        "('job-000002', 'waiting', '{}', 'queued', 0, 0, NULL)",
        (json.dumps(RESULT),),
    )
    db.commit()
    db.close()
    store = Store(str(tmp_path))
    assert store.job("job-000001")["result"] == {"digest": RESULT["digest"], "eval": RESULT["eval"]}
    assert store.metrics("job-000001") == RESULT["metrics"]
    assert store.job("job-000002")["result"] is None
    assert store.next_job()["id"] == "job-000002"
    assert Store(str(tmp_path)).job("job-000001")["placement"] is None  # (opens again)
    # a result written by an older coordinator after the column came: filled in on open
    store.db.execute("UPDATE jobs SET result = ?, state = 'done' WHERE id = 'job-000002'",
                     (json.dumps(RESULT),))  # fmt: skip
    assert store.job("job-000002")["result"] is None
    assert Store(str(tmp_path)).job("job-000002")["result"]["digest"] == RESULT["digest"]
