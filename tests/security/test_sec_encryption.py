"""Traffic is encrypted: a recording TCP proxy between client and coordinator never sees
the msgpack header in clear with keys, and does without them (the proxy works)."""

import pytest
from sec_helpers import RecordingProxy, spec

from shardgrad.client import Client
from shardgrad.security import peer_security

pytestmark = pytest.mark.slow
CLEAR = (b"SUBMIT", b"STATUS", b"digits", b"cross_entropy", b"\xa4type")


def capture(cl, security):
    proxy = RecordingProxy(cl.client_address)
    proxy.start()
    try:
        with Client(proxy.address, timeout=10.0, security=security) as c:
            job = c.submit(spec(rounds=3))
            c.wait(job, timeout=60)
            assert c.fetch(job)
    finally:
        proxy.close()
    return proxy.bytes()


def test_with_keys_nothing_is_in_clear(keys, make_cluster):
    cl = make_cluster(1, keys=str(keys))
    seen = capture(cl, peer_security(keys, "client"))
    assert len(seen) > 10_000  # the weights went through the proxy
    assert b"CURVE" in seen  # the ZMTP greeting names the mechanism...
    for word in CLEAR:
        assert word not in seen  # ...and nothing after it is readable


def test_without_keys_the_same_capture_is_readable(make_cluster):
    cl = make_cluster(1)
    seen = capture(cl, None)
    assert b"NULL" in seen
    for word in CLEAR:
        assert word in seen
