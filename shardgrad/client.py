"""Python client for the coordinator's client port.

from shardgrad import Client
c = Client("tcp://localhost:5556")
job = c.submit("examples/jobs/digits.toml")
c.wait(job)
weights = c.fetch(job)          # {name: ndarray}
"""

import itertools
import os
import time

import numpy as np
import zmq

from . import wire
from .jobspec import parse_spec

DEFAULT_ADDRESS = "tcp://127.0.0.1:5556"


class ClientError(RuntimeError):
    """The coordinator answered with an error (the message says what and how to fix it)."""


class Client:
    def __init__(self, address=None, timeout=10.0, security=None):
        self.address = address or os.environ.get("SHARDGRAD_COORDINATOR", DEFAULT_ADDRESS)
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.security = security
        self._ids = itertools.count(1)
        self._connect()

    def _connect(self):
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.security:
            self.security.apply(self.sock)
        self.sock.connect(self.address)

    def close(self):
        self.sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, msg_type, fields=None, timeout=None):
        """One request, one reply (matched by a request id; stale replies are skipped)."""
        req = next(self._ids)
        wire.send_msg(self.sock, msg_type, {**(fields or {}), "req": req})
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                self.close()  # drop the unanswered request; a fresh socket for the next
                self._connect()
                raise TimeoutError(
                    f"no answer from the coordinator at {self.address} within "
                    f"{timeout or self.timeout:g} s (is it running? is the address right?)"
                )
            _, msg = wire.recv_msg(self.sock, expect_types=wire.TO_CLIENT_TYPES)
            if msg.get("req") not in (req, None):
                continue
            if msg.type == wire.ERROR:
                raise ClientError(msg.get("message", "unknown error"))
            return msg

    def submit(self, spec) -> str:
        """Submit a job spec (TOML path, TOML/JSON text, dict or JobSpec); its id."""
        if isinstance(spec, str | os.PathLike) and os.path.exists(spec):
            spec = parse_spec(spec).to_dict()  # validated here: errors before the network
        elif hasattr(spec, "to_dict"):
            spec = spec.to_dict()
        return self.request(wire.SUBMIT, {"spec": spec}).fields["job"]

    def status(self, job_id=None) -> dict:
        return self.request(wire.STATUS, {"job": job_id} if job_id else {}).fields

    def jobs(self) -> list[dict]:
        return self.request(wire.JOBS).fields["jobs"]

    def cancel(self, job_id) -> dict:
        return self.request(wire.CANCEL, {"job": job_id}).fields

    def metrics(self, job_id, since=0) -> list[dict]:
        return self.request(wire.METRICS, {"job": job_id, "since": since}).fields["metrics"]

    def wait(self, job_id, timeout=None, poll=0.2) -> dict:
        """Block until the job is done, failed or cancelled; its status. Raises ClientError
        if it failed and TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)["job"]
            if job["state"] == "failed":
                raise ClientError(f"job {job_id} failed: {job.get('error')}")
            if job["state"] in ("done", "cancelled"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['state']} after {timeout} s")
            time.sleep(poll)

    def fetch(self, job_id) -> dict[str, np.ndarray]:
        """The final weights of a finished job, as a state_dict of arrays."""
        msg = self.request(wire.FETCH, {"job": job_id}, timeout=max(self.timeout, 60))
        return {k: np.array(v) for k, v in msg.arrays.items()}
