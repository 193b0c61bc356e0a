"""CURVE + ZAP: who may connect to which port, revocation, and who may act on a job."""

import os
import subprocess
import sys
import time

import pytest
import zmq
from sec_helpers import (
    SLOW,
    dealer,
    expected_digest,
    recv_all,
    spec,
    try_send,
    wait_event,
    wait_for,
)

from shardgrad import wire
from shardgrad.client import Client, ClientError
from shardgrad.security import KeyDirError, generate_keys, peer_security

pytestmark = pytest.mark.slow
AUTH_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH}
NO_HANDSHAKE = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_DISCONNECTED,
}


def worker_ids(cl):
    with cl.client() as c:
        return {w["id"] for w in c.status()["workers"] if w["state"] in ("alive", "suspect")}


def test_strangers_get_nothing_and_cannot_join_or_submit(keys, tmp_path, make_cluster):
    cl = make_cluster(1, keys=str(keys))
    ready = wire.encode(wire.READY, {"worker": "intruder", "info": {}})
    status = wire.encode(wire.STATUS, {"req": 1})
    submit = wire.encode(wire.SUBMIT, {"spec": spec().to_dict(), "req": 2})

    # 1. No CURVE at all: the coordinator's CURVE server never completes a handshake.
    w = dealer(cl.worker_address, identity=b"intruder")
    c = dealer(cl.client_address)
    try_send(w, ready)
    try_send(c, status)
    try_send(c, submit)
    # 2. CURVE with the right server key but a key pair the coordinator never listed.
    list(generate_keys(tmp_path / "other", workers=1, clients=1, admins=0))
    stranger_w = peer_security(tmp_path / "other", "worker")
    stranger_c = peer_security(tmp_path / "other", "client")
    server_key = peer_security(keys, "client").server_public
    stranger_w.server_public = stranger_c.server_public = server_key
    w2, wmon = dealer(cl.worker_address, stranger_w, b"intruder2", monitor=True)
    c2, cmon = dealer(cl.client_address, stranger_c, monitor=True)
    assert wait_event(wmon, AUTH_FAILED) and wait_event(cmon, AUTH_FAILED)  # ZAP said no
    try_send(w2, ready)
    try_send(c2, submit)

    for s in (w, c, w2, c2):
        assert recv_all(s, timeout=1.0) == []  # no reply, no data, not even an ERROR
    assert worker_ids(cl).isdisjoint({"intruder", "intruder2"})
    with cl.client() as ok:
        assert ok.jobs() == []  # nothing was submitted
    with pytest.raises(TimeoutError):  # the high-level client: refused the same way
        with Client(cl.client_address, timeout=1.0, security=stranger_c) as bad:
            bad.status()


def test_role_keys_are_separate(keys, make_cluster):
    cl = make_cluster(1, keys=str(keys))
    # A worker key cannot submit: ZAP's "clients" domain does not list it.
    as_client = peer_security(keys, "client", "worker")
    s, mon = dealer(cl.client_address, as_client, monitor=True)
    assert wait_event(mon, AUTH_FAILED)
    try_send(s, wire.encode(wire.SUBMIT, {"spec": spec().to_dict(), "req": 1}))
    assert recv_all(s, 1.0) == []
    # A client key (or an admin key) cannot pose as a worker.
    for name in ("client", "admin"):
        as_worker = peer_security(keys, "worker", name)
        s, mon = dealer(cl.worker_address, as_worker, f"fake-{name}".encode(), monitor=True)
        assert wait_event(mon, AUTH_FAILED)
        try_send(s, wire.encode(wire.READY, {"worker": f"fake-{name}", "info": {}}))
        assert recv_all(s, 0.5) == []
    assert not any(w.startswith("fake-") for w in worker_ids(cl))
    with cl.client() as c:
        assert c.jobs() == []


def test_revoked_client_is_dropped_on_its_open_connection(keys, make_cluster):
    cl = make_cluster(1, keys=str(keys))
    c2 = Client(cl.client_address, timeout=3.0, security=peer_security(keys, "client", "client-2"))
    with c2:
        assert c2.status()["workers"] is not None  # admitted
        listed = keys / "clients" / "client-2.key"
        saved = listed.read_bytes()
        os.remove(listed)  # revoke; no restart
        time.sleep(1.3)  # the allow-list is re-read at most once a second
        # The CURVE session is still open, but the next request is refused.
        with pytest.raises(ClientError, match="not authorized"):
            c2.submit(spec())
        with pytest.raises(ClientError, match="not authorized"):
            c2.status()
    # A new connection with the revoked key fails at the handshake.
    s, mon = dealer(cl.client_address, peer_security(keys, "client", "client-2"), monitor=True)
    assert wait_event(mon, AUTH_FAILED)
    with cl.client() as c:  # others are unaffected
        assert c.jobs() == []
        assert c.status()["counters"]["revoked_key"] >= 2
    # Re-listing the key lets it back in (reload works both ways).
    listed.write_bytes(saved)
    time.sleep(1.3)
    with Client(
        cl.client_address, timeout=3.0, security=peer_security(keys, "client", "client-2")
    ) as again:
        assert again.jobs() == []


def test_revoked_worker_is_dropped_and_the_job_still_finishes(keys, make_cluster):
    cl = make_cluster(1, keys=str(keys), env=SLOW)
    cmd = [
        sys.executable,
        "-m",
        "shardgrad.cli",
        "worker",
        "--coordinator-workers",
        cl.worker_address,
        "--keys",
        str(keys),
        "--key-name",
        "worker-2",
        "--heartbeat-interval",
        "0.2",
        "--id",
        "second",
    ]
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cl.env)
    try:
        wait_for(lambda: "second" in worker_ids(cl), "worker-2 to join")
        with cl.client() as c:
            job = c.submit(spec(rounds=80))
            wait_for(lambda: c.status(job)["job"]["round"] >= 3, "a few rounds")
            os.remove(keys / "workers" / "worker-2.key")
            wait_for(
                lambda: "second" not in worker_ids(cl),
                "the revoked worker to be dropped",
                timeout=5,
            )
            final = c.wait(job, timeout=120)
            assert final["digest"] == expected_digest(rounds=80)
            assert "second" not in worker_ids(cl)  # its heartbeats are refused too
            assert c.status()["counters"]["revoked_key"] > 0
    finally:
        second.terminate()
        second.wait(10)


def test_only_owner_or_admin_may_cancel_or_fetch(keys, make_cluster):
    cl = make_cluster(1, keys=str(keys))
    sec = lambda name: peer_security(keys, "client", name)
    with (
        Client(cl.client_address, security=sec("client")) as owner,
        Client(cl.client_address, security=sec("client-2")) as other,
        Client(cl.client_address, security=sec("admin")) as admin,
    ):
        # A "user" field is just ignored: ownership comes from the CURVE key.
        forged = {"spec": spec(rounds=5).to_dict(), "user": sec("client-2").user_id}
        job = owner.request(wire.SUBMIT, forged).fields["job"]
        owner.wait(job, timeout=60)
        with pytest.raises(ClientError, match="not authorized to fetch"):
            other.fetch(job)
        assert other.status(job)["job"]["state"] == "done"  # status is visible to all
        assert owner.fetch(job) and admin.fetch(job)
        long_job = owner.submit(spec(rounds=100000))
        with pytest.raises(ClientError, match="not authorized to cancel"):
            other.cancel(long_job)
        assert admin.cancel(long_job)["state"] == "cancelled"
        assert other.status()["counters"]["forbidden"] == 2


def test_open_mode_has_no_owners(make_cluster):
    cl = make_cluster(1)
    with cl.client() as a, cl.client() as b:
        job = a.submit(spec(rounds=100000))
        assert b.cancel(job)["state"] == "cancelled"  # open mode: anyone (as warned)
    log = open(os.path.join(cl.log_dir, "coordinator.log")).read()
    assert log.count("running without --keys") == 1


def test_key_directory_errors(tmp_path):
    lines = list(generate_keys(tmp_path / "k", workers=2, clients=1))
    assert sum(line.startswith("created") for line in lines) == 5
    again = list(generate_keys(tmp_path / "k", workers=3, clients=1))  # adds, never overwrites
    assert sum(line.startswith("created") for line in again) == 1
    assert oct((tmp_path / "k" / "private" / "worker.key_secret").stat().st_mode & 0o777) == "0o600"
    assert peer_security(tmp_path / "k", "worker").name == "worker.key_secret"
    os.remove(tmp_path / "k" / "private" / "worker.key_secret")
    with pytest.raises(KeyDirError, match="cannot choose a worker key"):
        peer_security(tmp_path / "k", "worker")  # worker-2 or worker-3?
    with pytest.raises(KeyDirError, match="no key pair"):
        peer_security(tmp_path / "k", "client", "nobody")
    with pytest.raises(KeyDirError, match="does not exist"):
        peer_security(tmp_path / "missing", "client")
    from shardgrad.security import ServerAuth

    with pytest.raises(KeyDirError, match="keys generate"):
        ServerAuth(tmp_path / "k" / "private")
