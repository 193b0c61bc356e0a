"""Helpers for the security tests: raw sockets, a reference job, a recording TCP proxy."""

import functools
import os
import secrets
import socket
import threading
import time

import zmq

from shardgrad import wire
from shardgrad.cluster import wait_for as _wait_for
from shardgrad.jobspec import parse_spec
from shardgrad.training import train_local, weights_digest

JOB = {
    "name": "secure",
    "model": [{"type": "linear", "out": 32}, {"type": "relu"}, {"type": "linear", "out": 10}],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "data": {"source": "builtin:digits"},
    "global_batch": 64,
    "micro_batch": 8,
    "rounds": 30,
    "seed": 5,
    "eval": {"holdout": 0.2},
}
SLOW = {"SHARDGRAD_FAULT_DELAY": "0.004"}  # seconds per micro-batch: a job that lasts


def spec(**overrides):
    return parse_spec({**JOB, **overrides})


@functools.lru_cache
def expected_digest(**overrides):
    return weights_digest(train_local(spec(**overrides))[0])


def dealer(address, security=None, identity=None, monitor=False):
    """A raw DEALER (optionally CURVE); with monitor=True also a monitor socket."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    if security:
        security.apply(s)
    # pyzmq's default monitor address is derived from the socket's fd, which the OS reuses:
    # a name of our own never collides with a monitor still bound in the shared context
    addr = f"inproc://monitor-{secrets.token_hex(8)}"
    mon = s.get_monitor_socket(addr=addr) if monitor else None
    s.connect(address)
    return (s, mon) if monitor else s


def try_send(sock, frames) -> bool:
    """Send without blocking; False if the socket would not even queue it (a refused DEALER
    has no connection to queue on)."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def wait_event(mon, wanted, timeout=5.0):
    """True once the monitor reports an event in `wanted`."""
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mon.poll(100):
            if recv_monitor_message(mon)["event"] in wanted:
                return True
    return False


def recv_all(sock, timeout=1.0):
    """Every message the socket receives within `timeout` s (decoded; bad ones raise)."""
    out, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            out.append(wire.recv_msg(sock)[1])
    return out


def wait_for(predicate, what, timeout=30.0):
    return _wait_for(predicate, what, timeout, interval=0.1)


class RecordingProxy(threading.Thread):
    """A plain TCP proxy on 127.0.0.1 (ephemeral port) to the coordinator's ipc:// client
    socket, keeping every byte it forwards: what anyone on the network path would see."""

    def __init__(self, ipc_address):
        super().__init__(daemon=True)
        self.target = ipc_address[len("ipc://") :]
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.closed = False

    def run(self):
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:  # the coordinator is gone (teardown): refuse this one too
                conn.close()
                upstream.close()
                continue
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.listener.close()

    def bytes(self):
        with self.lock:
            return bytes(self.captured)


def make_npz(path, **arrays):
    import numpy as np

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path
