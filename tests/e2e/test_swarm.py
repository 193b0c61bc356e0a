"""Docker Swarm end to end: the same docker-compose.yml, deployed with `docker stack deploy`
on a single-node swarm, its worker service scaled 1 -> 4 -> 2 while a job runs.

Run with `make test-swarm` (brings up an engine first) or
`.venv/bin/pytest -m docker tests/e2e/test_swarm.py`. Skips, with the reason, when no Docker
engine answers. Tests run in file order on one stack (a module fixture):

1. the stack is what a multi-host deployment needs: an overlay network, the coordinator's
   state on a named volume, a replicated worker service, the client port published on the
   coordinator's host (host mode, dnsrr: no ingress mesh or VIP, which need IPVS);
2. a job runs while `docker service scale` takes the workers 1 -> 4 -> 2; `status` and the
   per-round metrics show each size taking part in rounds of the running job, and the final
   weights equal `shardgrad train --local`'s bit for bit;
3. `docker stack rm` (+ removing the stack's volume) and `docker swarm leave --force` leave no
   container, network, volume or swarm behind.

Sandbox settings are test_compose.py's (local base image, host-built wheelhouse). Two more:
the image is deployed by its ID (`sha256:...`), because a swarm node tries to pull a tagged
image from its registry before every task start and there is none here; and the swarm is
left only if this test initialised it (an engine that already is a swarm node stays one).
A lock file serialises runs of this file on one machine (one engine, one swarm), and a
marker file lets a run clean up the swarm and stacks of a run that died before leaving.
The workers sleep SHARDGRAD_FAULT_DELAY per micro-batch (an override file added to the
deploy), so that the job outlasts both scalings on any machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
import tomllib
import uuid
from pathlib import Path

import pytest

# The compose tests' helpers: same skip logic, same wheelhouse, same reference and checks.
from test_compose import (  # type: ignore[import-not-found]
    BASE_IMAGE,
    COMPOSE_FILE,
    DIGITS,
    HOST_CLI,
    OFFLINE,
    REPO,
    _build_wheelhouse,
    _cli_problem,
    _engine_problem,
    _free_port,
    _load_npz,
    _run,
    _wait_for,
    assert_bitwise_equal,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

IMAGE = os.environ.get("SHARDGRAD_SWARM_TEST_IMAGE", "shardgrad:swarm-e2e")

# The job: digits, long enough to scale twice while it runs. The workers sleep FAULT_DELAY
# per micro-batch (numerics unchanged), so a round's length depends on the worker count the
# same way on any machine: ~8 x 10 ms with 1 worker, ~2 x 10 ms with 4 (8 micro-batches).
EPOCHS = 45  # 22 rounds an epoch: ~1000 rounds, >= 80 s with one worker
FAULT_DELAY = "0.01"

# Deadlines (seconds): every wait polls a condition until one of these.
UP_WITHIN = 180  # first deploy: overlay network, ingress, healthcheck
SCALE_WITHIN = 120
JOB_WITHIN = 400
GONE_WITHIN = 120
LOCK_WITHIN = 600

# The engine and its swarm are the machine's: two runs of this file at once (two clones,
# two engineers) would init and leave one swarm under each other. This lock serialises them.
LOCK_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "shardgrad-swarm-e2e.lock"
# Present from `swarm init` to `swarm leave`: a swarm found active with this file present was
# made by a run that died before leaving (SIGKILL, a lost machine), so this run cleans it up.
MADE_MARKER = LOCK_FILE.with_suffix(".made")

FINAL = {"done", "failed", "cancelled"}


def _swarm_problem() -> str | None:
    r = _run(["docker", "swarm", "--help"], check=False, timeout=30)
    if r.returncode != 0:
        return "this docker CLI has no `docker swarm`"
    return None


_PROBLEM = _engine_problem() or _cli_problem() or _swarm_problem()
if _PROBLEM:
    pytestmark.append(pytest.mark.skip(reason=_PROBLEM))


def _swarm_state() -> str:
    fmt = "{{.Swarm.LocalNodeState}}"
    return _run(["docker", "info", "--format", fmt], timeout=30).stdout.strip()


def _leftovers(stack: str) -> dict[str, list[str]]:
    label = f"label=com.docker.stack.namespace={stack}"
    found = {}
    for kind, cmd in {
        "services": ["docker", "service", "ls", "-q", "--filter", label],
        "containers": ["docker", "ps", "-a", "-q", "--filter", label],
        "networks": ["docker", "network", "ls", "-q", "--filter", label],
        "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
    }.items():
        # Without a swarm `docker service ls` fails: no swarm, no services.
        r = _run(cmd, check=False, timeout=60)
        found[kind] = r.stdout.split() if r.returncode == 0 else []
    return found


class Stack:
    def __init__(self, name: str, port: int, env: dict, tmp: Path):
        self.name, self.port, self.env, self.tmp = name, port, env, tmp
        self.address = f"tcp://127.0.0.1:{port}"
        self._client = None
        self._references: dict[str, dict] = {}

    def service(self, svc: str) -> str:
        return f"{self.name}_{svc}"

    def deploy(self, *files: Path):
        cmd = ["docker", "stack", "deploy", "--resolve-image", "never", "--prune"]
        for f in files:
            cmd += ["-c", f]
        return _run([*cmd, self.name], env=self.env, timeout=300)

    def scale(self, svc: str, replicas: int):
        # --detach: return at once; the test polls for the outcome it cares about.
        _run(["docker", "service", "scale", "--detach", f"{self.service(svc)}={replicas}"])

    def tasks(self, svc: str) -> str:
        fmt = "{{.Name}} {{.CurrentState}} {{.Error}}"
        r = _run(
            ["docker", "service", "ps", "--no-trunc", "--format", fmt, self.service(svc)],
            check=False,
        )
        return r.stdout + r.stderr

    def running_containers(self, svc: str) -> list[str]:
        label = f"label=com.docker.swarm.service.name={self.service(svc)}"
        return _run(["docker", "ps", "-q", "--filter", label]).stdout.split()

    def logs(self) -> str:
        out = []
        for svc in ("coordinator", "worker"):
            r = _run(
                ["docker", "service", "logs", "--no-task-ids", "--tail", "40", self.service(svc)],
                check=False,
                timeout=60,
            )
            out.append(f"--- {svc} tasks\n{self.tasks(svc)}--- {svc} logs\n{r.stdout[-4000:]}")
            out.append(r.stderr[-2000:])
        return "\n".join(out)

    # the Client and CLI on the host, through the port the ingress publishes --------------
    @property
    def client(self):
        if self._client is None:
            from shardgrad.client import Client

            self._client = Client(self.address, timeout=10)
        return self._client

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    def cli(self, *args, timeout=120):
        env = {**self.env, "SHARDGRAD_COORDINATOR": self.address}
        return _run([HOST_CLI, *args], env=env, timeout=timeout)

    def live_workers(self) -> list[dict]:
        return [w for w in self.client.status()["workers"] if w["state"] == "alive"]

    def job(self, job_id: str) -> dict:
        return self.client.status(job_id)["job"]

    def reference(self, spec: Path) -> dict:
        """`shardgrad train SPEC --local` on the host: the bitwise reference."""
        out = self.tmp / f"reference-{spec.stem}.npz"
        if not out.exists():
            self.cli("train", spec, "--local", "-o", out, timeout=JOB_WITHIN)
        return _load_npz(out)

    def fetch(self, job_id: str) -> dict:
        out = self.tmp / f"fetched-{job_id}.npz"
        self.cli("fetch", "--coordinator", self.address, job_id, "-o", out)
        return _load_npz(out)


def _teardown(stack: Stack, leave: bool) -> None:
    """`docker stack rm`, wait until its containers and network are gone, remove its volume
    (stack rm keeps volumes), leave the swarm if we made it. Idempotent; never raises."""
    stack.close()
    _run(["docker", "stack", "rm", stack.name], check=False, timeout=120)

    def gone():
        left = _leftovers(stack.name)
        return not left["services"] and not left["containers"] and not left["networks"]

    try:
        _wait_for(f"stack {stack.name} to go", gone, GONE_WITHIN)
    except AssertionError as e:
        print(f"[swarm] {e}")
    for vol in _leftovers(stack.name)["volumes"]:
        _run(["docker", "volume", "rm", "-f", vol], check=False, timeout=60)
    if leave and _swarm_state() != "inactive":
        _run(["docker", "swarm", "leave", "--force"], check=False, timeout=120)
    if leave and _swarm_state() == "inactive":
        MADE_MARKER.unlink(missing_ok=True)


def _job_spec(tmp: Path) -> Path:
    text = DIGITS.read_text()
    name = tomllib.loads(text)["name"]
    text = re.sub(r"(?m)^epochs\s*=.*$", f"epochs = {EPOCHS}", text)
    text = re.sub(r"(?m)^name\s*=.*$", f'name = "{name}-swarm"', text)
    text = 'placement = "workers"  # small, but about workers\n' + text
    path = tmp / "swarm-job.toml"
    path.write_text(text)
    return path


def _take_lock():
    fh = open(LOCK_FILE, "a")  # held (and locked) for the whole module

    def taken():
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    _wait_for(f"the swarm test lock {LOCK_FILE} (another run of this file)", taken, LOCK_WITHIN)
    return fh


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    lock = _take_lock()
    try:
        yield from _stack(tmp_path_factory)
    finally:
        lock.close()  # releases the lock


def _stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    name = f"sgswarm{uuid.uuid4().hex[:6]}"
    port = _free_port()
    data_dir = tmp / "data"
    data_dir.mkdir()
    env = {
        **os.environ,
        "SHARDGRAD_IMAGE": IMAGE,
        "SHARDGRAD_CLIENT_PORT": str(port),
        "SHARDGRAD_HTTP_PORT": str(_free_port()),  # the dashboard's published port
        "SHARDGRAD_DATA_DIR": str(data_dir),  # bind sources must be absolute and exist
        "SHARDGRAD_JOBS_DIR": str(REPO / "examples" / "jobs"),
        "SHARDGRAD_WORKERS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "Haswell"),
    }
    if OFFLINE:
        _build_wheelhouse()
        env["SHARDGRAD_BASE_IMAGE"] = BASE_IMAGE
        env["SHARDGRAD_PIP_INSTALL_ARGS"] = "--no-index --find-links /src/.wheelhouse"

    # Stack deploy ignores build:, so the image is built first (compose builds the file's
    # own build: section, tagged with the name image: gives).
    t0 = time.monotonic()
    _run(["docker-compose", "-f", COMPOSE_FILE, "build", "coordinator"], env=env, timeout=900)
    image_id = _run(["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE]).stdout.strip()
    print(f"\n[swarm] image {IMAGE} ({image_id[:19]}) built in {time.monotonic() - t0:.1f} s")
    env["SHARDGRAD_IMAGE"] = image_id  # by ID: no registry pull attempt on task start

    override = tmp / "swarm-test.yml"
    override.write_text(
        'version: "3.9"\n'
        "services:\n"
        "  worker:\n"
        "    environment:\n"
        f'      SHARDGRAD_FAULT_DELAY: "{FAULT_DELAY}"\n'
    )

    init = _swarm_state() == "inactive"
    made_swarm = init or MADE_MARKER.exists()
    if not init and made_swarm:  # a dead run's swarm: remove its stacks, leave it at the end
        stale = _run(["docker", "stack", "ls", "--format", "{{.Name}}"], check=False).stdout
        for old_name in (n for n in stale.split() if n.startswith("sgswarm")):
            print(f"[swarm] removing stack {old_name} left by an earlier run")
            _teardown(Stack(old_name, 0, env, tmp), leave=False)
    s = Stack(name, port, env, tmp)
    try:
        if init:
            _run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], timeout=120)
            MADE_MARKER.touch()
        t0 = time.monotonic()
        s.deploy(COMPOSE_FILE, override)
        _wait_for(
            "the coordinator to answer on the published port with 1 live worker",
            lambda: len(s.live_workers()) == 1,
            UP_WITHIN,
            s.logs,
            tolerate=(TimeoutError, OSError),
        )
        print(f"[swarm] stack {name} up in {time.monotonic() - t0:.1f} s")
        s.made_swarm = made_swarm
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        _teardown(s, leave=made_swarm)


# --- the tests ---------------------------------------------------------------------------


def test_stack_has_overlay_network_state_volume_and_replicated_workers(stack):
    net = json.loads(_run(["docker", "network", "inspect", f"{stack.name}_default"]).stdout)[0]
    assert net["Driver"] == "overlay" and net["Scope"] == "swarm", net

    services = {}
    for svc in ("coordinator", "worker", "client"):
        out = _run(["docker", "service", "inspect", stack.service(svc)]).stdout
        services[svc] = json.loads(out)[0]["Spec"]
    assert services["worker"]["Mode"]["Replicated"]["Replicas"] == 1
    assert services["client"]["Mode"]["Replicated"]["Replicas"] == 0  # on demand only
    mounts = services["coordinator"]["TaskTemplate"]["ContainerSpec"]["Mounts"]
    state = [m for m in mounts if m["Target"] == "/state"]
    assert state and state[0]["Type"] == "volume" and state[0]["Source"] == f"{stack.name}_state"
    # dnsrr + a host-mode port: no service VIP and no ingress mesh (both need IPVS)
    endpoint = services["coordinator"]["EndpointSpec"]
    assert endpoint["Mode"] == "dnsrr", endpoint
    ports = {p["TargetPort"]: p for p in endpoint["Ports"]}
    assert sorted(ports) == [5556, 8080], endpoint  # clients, and the dashboard / metrics
    port = ports[5556]
    assert (port["TargetPort"], port["PublishedPort"], port["PublishMode"]) == (
        5556,
        stack.port,
        "host",
    ), endpoint
    assert ports[8080]["PublishMode"] == "host", endpoint
    (cid,) = stack.running_containers("coordinator")
    inspect = json.loads(_run(["docker", "inspect", cid]).stdout)[0]
    # docker lists the mounts in no fixed order; a bind mount (the data folder) has no Name
    assert any(m.get("Name") == f"{stack.name}_state" for m in inspect["Mounts"]), inspect["Mounts"]


def test_scale_workers_1_4_2_mid_job_matches_local(stack):
    spec = _job_spec(stack.tmp)
    want = stack.reference(spec)
    c = stack.client
    job = stack.cli("submit", "--coordinator", stack.address, spec).stdout.strip()
    seen_rows: list[dict] = []

    def rows_with(n_workers: int, after_round: int):
        """Metrics rows (so far) of rounds after `after_round` in which n workers delivered;
        fails if the job ended first (the job is then too short for this machine)."""
        job_now = stack.job(job)
        seen_rows.extend(c.metrics(job, since=len(seen_rows)))
        hits = [r for r in seen_rows if r["round"] > after_round and r["workers"] == n_workers]
        assert hits or job_now["state"] not in FINAL, (
            f"job {job} is {job_now['state']} before a round with {n_workers} workers "
            f"(round {job_now['round']}): make EPOCHS larger\n{stack.logs()}"
        )
        return hits

    # 1 worker
    first = _wait_for("a round with 1 worker", lambda: rows_with(1, -1), JOB_WITHIN, stack.logs)
    sizes = [(1, first[0]["round"])]

    # 1 -> 4, then 4 -> 2, while the job runs
    for n in (4, 2):
        before = stack.job(job)["round"]  # rounds after this one may have the new size
        stack.scale("worker", n)
        _wait_for(
            f"{n} live workers in status",
            lambda n=n: len(stack.live_workers()) == n,
            SCALE_WITHIN,
            stack.logs,
        )
        # A worker told to go leaves (BYE) before its container has finished exiting.
        _wait_for(
            f"{n} running worker containers",
            lambda n=n: len(stack.running_containers("worker")) == n,
            SCALE_WITHIN,
            lambda: stack.tasks("worker"),
        )
        hits = _wait_for(
            f"a round with {n} workers",
            lambda n=n, before=before: rows_with(n, before),
            SCALE_WITHIN,
            stack.logs,
        )
        state = stack.job(job)["state"]
        assert state in ("running", "paused"), f"job {job} is {state} right after scaling to {n}"
        sizes.append((n, hits[0]["round"]))
    print(f"\n[swarm] worker counts and the first round each took part in: {sizes}")

    def finished():
        job_now = stack.job(job)
        assert job_now["state"] not in ("failed", "cancelled"), job_now
        return job_now if job_now["state"] == "done" else None

    summary = _wait_for(f"job {job} to finish", finished, JOB_WITHIN, stack.logs)
    assert summary["round"] == summary["total_rounds"]
    assert summary["eval"]["accuracy"] >= 0.93, summary
    seen_rows.extend(c.metrics(job, since=len(seen_rows)))
    assert {1, 4, 2} <= {r["workers"] for r in seen_rows}
    assert_bitwise_equal(stack.fetch(job), want, "job scaled 1 -> 4 -> 2 on a swarm")


def test_stack_rm_and_swarm_leave_leave_nothing(stack):
    before = _leftovers(stack.name)
    assert all(before[k] for k in ("services", "containers", "networks", "volumes")), before
    _teardown(stack, leave=stack.made_swarm)
    assert _leftovers(stack.name) == {
        "services": [],
        "containers": [],
        "networks": [],
        "volumes": [],
    }
    if stack.made_swarm:
        assert _swarm_state() == "inactive"
    with socket.socket() as s:  # nothing answers on the published port any more
        s.settimeout(5)
        assert s.connect_ex(("127.0.0.1", stack.port)) != 0
