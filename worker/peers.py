"""A lease of several workers (worker.Lease with peers): each tells the others, straight,
worker to worker, where its block sums of a round are, and steps its own engine with
everyone's (docs/architecture.md, "Leases"). The coordinator is off the round's path.

The workers share the coordinator's host. A sum is read in place, from a slot of the
sender's ring (shm.GradsRing), or comes as frames when that ring had no slot free. Reading
in place needs no lock: a worker writes round r+2's sums only once it has every peer's
sums of round r+1, which a peer sends only after stepping round r, so after reading ours
of round r. A peer may still be reading our round r+1 slots, never older ones; the ring
writes a slot again `shm.RING_SLOTS` puts later, and the coordinator grants such a lease
only while each member holds at most RING_SLOTS // 2 blocks a round. Once the lease ends
nothing keeps a slow peer in step, so the ring moves to a new segment
(GradsRing.retire) and leaves the old one to its readers.

Nothing a peer sends is trusted further than the coordinator trusts a GRADS: the lease id,
the sender, its block and every array's shape and dtype are checked (the shared memory's
names and bounds by shm.Attached). A peer that says nothing leaves us waiting for the
coordinator, which ends the lease with a TASK or a STEPPED {"end": true}.
"""

import logging
import os
import shutil
import tempfile
from collections import deque

import zmq

from .. import wire
from ..shm import Attached

log = logging.getLogger("shardgrad.worker")


class Peers:
    def __init__(self, ctx: zmq.Context, limits: wire.Limits, near: str | None = None):
        self.ctx, self.limits = ctx, limits
        self.dir = _private_dir(near)
        self.endpoint = f"ipc://{self.dir}/in"
        self.inbox = self._socket(zmq.PULL)
        self.inbox.bind(self.endpoint)
        self.out: dict[str, zmq.Socket] = {}  # peer endpoint -> PUSH
        self.rings = Attached(limits)
        self.ring_of: dict[str, str] = {}  # peer -> its ring's segment name
        # SUMS of another lease: a newer one's, sent by a peer that got its TASK before we
        # got ours, must wait for it (dropped, we would wait for them forever).
        self.later: deque = deque(maxlen=64)

    def _socket(self, kind):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        wire.apply_socket_limits(sock, self.limits)
        return sock

    def send(self, endpoints, fields: dict, arrays=None) -> None:
        """One SUMS to each peer at `endpoints`. A peer gone or not reading loses it: its
        lease is over then, and the coordinator ends ours too."""
        for endpoint in endpoints:
            sock = self.out.get(endpoint)
            if sock is None:
                sock = self.out[endpoint] = self._socket(zmq.PUSH)
                sock.connect(endpoint)
            try:
                wire.send_msg(sock, wire.SUMS, fields, arrays, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("peer %s does not take our sums", endpoint)

    def take(self, lease, layout) -> None:
        """Every SUMS waiting, into lease.got (round -> block -> the sum's arrays); those of
        another lease are kept aside for it (a few), those of a round it has stepped
        dropped."""
        for msg in [m for m in self.later if m.get("lease") == lease.id]:
            self.later.remove(msg)
            self.keep(lease, msg, layout)
        while self.inbox.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # (cheaper than zmq.Again)
            try:
                _, msg = wire.recv_msg(self.inbox, self.limits, expect_types=wire.PEER_TYPES,
                                       flags=zmq.NOBLOCK)  # fmt: skip
            except zmq.Again:
                return
            except wire.ProtocolError as e:
                log.warning("dropped a bad SUMS: %s", e)
                continue
            if msg.get("lease") != lease.id:
                self.later.append(msg)
            else:
                self.keep(lease, msg, layout)

    def keep(self, lease, msg, layout) -> None:
        try:
            self._keep(lease, msg, layout)
        except wire.ProtocolError as e:
            log.warning("dropped a bad SUMS: %s", e)

    def _keep(self, lease, msg, layout) -> None:
        wid, rnd, block = wire.require(msg, "worker", "round", "block")
        if type(wid) is not str:
            raise wire.ProtocolError(f"SUMS 'worker' must be a string, got {type(wid).__name__}")
        if type(rnd) is not int or rnd < lease.engine.next_round:
            return
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int for b in block)):
            raise wire.ProtocolError(f"SUMS 'block' must be [lo, hi] integers, got {block!r}")
        if tuple(block) not in lease.peers.get(wid, ((), ()))[1]:
            raise wire.ProtocolError(f"SUMS of block {block} from {str(wid)[:80]!r}: not its block")
        if "shm" in msg:
            name, old = msg.get("shm"), self.ring_of.get(wid)
            if old is not None and old != name:
                self.rings.close(old)  # its new ring (another job)
            views = self.rings.views(msg)
            self.ring_of[wid] = name
            msg.arrays = dict(zip(wire.sum_names(len(views)), views, strict=True))
        got = lease.got.setdefault(rnd, {})
        if tuple(block) not in got:  # (the first: a second SUMS for it changes nothing)
            got[tuple(block)] = wire.check_grads(msg, layout)

    def only(self, peers: dict) -> None:
        """A new lease with `peers` (peer -> (endpoint, blocks)): let go of the sockets and
        rings of those not in it."""
        endpoints = {endpoint for endpoint, _ in peers.values()}
        for endpoint in [e for e in self.out if e not in endpoints]:
            self.out.pop(endpoint).close(0)
        for wid in [w for w in self.ring_of if w not in peers]:
            self.rings.close(self.ring_of.pop(wid))

    def close(self) -> None:
        for sock in [self.inbox, *self.out.values()]:
            sock.close(0)
        self.rings.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _private_dir(near: str | None) -> str:
    """A new directory for our port (0700: this user's processes only), beside the
    coordinator's ipc socket `near` when we may write there (whoever cleans up after the
    cluster then cleans up after us too, even after a kill -9), else in the temp dir."""
    parent = os.path.dirname(near[len("ipc://") :]) if near and near.startswith("ipc://") else ""
    if parent and os.access(parent, os.W_OK) and len(parent) < 80:  # (ipc paths: < 108)
        try:
            return tempfile.mkdtemp(prefix="sg-peer-", dir=parent)
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="sg-peer-")
