"""The `shardgrad` command, the progress views, the demo job and the README's examples.

Every subprocess has a timeout; clusters use ipc sockets in private temp dirs (no fixed
ports), so this file runs under xdist next to anything else.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from shardgrad.cluster import LocalCluster
from shardgrad.demo import DEMO_SPEC, demo_spec, heldout_accuracy
from shardgrad.jobspec import parse_spec
from shardgrad.progress import _throughput, format_status, watch
from shardgrad.training import train_local, weights_digest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 120  # seconds for any one subprocess: generous, so a slow CI box is not a failure

# A quick job: 30 rounds on digits, well under a second.
SMALL_SPEC = """
name = "cli-small"
model = [{ type = "linear", out = 32 }, { type = "relu" }, { type = "linear", out = 10 }]
input_shape = [64]
global_batch = 32
micro_batch = 8
rounds = 30
seed = 1

[optimizer]
type = "sgd"
lr = 0.1
momentum = 0.9

[data]
source = "builtin:digits"
"""


def shardgrad(*args, cwd=None, timeout=TIMEOUT):
    """Run the installed `shardgrad` command (the console script next to this Python)."""
    script = Path(sys.executable).with_name("shardgrad")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "shardgrad.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- submit: invalid specs fail before any network -----------------------------------------

BAD_SPECS = {
    "unknown key": (
        SMALL_SPEC.replace("rounds = 30", "rounds = 30\nmicro_batchs = 4"),
        "unknown key 'micro_batchs' (did you mean 'micro_batch'?)",
    ),
    "micro_batch does not divide": (
        SMALL_SPEC.replace("micro_batch = 8", "micro_batch = 7"),
        "micro_batch: 7 does not divide global_batch 32",
    ),
    "bad layer type": (
        SMALL_SPEC.replace('type = "relu"', 'type = "dense"'),
        "model[1].type: expected one of linear",
    ),
    "missing lr": (
        SMALL_SPEC.replace("lr = 0.1\n", ""),
        "optimizer.lr: missing",
    ),
    "not TOML": ("name = \n", "spec is not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_submit_bad_spec_fails_before_contacting_the_coordinator(tmp_path, case):
    text, message = BAD_SPECS[case]
    spec = write(tmp_path / "bad.toml", text)
    # A socket where the coordinator would be: it must receive nothing. With a long client
    # timeout, a submit that did try the network would also be far slower than it is.
    ctx = zmq.Context.instance()
    trap = ctx.socket(zmq.ROUTER)
    trap.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/coordinator"
    trap.bind(address)
    try:
        t0 = time.monotonic()
        r = shardgrad("submit", str(spec), "--coordinator", address, "--timeout", "60")
        assert r.returncode != 0
        assert message in r.stderr, r.stderr
        assert f"{spec}: invalid job spec" in r.stderr
        assert "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 60
        assert not trap.poll(100), "submit sent a message to the coordinator"
    finally:
        trap.close(0)


def test_submit_missing_file(tmp_path):
    r = shardgrad("submit", str(tmp_path / "nope.toml"), "--coordinator", "ipc:///nonexistent")
    assert r.returncode != 0
    assert "cannot read spec file" in r.stderr


def test_bad_address_is_a_message_not_a_traceback():
    r = shardgrad("status", "--coordinator", "not-an-address", "--timeout", "1")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "tcp://HOST:PORT" in r.stderr


# ---- train --local -------------------------------------------------------------------------


def test_train_local_prints_the_same_digest_twice(tmp_path):
    spec = write(tmp_path / "small.toml", SMALL_SPEC)
    runs = [
        shardgrad("train", str(spec), "--local", "-o", str(tmp_path / f"w{i}.npz"))
        for i in range(2)
    ]
    outs = []
    for r in runs:
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert re.fullmatch(r"[0-9a-f]{64}", outs[0]["digest"])
    assert outs[0]["digest"] == outs[1]["digest"]
    assert outs[0]["rounds"] == 30
    # The digest printed is the digest of the weights written.
    with np.load(tmp_path / "w0.npz") as f:
        assert weights_digest(dict(f)) == outs[0]["digest"]


def test_train_without_local_says_what_to_do(tmp_path):
    r = shardgrad("train", str(write(tmp_path / "small.toml", SMALL_SPEC)))
    assert r.returncode != 0
    assert "--local" in r.stderr


# ---- against a live cluster: status, watch, fetch, cancel ----------------------------------


@pytest.fixture(scope="module")
def finished_job():
    """A one-worker cluster with one finished job: (cluster, job id, client-side status)."""
    with LocalCluster(workers=1) as cluster, cluster.client() as client:
        job = client.submit(parse_spec(SMALL_SPEC))
        status = client.wait(job, timeout=TIMEOUT)
        yield cluster, job, status


def test_status_prints_the_table(finished_job):
    cluster, job, _ = finished_job
    r = shardgrad("status", "--coordinator", cluster.client_address)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["WORKER", "STATE", "HEARTBEAT", "BLOCKS"]
    assert re.search(r"\balive\s+\d+\.\ds ago\s+\d+", r.stdout)
    header = next(line for line in lines if line.startswith("JOB"))
    assert header.split() == ["JOB", "NAME", "STATE", "ROUND", "CHECKPOINT", "EVAL", "ERROR"]
    row = next(line for line in lines if line.startswith(job))
    assert row.split()[:4] == [job, "cli-small", "done", "30/30"]
    assert re.fullmatch(r"\d+|-", row.split()[4])  # the last checkpoint's round
    assert re.search(r"acc \d+\.\d\d%", row)


def test_status_of_one_job_and_json(finished_job):
    cluster, job, _ = finished_job
    r = shardgrad("status", job, "--coordinator", cluster.client_address)
    assert r.returncode == 0, r.stderr
    assert job in r.stdout and "done" in r.stdout
    r = shardgrad("status", job, "--json", "--coordinator", cluster.client_address)
    assert json.loads(r.stdout)["job"]["state"] == "done"
    r = shardgrad("status", "job-999999", "--coordinator", cluster.client_address)
    assert r.returncode != 0 and "no job 'job-999999'" in r.stderr


def test_fetch_writes_the_clients_weights(finished_job, tmp_path):
    cluster, job, status = finished_job
    out = tmp_path / "model.npz"
    r = shardgrad("fetch", job, "-o", str(out), "--coordinator", cluster.client_address)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    with cluster.client() as client:
        expected = client.fetch(job)
    with np.load(out) as f:
        got = dict(f)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert np.array_equal(got[name], expected[name])
    assert weights_digest(got) == status["digest"]


def test_watch_a_finished_job_and_cancel_it(finished_job):
    cluster, job, _ = finished_job
    r = shardgrad("watch", job, "--coordinator", cluster.client_address)
    assert r.returncode == 0, r.stderr
    assert "30/30" in r.stderr  # the bar (tqdm writes to stderr)
    r = shardgrad("cancel", job, "--coordinator", cluster.client_address)
    assert r.returncode != 0 and "already done" in r.stderr


# ---- progress views without a cluster ------------------------------------------------------


def test_format_status_shows_every_state():
    status = {
        "workers": [
            {"id": "w-1", "state": "alive", "last_heartbeat_s": 0.21, "blocks_done": 12},
            {"id": "w-2", "state": "dead", "last_heartbeat_s": 300.0, "blocks_done": 3},
        ],
        "counters": {"bad_message": 2, "zero": 0},
        "jobs": [
            {
                "id": "job-1",
                "name": "a",
                "state": "paused",
                "round": 5,
                "total_rounds": 9,
                "checkpoint_round": None,
                "error": None,
                "last": {"accuracy": 0.5},
            },
            {
                "id": "job-2",
                "name": "b",
                "state": "failed",
                "round": 1,
                "total_rounds": 9,
                "checkpoint_round": 0,
                "error": "worker data: boom",
                "eval": {},
            },
        ],
    }
    text = format_status(status)
    assert re.search(r"w-1\s+alive\s+0\.2s ago\s+12", text)
    assert re.search(r"w-2\s+dead\s+5m ago\s+3", text)
    assert re.search(r"job-1\s+a\s+paused\s+5/9\s+-\s+acc 50\.00%", text)
    assert re.search(r"job-2\s+b\s+failed\s+1/9\s+0\s+-\s+worker data: boom", text)
    assert "bad_message=2" in text and "zero" not in text
    assert "no workers connected" in format_status({"workers": [], "jobs": []})
    one = {**status["jobs"][0], "state": "running", "placement": "coordinator"}
    assert "computed on the coordinator" in format_status({"workers": [], "job": one})
    assert "coordinator" not in format_status({"workers": [], "job": status["jobs"][0]})


class FakeClient:
    """Plays a job through queued -> running -> paused -> running -> done."""

    def __init__(self):
        self.states = [("queued", 0), ("running", 2), ("paused", 2), ("running", 3), ("done", 4)]
        self.rows = [
            {"round": r, "loss": 1.0 / (r + 1), "samples_per_s": 100.0, "round_s": 0.1}
            for r in range(4)
        ]
        self.metric_calls = []

    def status(self, job_id):
        state, round_ = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        job = {"id": job_id, "name": "fake", "state": state, "round": round_, "total_rounds": 4}
        return {"job": job}

    def metrics(self, job_id, since=0):
        self.metric_calls.append(since)
        return self.rows[since : since + 2]


def test_watch_follows_the_job_to_the_end(tmp_path):
    client = FakeClient()
    with open(tmp_path / "bar.txt", "w") as bar:
        final = watch(client, "job-7", poll=0.001, file=bar)
    text = (tmp_path / "bar.txt").read_text()
    assert final["state"] == "done" and final["round"] == 4
    assert "paused (waiting for workers)" in text
    assert "4/4" in text and "loss=0.2500" in text and "samples/s=100" in text
    # Metrics are read incrementally: each call asks only for rows not seen yet.
    assert client.metric_calls[:3] == [0, 2, 4]


def test_the_bar_s_samples_per_s_is_samples_over_seconds_not_a_mean_of_bursts():
    """Ahead on a lease the coordinator steps rounds in bursts: one round 30 ms after the
    last, then three 0.1 ms apart. 4 x 256 samples in 30.3 ms is ~33,800/s; the mean of the
    four rounds' own rates would say ~1,920,000/s."""
    paces = [0.030, 0.0001, 0.0001, 0.0001]
    rows = [{"samples_per_s": 256 / p, "pace_s": p, "round_s": 0.00005} for p in paces]
    assert _throughput(rows) == pytest.approx(4 * 256 / sum(paces))
    # rows without a pace (computed on the coordinator, train --local): their span
    assert _throughput([{"samples_per_s": 10.0, "round_s": 2.0}]) == 10.0


# ---- the demo ------------------------------------------------------------------------------


def test_demo_spec_matches_the_example_file():
    assert parse_spec(ROOT / "examples/jobs/demo.toml") == demo_spec()
    assert "builtin:digits" in DEMO_SPEC


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = shardgrad("demo", "--workers", "2", "--output-dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[ok]") == 4 and "FAIL" not in r.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_accuracy_matches_train_local():
    spec = parse_spec(SMALL_SPEC)
    state, metrics = train_local(spec)
    assert heldout_accuracy(spec, state) == metrics[-1]["accuracy"]


# ---- the README's Python examples run as written -------------------------------------------


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples():
    assert len(readme_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs(tmp_path, index):
    code = readme_python_blocks()[index]
    script = write(tmp_path / f"readme_{index}.py", code)
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0, f"README python block {index} failed:\n{code}\n{r.stderr}"


# ---- cluster up: stops its processes on SIGTERM as on Ctrl-C -------------------------------


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cluster_up_stops_its_processes(tmp_path, sig):
    script = Path(sys.executable).with_name("shardgrad")
    args = [
        "cluster",
        "up",
        "--workers",
        "1",
        "--worker-bind",
        f"ipc://{tmp_path}/w",
        "--client-bind",
        f"ipc://{tmp_path}/c",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    # SIG_DFL for SIGINT in the child: a process started in the background may inherit
    # "ignore SIGINT", and then Python never turns Ctrl-C into KeyboardInterrupt.
    proc = subprocess.Popen(
        [str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    children = []
    try:
        # "cluster up: ..." is printed once the coordinator answers and the worker is live.
        assert select.select([proc.stdout], [], [], TIMEOUT)[0], "cluster up printed nothing"
        assert "cluster up" in proc.stdout.readline()
        children = _children(proc.pid)
        assert len(children) == 2  # the coordinator and the worker
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, children)), "cluster up left processes behind"
    finally:  # never leave processes behind, even when the test fails
        for pid in [proc.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
