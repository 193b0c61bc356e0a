"""A local cluster: one coordinator and N workers as real processes on this machine.

Used by `shardgrad cluster up`, `shardgrad demo` and the multi-process tests. Without
explicit addresses it binds ipc:// sockets in a private temp dir, so any number of
clusters can run side by side (tests under xdist) without a single fixed port.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .client import Client


class LocalCluster:
    def __init__(
        self,
        workers=2,
        worker_bind=None,
        client_bind=None,
        state_dir=None,
        data_root=None,
        keys=None,
        heartbeat_interval=None,
        liveness=None,
        log_dir=None,
        env=None,
        http=None,
        aggregators=0,
        root_aggregator=False,
    ):
        self.tmp = tempfile.mkdtemp(prefix="shardgrad-cluster-")
        # The temp dir (sockets, and state and logs unless placed elsewhere) goes away on
        # stop; SHARDGRAD_KEEP_CLUSTER=1 keeps it for a post-mortem.
        self.cleanup = not os.environ.get("SHARDGRAD_KEEP_CLUSTER")
        self.worker_bind = worker_bind or f"ipc://{self.tmp}/workers"
        self.client_bind = client_bind or f"ipc://{self.tmp}/clients"
        self.state_dir = state_dir or os.path.join(self.tmp, "state")
        self.log_dir = log_dir or os.path.join(self.tmp, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.n_workers, self.data_root, self.keys = workers, data_root, keys
        self.hb, self.liveness = heartbeat_interval, liveness
        self.env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})}
        # HOST:PORT of the dashboard / metrics (port 0: any free one); None or "off": none.
        self.http = None if not http or http.strip().lower() in ("off", "none", "no") else http
        self.coordinator = None
        self.workers: list[subprocess.Popen] = []
        self._spawned = 0
        # Hierarchical: this many aggregators (as if one per host), workers dealt round-robin.
        self.n_aggregators = aggregators
        self.aggregators: list[subprocess.Popen] = []
        # ... and with root_aggregator, those connect to one more above them (a two-level
        # tree: the coordinator then hears a single member whatever the number of hosts).
        self.root = None
        self.root_aggregator = root_aggregator

    @property
    def worker_address(self):
        return self.worker_bind.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1")

    @property
    def client_address(self):
        return self.client_bind.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1")

    def _spawn(self, name, args, env=None):
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        cmd = [sys.executable, "-m", "shardgrad.cli", *args]
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}
        )

    def _common(self):
        args = ["--keys", self.keys] if self.keys else []
        if self.hb:
            args += ["--heartbeat-interval", str(self.hb)]
        return args

    def start_coordinator(self, env=None, wait=True):
        args = [
            "coordinator",
            "--worker-bind",
            self.worker_bind,
            "--client-bind",
            self.client_bind,
            "--state-dir",
            self.state_dir,
            *self._common(),
        ]
        if self.data_root:
            args += ["--data-root", self.data_root]
        if self.liveness:
            args += ["--liveness", str(self.liveness)]
        # Always said, so that a SHARDGRAD_HTTP in the environment never turns it on here.
        args += ["--http", self.http or "off"]
        if self.http:
            _unlink(self._http_url_file)  # a restart on port 0 gets a new port
        self.coordinator = self._spawn("coordinator", args, env)
        if wait:
            self.wait_until(lambda c: c.status() is not None, "the coordinator to answer")
        return self.coordinator

    @property
    def _http_url_file(self):
        return os.path.join(self.state_dir, "http.url")  # written by the coordinator

    @property
    def http_url(self):
        """The dashboard's URL ("http://HOST:PORT/"), or None when HTTP is off."""
        if not self.http:
            return None

        def read():
            with open(self._http_url_file) as f:
                return f.read().strip()

        return wait_for(read, "the coordinator's HTTP address", 30.0, 0.05, (OSError,))

    def aggregator_address(self, i):
        return f"ipc://{self.tmp}/aggregator-{i}"

    def start_aggregator(self, i, env=None):
        """Aggregator i (0-based; started again after a kill, it binds the same address)."""
        upstream = self.worker_address
        if self.root_aggregator and i != "root":
            if self.root is None:
                self.root = self.start_aggregator("root")
            upstream = self.aggregator_address("root")
        args = ["aggregator", "--coordinator-workers", upstream, *self._common()]
        args += ["--bind", self.aggregator_address(i), "--id", f"aggregator-{i}"]
        args += self._peer_args()
        if self.keys and upstream != self.worker_address:
            args += ["--server-key", os.path.join(self.keys, "workers", "worker.key")]
        proc = self._spawn(f"aggregator-{i}", args, env)
        if i == "root":
            return proc
        if i < len(self.aggregators):
            self.aggregators[i] = proc
        else:
            self.aggregators.append(proc)
        return proc

    def _peer_args(self, key_name="worker"):
        args = ["--liveness", str(self.liveness)] if self.liveness else []
        if self.data_root:
            args += ["--data-root", self.data_root]
        if self.keys:
            args += ["--key-name", key_name]
        return args

    def add_worker(self, env=None, aggregator=None, key_name="worker"):
        """A worker of the coordinator, or of aggregator `aggregator` (by default the next
        one round-robin when the cluster has aggregators)."""
        self._spawned += 1
        address = self.worker_address
        if self.n_aggregators:
            i = (self._spawned - 1) % self.n_aggregators if aggregator is None else aggregator
            address = self.aggregator_address(i)
            if i >= len(self.aggregators):  # started with the first worker that needs it
                for j in range(len(self.aggregators), i + 1):
                    self.start_aggregator(j)
        args = ["worker", "--coordinator-workers", address, *self._common()]
        args += self._peer_args(key_name)
        if self.keys and address != self.worker_address:  # the aggregator's own key
            args += ["--server-key", os.path.join(self.keys, "workers", "worker.key")]
        proc = self._spawn(f"worker-{self._spawned}", args, env)
        self.workers.append(proc)
        return proc

    def start(self, wait_workers=True):
        self.start_coordinator()
        for i in range(len(self.aggregators), self.n_aggregators):
            self.start_aggregator(i)
        for _ in range(self.n_workers):
            self.add_worker()
        if wait_workers:
            self.wait_workers(self.n_workers)
        return self

    def client(self, timeout=10.0, security=None):
        if security is None and self.keys:
            from .security import peer_security

            security = peer_security(self.keys, "client", "client")
        return Client(self.client_address, timeout=timeout, security=security)

    def wait_until(self, predicate, what, timeout=60.0):
        """Poll predicate(client) until truthy; a coordinator that exits ends the wait."""
        with self.client(timeout=2.0) as c:

            def ready():
                if self.coordinator is not None and self.coordinator.poll() is not None:
                    raise RuntimeError(
                        f"the coordinator exited (see {self.log_dir}/coordinator.log)"
                    )
                return predicate(c)

            return wait_for(ready, f"{what} (logs: {self.log_dir})", timeout, 0.05, RETRY)

    def live_workers(self, c):
        return [w for w in c.status()["workers"] if w["state"] == "alive"]

    def capacity(self, c):
        """Live workers, counting those behind aggregators (what min_workers counts)."""
        return sum(w.get("workers", 1) for w in self.live_workers(c))

    def wait_workers(self, n, timeout=60.0):
        self.wait_until(lambda c: self.capacity(c) >= n, f"{n} live workers", timeout)

    def wait(self):
        """Block until the coordinator exits (Ctrl-C propagates; __exit__ stops all)."""
        while self.coordinator.poll() is None:
            time.sleep(0.2)

    def log(self, name: str = "coordinator") -> str:
        """Process `name`'s log so far ("" if it has none)."""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, name: str = "coordinator", lines: int = 40) -> str:
        """The last `lines` lines of process `name`'s log."""
        return "".join(self.log(name).splitlines(keepends=True)[-lines:])

    def log_tails(self, lines: int = 30) -> str:
        """Every process's last `lines` lines: what a failed test prints (CI keeps no files)."""
        names = sorted(n[:-4] for n in os.listdir(self.log_dir) if n.endswith(".log"))
        return "".join(
            f"--- {n}.log, last {lines} lines:\n{self.log_tail(n, lines)}" for n in names
        )

    def stop(self, timeout=10.0):
        # Workers first (their BYE still reaches the coordinator), then the coordinator.
        deadline = time.monotonic() + timeout
        for group in (self.workers, self.aggregators, [self.root], [self.coordinator]):
            procs = [p for p in group if p is not None]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                    p.terminate()
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.cleanup:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise

    def __exit__(self, *exc):
        self.stop()


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


RETRY = (TimeoutError, OSError)  # a busy or restarting coordinator: ask again


def wait_for(predicate, what, timeout=60.0, interval=0.02, retry=()):
    """Poll `predicate()` until it returns something truthy (which is returned); exceptions
    listed in `retry` count as "not yet". TimeoutError after `timeout` seconds."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except retry as e:
            last = e
        time.sleep(interval)
    seen = f" (last error: {last})" if last else ""
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}{seen}")
