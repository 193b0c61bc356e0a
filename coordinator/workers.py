"""Checks on what workers send: READY's self-report, who a message is from. (A GRADS's
arrays are checked against the model by wire.check_grads: workers check their peers' too.)"""

from .. import wire


def worker_info(msg) -> dict:
    """What a READY may say about its worker, for `status`: host, pid and (an aggregator's)
    role and worker count, nothing else."""
    info = msg.get("info")
    info = info if isinstance(info, dict) else {}
    out = {}
    if isinstance(info.get("host"), str):
        out["host"] = info["host"][:100]
    if type(info.get("pid")) is int:
        out["pid"] = info["pid"]
    if info.get("shm") is True:  # on our host (ipc://): the weights via shared memory
        out["shm"] = True
    if info.get("lease") is True:  # it can run ahead on a lease (worker.Lease)
        out["lease"] = True
    peer = info.get("peer")  # where peers in a lease of several send it their sums
    if isinstance(peer, str) and peer.startswith("ipc://") and len(peer) <= 200:
        out["peer"] = peer
    # An aggregator (coordinator/aggregator.py) says so, and how many workers it has now.
    if info.get("role") == "aggregator" and type(info.get("workers")) is int:
        out["role"], out["workers"] = "aggregator", max(0, min(info["workers"], 100_000))
        # READY and heartbeats travel on two connections, unordered between them: the
        # count's sequence number lets the newer one win.
        out["seq"] = info["seq"] if type(info.get("seq")) is int else 0
        members = info.get("members")
        if isinstance(members, list):  # its own workers, for `status`: strings, bounded
            out["members"] = [
                {k: m[k][:200] for k in ("id", "state", "reason") if isinstance(m.get(k), str)}
                for m in members[:256]
                if isinstance(m, dict)
            ]
    return out


def sender_of(msg) -> str:
    """The worker a message is from. The id it claims must be the identity of the connection
    it speaks on (its heartbeat socket's is id + "#hb"): nobody can speak for another."""
    wid = wire.field_of(msg, "worker", str)
    expected = f"{wid}#hb" if msg.type == wire.HEARTBEAT else wid
    if not msg.envelope or msg.envelope[0] != expected.encode():
        raise wire.ProtocolError(f"{msg.type} claims worker {wid!r} from another connection")
    return wid
