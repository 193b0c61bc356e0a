"""docker-compose end to end: the real image, a real cluster, jobs submitted from the host.

Run with `make test-docker` (brings up an engine first) or
`.venv/bin/pytest -m docker tests/e2e/test_compose.py`. Skips, with the reason, when no
Docker engine answers. Tests run in file order on one cluster (a module fixture):

1. two digits jobs (one from the host through the published port, one from
   `docker-compose run --rm client`) finish with weights bitwise equal to `train --local`;
2. a worker crashes mid-job (SIGKILL to its process): the job still finishes bitwise equal,
   and the restart policy brings the worker back;
3. `docker-compose restart coordinator` mid-job: the job resumes from its checkpoint in the
   named volume and finishes bitwise equal;
4. `docker-compose down -v` leaves no container, volume or network of the project.

Sandbox settings (no registry, containers without the package index) live here, not in the
Dockerfile: the image is built FROM $SHARDGRAD_BASE_IMAGE (default: the local image made
by ../shared/tools/docker-engine) and installs from a wheelhouse that this file builds on
the host, pinned to the versions in this venv (the same numpy as the host reference).
Set SHARDGRAD_DOCKER_OFFLINE=0 to build the plain way, from a registry.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest

from shardgrad.training import weights_digest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DIGITS = REPO / "examples" / "jobs" / "digits.toml"
HOST_CLI = Path(sys.executable).parent / "shardgrad"
BASE_IMAGE = os.environ.get("SHARDGRAD_BASE_IMAGE", "local/python:3.11-bookworm")
OFFLINE = os.environ.get("SHARDGRAD_DOCKER_OFFLINE", "1") != "0"
IMAGE = os.environ.get("SHARDGRAD_TEST_IMAGE", "shardgrad:e2e")
LONG_EPOCHS = 60  # jobs long enough to crash something in the middle of them

# Deadlines (seconds): every wait below polls a condition until one of these.
HEALTHY_WITHIN = 120
JOB_WITHIN = 300
RESTART_WITHIN = 60
POLL = 0.5

FINAL = {"done", "failed", "cancelled"}


# --- skip unless an engine answers -------------------------------------------------------


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` command (run ../shared/tools/docker-engine or `make test-docker`)"
    if shutil.which("docker-compose") is None:
        return "no `docker-compose` command (v1; run ../shared/tools/docker-engine)"
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s: no Docker engine is running"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"`docker info` failed, no Docker engine answers: {last}"
    return None


def _cli_problem() -> str | None:
    if importlib.util.find_spec("shardgrad.cli") is None:
        return "shardgrad.cli does not exist yet: nothing to run in the containers"
    if not HOST_CLI.exists():
        return f"the shardgrad command is not installed at {HOST_CLI} (pip install -e .)"
    return None


_PROBLEM = _engine_problem() or _cli_problem()
if _PROBLEM:
    pytestmark.append(pytest.mark.skip(reason=_PROBLEM))


# --- small helpers -----------------------------------------------------------------------


def _run(cmd, *, env=None, timeout=120, check=True, cwd=REPO) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
            f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
        )
    return r


def _wait_for(what: str, condition, within: float, detail=lambda: "", tolerate=()):
    """Poll condition() until it returns a truthy value; fail with `what` at the deadline.
    Exceptions of the `tolerate` types count as "not yet"."""
    deadline = time.monotonic() + within
    last = None
    while True:
        try:
            value = condition()
        except tolerate as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            why = f" (last error: {last!r})" if last is not None else ""
            raise AssertionError(
                f"timed out after {within:.0f} s waiting for {what}{why}\n{detail()}"
            )
        time.sleep(POLL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_bitwise_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: parameter names differ"
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{what}: dtype of {name}"
        assert got[name].shape == want[name].shape, f"{what}: shape of {name}"
        assert np.array_equal(got[name], want[name]), f"{what}: {name} differs from --local"
    assert weights_digest(got) == weights_digest(want)


def _long_spec(tmp: Path, name: str) -> Path:
    """The digits job, longer, under another name (same content -> same reference)."""
    spec = tomllib.loads(DIGITS.read_text())
    text = DIGITS.read_text()
    text = re.sub(r"(?m)^epochs\s*=.*$", f"epochs = {LONG_EPOCHS}", text)
    text = re.sub(r"(?m)^name\s*=.*$", f'name = "{spec["name"]}-long"', text)
    text = 'placement = "workers"  # small, but about workers\n' + text
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


class Cluster:
    def __init__(self, project: str, port: int, env: dict, tmp: Path):
        self.project, self.port, self.env, self.tmp = project, port, env, tmp
        self.address = f"tcp://127.0.0.1:{port}"
        self._client = None
        self._references: dict[str, dict] = {}

    # compose ------------------------------------------------------------------
    def compose(self, *args, timeout=300, check=True):
        cmd = ["docker-compose", "-f", COMPOSE_FILE, "-p", self.project, *args]
        return _run(cmd, env=self.env, timeout=timeout, check=check)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def inspect(self, cid: str) -> dict:
        return json.loads(_run(["docker", "inspect", cid]).stdout)[0]

    def logs(self) -> str:
        r = self.compose("logs", "--no-color", "--tail", "80", check=False)
        return r.stdout[-8000:]

    def health(self) -> str:
        (cid,) = self.containers("coordinator")
        state = self.inspect(cid)["State"]
        return (state.get("Health") or {}).get("Status", "none")

    def wait_healthy(self):
        def detail():
            (cid,) = self.containers("coordinator")
            h = self.inspect(cid)["State"].get("Health") or {}
            probes = [p.get("Output", "").strip()[-300:] for p in (h.get("Log") or [])[-3:]]
            return f"last healthcheck output: {probes}\n{self.logs()}"

        _wait_for(
            "the coordinator's healthcheck",
            lambda: self.health() == "healthy",
            HEALTHY_WITHIN,
            detail,
        )

    # the shardgrad CLI and Client on the host, through the published port ---------------
    def cli(self, *args, timeout=120, check=True):
        env = {**self.env, "SHARDGRAD_COORDINATOR": self.address}
        return _run([HOST_CLI, *args], env=env, timeout=timeout, check=check)

    def submit(self, spec: Path) -> str:
        return self.cli("submit", "--coordinator", self.address, spec).stdout.strip()

    @property
    def client(self):
        if self._client is None:
            from shardgrad.client import Client

            self._client = Client(self.address, timeout=10)
        return self._client

    def reconnect(self):
        if self._client is not None:
            self._client.close()
        self._client = None

    def job(self, job_id: str) -> dict:
        """The coordinator's summary of a job: id, state, round, total_rounds, eval, ..."""
        return self.client.status(job_id)["job"]

    def wait_done(self, job_id: str, within=JOB_WITHIN) -> dict:
        def finished():
            job = self.job(job_id)
            assert job["state"] in ("done", "queued", "running", "paused"), (
                f"job {job_id} is {job['state']}: {job}\n{self.logs()}"
            )
            return job if job["state"] == "done" else None

        return _wait_for(f"job {job_id} to finish", finished, within, self.logs)

    def wait_round(self, job_id: str, at_least: int, within=JOB_WITHIN) -> int:
        def far_enough():
            job = self.job(job_id)
            assert job["state"] not in FINAL, (
                f"job {job_id} is {job['state']} before round {at_least}: make LONG_EPOCHS larger"
            )
            return job["round"] if job["round"] >= at_least else None

        return _wait_for(f"job {job_id} to reach round {at_least}", far_enough, within, self.logs)

    def fetch(self, job_id: str) -> dict[str, np.ndarray]:
        out = self.tmp / f"fetched-{job_id}.npz"
        self.cli("fetch", "--coordinator", self.address, job_id, "-o", out)
        return _load_npz(out)

    def reference(self, spec: Path) -> dict[str, np.ndarray]:
        """`shardgrad train SPEC --local` on the host: the bitwise reference."""
        spec_dict = tomllib.loads(spec.read_text())
        spec_dict.pop("name", None)
        key = json.dumps(spec_dict, sort_keys=True)
        if key not in self._references:
            out = self.tmp / f"reference-{len(self._references)}.npz"
            self.cli("train", spec, "--local", "-o", out, timeout=JOB_WITHIN)
            self._references[key] = _load_npz(out)
        return self._references[key]


# --- the cluster -------------------------------------------------------------------------


def _build_wheelhouse() -> None:
    """.wheelhouse/ with wheels of every dependency (+ build requirements), pinned to this
    venv's versions. Left untouched when it already holds exactly those files (the image
    build stays cached)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["data"]
    reqs += pyproject["build-system"]["requires"]
    freeze = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"]).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "req.txt").write_text("\n".join(reqs) + "\n")
        pins = [line for line in freeze.splitlines() if "==" in line]
        (tmp / "constraints.txt").write_text("\n".join(pins) + "\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "-d",
            tmp / "wheels",
            "-r",
            tmp / "req.txt",
            "-c",
            tmp / "constraints.txt",
        ]
        _run(cmd, timeout=600)
        want = sorted(p.name for p in (tmp / "wheels").iterdir())
        house = REPO / ".wheelhouse"
        have = sorted(p.name for p in house.iterdir()) if house.is_dir() else []
        if have != want:
            shutil.rmtree(house, ignore_errors=True)
            shutil.copytree(tmp / "wheels", house)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    project = f"shardgrad-test-{uuid.uuid4().hex[:8]}"
    port, http_port = _free_port(), _free_port()
    data_dir = tmp / "data"  # ./data stand-in, so the test never creates a root-owned ./data
    data_dir.mkdir()
    env = {
        **os.environ,
        "SHARDGRAD_CLIENT_PORT": str(port),
        "SHARDGRAD_HTTP_PORT": str(http_port),
        "SHARDGRAD_IMAGE": IMAGE,
        "SHARDGRAD_DATA_DIR": str(data_dir),
        # The host reference must use the BLAS kernels the containers use (compose's default).
        "OPENBLAS_NUM_THREADS": "1",
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "Haswell"),
    }
    if OFFLINE:
        _build_wheelhouse()
        env["SHARDGRAD_BASE_IMAGE"] = BASE_IMAGE
        env["SHARDGRAD_PIP_INSTALL_ARGS"] = "--no-index --find-links /src/.wheelhouse"
    c = Cluster(project, port, env, tmp)
    c.http_url = f"http://127.0.0.1:{http_port}/"

    t0 = time.monotonic()
    c.compose("build", "coordinator", timeout=900)
    print(f"\n[compose] image {IMAGE} built in {time.monotonic() - t0:.1f} s")
    try:
        t0 = time.monotonic()
        c.compose("up", "-d", "--scale", "worker=3")
        c.wait_healthy()
        print(f"[compose] {project} up and healthy in {time.monotonic() - t0:.1f} s")
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)


# SIGKILL every shardgrad process in a container but the init (PID 1, compose's init: true)
# and this one: the worker dies as under the kernel's OOM killer, the init exits 137.
_KILL_WORKER = """
import os, signal
for p in filter(str.isdigit, os.listdir("/proc")):
    if int(p) in (1, os.getpid()):
        continue
    try:
        cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if any(os.path.basename(a) == b"shardgrad" for a in cmd[:2]):
        os.kill(int(p), signal.SIGKILL)
"""


def crash_worker(cid: str) -> None:
    """Crash a worker container's process. Not `docker kill`: Docker treats that as a manual
    stop and never applies the restart policy to a manually stopped container."""
    # Exits 137 itself most of the time: the container dies with its init under it.
    _run(["docker", "exec", cid, "python", "-c", _KILL_WORKER], check=False)


def _leftovers(project: str) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={project}"
    found = {}
    for kind, cmd in {
        "containers": ["docker", "ps", "-a", "-q", "--filter", label],
        "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
        "networks": ["docker", "network", "ls", "-q", "--filter", label],
    }.items():
        found[kind] = _run(cmd).stdout.split()
    return found


# --- the tests ---------------------------------------------------------------------------


def test_jobs_from_host_and_client_container_match_local(cluster):
    assert len(cluster.containers("worker")) == 3
    want = cluster.reference(DIGITS)

    job = cluster.submit(DIGITS)  # from the host, through the published client port
    cluster.cli("watch", "--coordinator", cluster.address, job, timeout=JOB_WITHIN)
    summary = cluster.wait_done(job)
    assert summary["eval"]["accuracy"] >= 0.93, summary  # this short job reaches ~0.95
    assert_bitwise_equal(cluster.fetch(job), want, "host-submitted job")

    # The same job from inside the compose network, with the examples/jobs volume.
    job2 = cluster.compose("run", "--rm", "client", "submit", "/jobs/digits.toml").stdout.strip()
    assert job2 and job2 != job
    cluster.wait_done(job2)
    assert_bitwise_equal(cluster.fetch(job2), want, "client-container job")


def test_worker_crash_mid_job_completes_identically_and_worker_comes_back(cluster):
    spec = _long_spec(cluster.tmp, "crash")
    want = cluster.reference(spec)
    job = cluster.submit(spec)
    cluster.wait_round(job, at_least=20)

    victim = cluster.containers("worker")[0]
    before = cluster.inspect(victim)
    crash_worker(victim)

    def restarted():
        st = cluster.inspect(victim)
        return st["RestartCount"] > before["RestartCount"] and st["State"]["Running"]

    _wait_for(
        "the restart policy to bring the crashed worker back",
        restarted,
        RESTART_WITHIN,
        cluster.logs,
    )
    summary = cluster.wait_done(job)
    assert summary["round"] == summary["total_rounds"]
    assert_bitwise_equal(cluster.fetch(job), want, "job with a crashed worker")
    workers = cluster.containers("worker")
    assert len(workers) == 3 and all(cluster.inspect(c)["State"]["Running"] for c in workers)


def test_coordinator_restart_resumes_from_checkpoint(cluster):
    spec = _long_spec(cluster.tmp, "restart")
    want = cluster.reference(spec)
    job = cluster.submit(spec)
    reached = cluster.wait_round(job, at_least=30)

    # SIGTERM: the coordinator checkpoints into the `state` volume and exits; a new process
    # in the same container finds the queue and the checkpoint there.
    cluster.compose("restart", "-t", "20", "coordinator")
    cluster.reconnect()
    cluster.wait_healthy()

    after = _wait_for(
        "the job to be known after the restart",
        lambda: cluster.job(job),
        RESTART_WITHIN,
        cluster.logs,
        tolerate=(Exception,),
    )
    assert after["checkpoint_round"] is not None and after["checkpoint_round"] >= reached, after
    summary = cluster.wait_done(job)
    assert summary["round"] == summary["total_rounds"]
    logs = cluster.compose("logs", "--no-color", "coordinator").stdout
    assert f"job {job} resumes from its checkpoint" in logs, logs[-3000:]
    assert_bitwise_equal(cluster.fetch(job), want, "job across a coordinator restart")


def test_dashboard_and_metrics_are_published(cluster):
    import urllib.request

    with urllib.request.urlopen(cluster.http_url + "metrics", timeout=30) as r:
        text = r.read().decode()
    assert "shardgrad_rounds_total" in text and "shardgrad_round_seconds_bucket" in text
    with urllib.request.urlopen(cluster.http_url + "api/status", timeout=30) as r:
        assert json.loads(r.read())["workers"]


def test_down_v_leaves_nothing(cluster):
    before = _leftovers(cluster.project)
    assert all(before.values()), f"the labels filter finds the project's objects: {before}"
    cluster.compose("down", "-v", "--remove-orphans", "-t", "5")
    assert _leftovers(cluster.project) == {"containers": [], "volumes": [], "networks": []}
    with socket.socket() as s:  # nothing listens on the published port any more
        s.settimeout(5)
        assert s.connect_ex(("127.0.0.1", cluster.port)) != 0
