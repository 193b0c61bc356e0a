"""Bad input through the real coordinator while a job runs: path escapes, pickled .npz,
data that does not fit the model, oversize specs and messages, files named by a client, a
message flood. Each gets a clear error; the running job still ends with the exact weights."""

import time

import numpy as np
import pytest
import zmq
from sec_helpers import SLOW, dealer, expected_digest, make_npz, recv_all, spec, try_send

from shardgrad import wire
from shardgrad.client import ClientError
from shardgrad.security import peer_security

pytestmark = pytest.mark.slow


def data_spec(source, **kw):
    return spec(data={"source": source}, **kw).to_dict()


def _phase_bad_data_files(c, root, tmp_path):
    """Data files that must be refused at submit, each with its reason."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(100, 64)).astype(np.float32), rng.integers(0, 10, 100)
    make_npz(str(root / "good.npz"), X=X, y=y)
    outside = make_npz(str(tmp_path / "outside.npz"), X=X, y=y)
    (root / "link.npz").symlink_to(outside)
    make_npz(str(root / "pickled.npz"), X=np.array([{"a": 1}] * 100, dtype=object), y=y)
    make_npz(str(root / "wide.npz"), X=np.zeros((100, 3), np.float32), y=y)
    make_npz(str(root / "floaty.npz"), X=X, y=rng.normal(size=100))
    bad = {
        "file:../outside.npz": "contains '..'",
        f"file:{outside}": "outside the data root",
        "file:link.npz": "outside the data root",
        "file:pickled.npz": "pickled arrays are never loaded",
        "file:wide.npz": "input_shape",
        "file:floaty.npz": "integer class labels",
        "file:missing.npz": "cannot read data file",
    }
    for source, match in bad.items():
        with pytest.raises(ClientError, match=match):
            c.submit(data_spec(source))
    # The good file passes (and is queued behind the running job; cancel it).
    c.cancel(c.submit(data_spec("file:good.npz")))


def _phase_oversize(c, cl, sec):
    """Oversize specs and messages: refused with the limit named, or dropped unread."""
    with pytest.raises(ClientError, match="parameters"):
        c.submit({**spec().to_dict(), "model": [{"type": "linear", "out": 10**6}]})
    with pytest.raises(ClientError, match="at most 256 layers"):
        c.submit({**spec().to_dict(), "model": [{"type": "relu"}] * 300})
    with pytest.raises(ClientError, match="spec is larger than"):
        c.request(wire.SUBMIT, {"spec": "# " + "x" * (1 << 20) + "\nname = 'a'"})
    # A path instead of spec text: the coordinator never opens it (/dev/zero never ends).
    for path in ("/dev/zero", "/etc/passwd", "examples/jobs/digits.toml"):
        with pytest.raises(ClientError, match="never opens a file"):
            c.request(wire.SUBMIT, {"spec": path})
    # Oversize messages: a 3 MiB header, array frames on the client port.
    with pytest.raises(ClientError, match="header is .* bytes, above the limit"):
        c.request(wire.STATUS, {"pad": "x" * (3 << 20)})
    raw = dealer(cl.client_address, sec)
    try_send(raw, wire.encode(wire.STATUS, {"req": 1}, {"a": np.zeros(10)}))
    (err,) = recv_all(raw, 2.0)
    assert err.type == wire.ERROR and "above the limit of 1" in err["message"]
    # A 10 MiB frame is over the transport cap: libzmq drops that connection unread.
    raw2 = dealer(cl.client_address, sec)
    try_send(raw2, [b"\x00" * (10 << 20)])
    assert recv_all(raw2, 1.0) == []


def _phase_client_flood(c, cl, sec):
    """A flood from one peer: a burst is served, the rest is refused with a rate-limit
    error (once a second) and dropped, and nothing else is disturbed."""
    flood = dealer(cl.client_address, sec)
    flood.setsockopt(zmq.SNDHWM, 0)
    for i in range(5000):
        flood.send_multipart(wire.encode(wire.JOBS, {"req": i}))
    # Read until the coordinator has dealt with all 5000 (a loaded machine is slow).
    # Replies that find this reader's queue full are dropped, never waited for (the
    # coordinator must not block on a slow client): they count as "unroutable".
    replies, deadline = [], time.monotonic() + 60
    while True:
        batch = recv_all(flood, 0.5)
        replies += batch
        if batch:
            continue  # keep reading while replies flow
        ok = [m for m in replies if m.type == wire.OK]
        limited = [m for m in replies if m.type == wire.ERROR]
        counters = c.status()["counters"]
        dropped = counters.get("rate_limited", 0) + counters.get("unroutable", 0)
        if dropped >= 5000 - len(ok) - len(limited):
            break
        assert time.monotonic() < deadline, ("the flood was never fully handled", counters)
    assert 400 <= len(ok) + counters.get("unroutable", 0) and len(ok) < 5000
    assert limited and all(m["message"].startswith("rate limit:") for m in limited)
    assert all(m["kind"] == "refused" for m in limited)
    assert counters["rate_limited"] >= 1000
    assert counters["bad_message"] >= 2  # the oversize header and the client-port arrays


def _phase_worker_flood(c, cl, wsec):
    """A flood on the worker port (well-formed, harmless BYEs from one connection that
    speaks for itself): a burst is handled, the rest dropped and counted."""
    wflood = dealer(cl.worker_address, wsec, identity=b"flooder")
    wflood.setsockopt(zmq.SNDHWM, 0)
    for _ in range(10_000):
        wflood.send_multipart(wire.encode(wire.BYE, {"worker": "flooder"}))
    deadline = time.monotonic() + 60
    while c.status()["counters"].get("worker_rate_limited", 0) == 0:
        assert time.monotonic() < deadline, "the worker-port flood was never rate-limited"
        time.sleep(0.1)
    wflood.close(0)


@pytest.mark.parametrize("auth", [False, True])
def test_bad_input_gets_clear_errors_while_a_job_runs(tmp_path, keys, make_cluster, auth):
    root = tmp_path / "data"
    root.mkdir(parents=True, exist_ok=True)
    cl = make_cluster(2, keys=str(keys) if auth else None, data_root=str(root), env=SLOW)
    with cl.client(timeout=10.0) as c:
        job = c.submit(spec(rounds=400))
        deadline = time.monotonic() + 30
        while c.status(job)["job"]["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        _phase_bad_data_files(c, root, tmp_path)
        _phase_oversize(c, cl, peer_security(keys, "client") if auth else None)
        assert c.status(job)["job"]["state"] == "running"  # all of this happens mid-job
        _phase_client_flood(c, cl, peer_security(keys, "client") if auth else None)
        _phase_worker_flood(c, cl, peer_security(keys, "worker") if auth else None)
        final = c.wait(job, timeout=180)
        assert final["digest"] == expected_digest(rounds=400)
