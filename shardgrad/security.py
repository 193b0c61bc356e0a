"""CURVE encryption, ZAP allow-lists, per-message admission and per-peer rate limits.

Key directory (made by `shardgrad keys generate DIR`; every file is a zmq.auth certificate):

    DIR/coordinator.key            the coordinator's public key: give it to workers and clients
    DIR/coordinator.key_secret     the coordinator's key pair: only on the coordinator's machine
    DIR/workers/NAME.key           allow-list of the worker port (public keys only)
    DIR/clients/NAME.key           allow-list of the client port (public keys only)
    DIR/admins/NAME.key            admins: admitted on the client port, may cancel / fetch any job
    DIR/private/NAME.key_secret    the peers' key pairs: give each machine only its own

Adding or deleting a file under workers/, clients/ or admins/ takes effect within
`reload_interval` seconds, without a restart. ZAP only runs at the CURVE handshake, so a
revoked peer's open connection would stay usable; the coordinator therefore also checks
every message's ZMQ "User-Id" (the z85 public key ZAP recorded) against the current lists.

Without keys the coordinator runs open (and says so once in its log).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import wire

log = logging.getLogger("shardgrad.security")

WORKERS, CLIENTS, ADMINS, PRIVATE = "workers", "clients", "admins", "private"
COORDINATOR = "coordinator"
ROLES = {"worker": WORKERS, "client": CLIENTS, "admin": ADMINS}


class KeyDirError(ValueError):
    """A key directory or key file that cannot be used (the message says how to fix it)."""


# --- generating keys -----------------------------------------------------------------------


def _names(prefix: str, n: int) -> list[str]:
    # "worker", "worker-2", ...: LocalCluster and single-machine setups use the plain name.
    return [prefix if i == 0 else f"{prefix}-{i + 1}" for i in range(n)]


def generate_keys(keys_dir, workers: int = 1, clients: int = 1, admins: int = 1) -> Iterator[str]:
    """Create the coordinator's key pair and `workers` / `clients` / `admins` peer key pairs,
    with their public keys in the allow-lists. Existing keys are kept (never overwritten), so
    running it again with larger counts only adds keys. Yields one line per key to print."""
    keys_dir = os.path.abspath(keys_dir)
    private = os.path.join(keys_dir, PRIVATE)
    os.makedirs(keys_dir, exist_ok=True)
    os.makedirs(private, mode=0o700, exist_ok=True)
    os.chmod(private, 0o700)  # secrets: owner only, whatever the umask
    if _make_pair(keys_dir, keys_dir, COORDINATOR):
        yield f"created {keys_dir}/{COORDINATOR}.key_secret (the coordinator's key pair)"
    else:
        yield f"kept    {keys_dir}/{COORDINATOR}.key_secret"
    for role, n in (("worker", workers), ("client", clients), ("admin", admins)):
        listed = os.path.join(keys_dir, ROLES[role])
        os.makedirs(listed, exist_ok=True)
        for name in _names(role, n):
            created = _make_pair(private, listed, name)
            verb = "created" if created else "kept   "
            yield f"{verb} {private}/{name}.key_secret ({role}; allowed by {listed}/{name}.key)"
    yield (
        f"give workers/clients {keys_dir}/{COORDINATOR}.key and their own "
        f"private/NAME.key_secret; delete a file under {ROLES['worker']}/, {ROLES['client']}/ "
        "or admins/ to revoke that key"
    )


def _make_pair(secret_dir: str, public_dir: str, name: str) -> bool:
    secret = os.path.join(secret_dir, f"{name}.key_secret")
    if os.path.exists(secret):
        return False
    public, secret = zmq.auth.create_certificates(secret_dir, name)
    os.chmod(secret, 0o600)
    if os.path.abspath(public_dir) != os.path.abspath(secret_dir):
        os.replace(public, os.path.join(public_dir, f"{name}.key"))
    return True


# --- loading keys --------------------------------------------------------------------------


def _load_pair(path: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyDirError(f"cannot read key pair {path}: {e}") from None
    if not secret:
        raise KeyDirError(f"{path} has no secret key (a .key_secret file is needed)")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users: chmod 600 it", path)
    return public, secret


def _load_public(path: str) -> bytes:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise KeyDirError(f"cannot read public key {path}: {e}") from None


def _coordinator_public(keys_dir: str) -> bytes:
    for name in (f"{COORDINATOR}.key", f"{COORDINATOR}.key_secret"):
        path = os.path.join(keys_dir, name)
        if os.path.exists(path):
            return _load_public(path)
    raise KeyDirError(
        f"no {COORDINATOR}.key in {keys_dir}: copy the coordinator's public key there "
        "(shardgrad keys generate DIR makes it)"
    )


class PeerSecurity:
    """A worker's or client's side: CURVE client with its own pair and the server's key."""

    def __init__(self, public: bytes, secret: bytes, server_public: bytes, name: str = ""):
        self.public, self.secret, self.server_public, self.name = (
            public,
            secret,
            server_public,
            name,
        )

    def apply(self, sock) -> None:
        """Call before connect."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public

    @property
    def user_id(self) -> str:
        """What the coordinator sees as this peer's User-Id (and job owner)."""
        return self.public.decode("ascii")


def peer_security(
    keys_dir, role: str, key_name: str | None = None, server_key: str | None = None
) -> PeerSecurity:
    """The CURVE client settings for `role` ("worker" or "client") from a key directory.

    `key_name` picks DIR/private/NAME.key_secret (or is a path to a .key_secret file); when
    None, DIR/private/ROLE.key_secret, else the one private key whose name starts with ROLE.
    `server_key` is the public key file of what we connect to, when that is not the
    coordinator (a worker behind an aggregator: DIR/workers/AGGREGATOR-KEY.key).
    """
    keys_dir = os.path.abspath(os.fspath(keys_dir))
    if not os.path.isdir(keys_dir):
        raise KeyDirError(f"key directory {keys_dir} does not exist (shardgrad keys generate DIR)")
    private = os.path.join(keys_dir, PRIVATE)
    if key_name and (os.sep in key_name or key_name.endswith(".key_secret")):
        path = os.path.abspath(key_name)
    elif key_name:
        path = os.path.join(private, f"{key_name}.key_secret")
    else:
        try:
            found = sorted(f for f in os.listdir(private) if f.endswith(".key_secret"))
        except OSError:
            found = []
        # The key named after the role ("worker", "client") if there is one, else the only
        # one whose name starts with it ("worker-3" on a machine that holds just that key).
        exact = f"{role}.key_secret"
        mine = [exact] if exact in found else [f for f in found if f.startswith(role)]
        if len(mine) != 1:
            have = ", ".join(f[: -len(".key_secret")] for f in found) or "none"
            raise KeyDirError(
                f"cannot choose a {role} key in {private} (found: {have}); "
                "pass --key-name NAME (SHARDGRAD_KEY_NAME)"
            )
        path = os.path.join(private, mine[0])
    if not os.path.exists(path):
        raise KeyDirError(f"no key pair {path} (shardgrad keys generate DIR makes it)")
    public, secret = _load_pair(path)
    server = _load_public(server_key) if server_key else _coordinator_public(keys_dir)
    return PeerSecurity(public, secret, server, os.path.basename(path))


# --- the coordinator's side ----------------------------------------------------------------


class AllowList:
    """The public keys (z85 str) in one or more directories of .key files, re-read when a
    file is added, removed or changed (checked at most every `interval` seconds)."""

    def __init__(self, *dirs: str, interval: float = 1.0):
        self.dirs, self.interval = dirs, interval
        self._lock = threading.Lock()  # used from the ZAP thread and the coordinator loop
        self._keys: frozenset[str] = frozenset()
        self._signature = None
        self._checked = -float("inf")
        self.reload(force=True)

    def _scan(self):
        sig = []
        for d in self.dirs:
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.name.endswith(".key") and e.is_file():
                            st = e.stat()
                            sig.append((e.path, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                continue
        return tuple(sorted(sig))

    def reload(self, force: bool = False) -> frozenset[str]:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self.interval:
                return self._keys
            self._checked = now
            try:
                sig = self._scan()
            except OSError as e:  # keep the last good list rather than locking everyone out
                log.error("cannot read the allow-list %s: %s", self.dirs, e)
                return self._keys
            if sig == self._signature:
                return self._keys
            keys = set()
            for path, _, _ in sig:
                try:
                    keys.add(_load_public(path).decode("ascii"))
                except KeyDirError as e:
                    log.error("ignoring a bad allow-list entry: %s", e)
            if self._signature is not None:
                log.info("allow-list %s reloaded: %d key(s)", ", ".join(self.dirs), len(keys))
            self._keys, self._signature = frozenset(keys), sig
            return self._keys

    def __contains__(self, user_id) -> bool:
        if isinstance(user_id, bytes):
            user_id = user_id.decode("ascii", "replace")
        return user_id in self.reload()

    def __len__(self) -> int:
        return len(self.reload())


class _CurveCallback:
    """pyzmq's ZAP credentials provider: the key must be in the live allow-list."""

    def __init__(self, allow: AllowList, domain: str):
        self.allow, self.domain = allow, domain

    def callback(self, domain, key) -> bool:
        ok = key in self.allow
        if not ok:
            log.warning(
                "refused a %s connection: key %s is not in the allow-list",
                self.domain,
                key.decode("ascii", "replace"),
            )
        return ok


class ServerDomain:
    """One coordinator port: a CURVE server in its own ZAP domain with its own allow-list."""

    def __init__(self, auth: ServerAuth, name: str, allow: AllowList):
        self.auth, self.name, self.allow = auth, name, allow

    def apply(self, sock) -> None:
        """Call before bind. Starts the ZAP handler in the socket's context on first use."""
        self.auth._start(sock.context)
        sock.zap_domain = self.name.encode()
        sock.curve_server = True
        sock.curve_publickey = self.auth.public
        sock.curve_secretkey = self.auth.secret


class ServerAuth:
    """The coordinator's keys: `worker_domain` and `client_domain` go on its two sockets
    (an aggregator's worker port uses `worker_domain` too, with its own key pair)."""

    def __init__(self, keys_dir, reload_interval: float = 1.0, pair: PeerSecurity | None = None):
        self.dir = os.path.abspath(os.fspath(keys_dir))
        path = os.path.join(self.dir, f"{COORDINATOR}.key_secret")
        if pair is not None:  # an aggregator serves its workers with its own worker key
            self.public, self.secret = pair.public, pair.secret
        elif not os.path.exists(path):
            raise KeyDirError(
                f"no {COORDINATOR}.key_secret in {self.dir}: run shardgrad keys generate {keys_dir}"
            )
        else:
            self.public, self.secret = _load_pair(path)
        d = lambda sub: os.path.join(self.dir, sub)
        self.workers = AllowList(d(WORKERS), interval=reload_interval)
        # Admins use the client port, so they are in its allow-list as well.
        self.clients = AllowList(d(CLIENTS), d(ADMINS), interval=reload_interval)
        self.admins = AllowList(d(ADMINS), interval=reload_interval)
        self.worker_domain = ServerDomain(self, WORKERS, self.workers)
        self.client_domain = ServerDomain(self, CLIENTS, self.clients)
        self._authenticator: ThreadAuthenticator | None = None
        for what, allow in (("worker", self.workers), ("client", self.clients)):
            if not len(allow):
                log.warning("no %s keys in %s: no %s can connect", what, allow.dirs, what)

    def _start(self, ctx) -> None:
        if self._authenticator is not None:
            if self._authenticator.context is not ctx:
                raise RuntimeError("both coordinator sockets must share one zmq.Context")
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("shardgrad.zap"))
        auth.start()
        auth.configure_curve_callback(WORKERS, _CurveCallback(self.workers, WORKERS))
        auth.configure_curve_callback(CLIENTS, _CurveCallback(self.clients, CLIENTS))
        self._authenticator = auth

    def allow_list(self, domain: str) -> AllowList:
        return self.workers if domain == WORKERS else self.clients

    def is_admin(self, user_id) -> bool:
        return user_id is not None and user_id in self.admins

    def stop(self) -> None:
        """Stop the ZAP thread (its sockets would otherwise block Context.term())."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


# --- per-message admission in the coordinator loop -----------------------------------------


class TokenBucket:
    __slots__ = ("tokens", "stamp", "warned")

    def __init__(self, burst: float, now: float):
        self.tokens, self.stamp, self.warned = burst, now, -float("inf")


class RateLimit:
    """Token buckets per peer for one port: `rate` messages/s, bursts of `burst`."""

    MAX_PEERS = 10_000  # buckets kept (least recently used evicted)

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = float(rate), float(burst)
        self.buckets: OrderedDict[bytes | str, TokenBucket] = OrderedDict()

    def refused(self, peer, now: float) -> TokenBucket | None:
        """None if `peer` may send one more message now, else its (empty) bucket."""
        if self.rate <= 0:
            return None
        b = self.buckets.get(peer)
        if b is None:
            b = self.buckets[peer] = TokenBucket(self.burst, now)
            while len(self.buckets) > self.MAX_PEERS:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(peer)
            b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return None
        return b


@dataclass
class Refusal:
    """Why `Gate.admit` refused a message: the ERROR text for a client (None: drop it
    silently), and the worker to drop if its own key was revoked."""

    reply: str | None = None
    drop_worker: str | None = None


class Gate:
    """What the coordinator asks before handling a decoded message: is the sender's key
    still allowed (revocation), and is the peer within its port's message rate?

    It only decides and counts (into the coordinator's `counters`); the coordinator sends
    the replies. A client gets an ERROR (rate-limit errors at most once a second per peer,
    the rest are dropped), a worker's message is dropped. The worker port's rate is far
    above what a working worker sends (heartbeats and one GRADS per block); it only stops a
    flood.
    """

    def __init__(
        self,
        auth: ServerAuth | None,
        counters,
        rate: float = 200.0,
        burst: int = 400,
        worker_rate: float = 2000.0,
        worker_burst: int = 4000,
    ):
        self.auth, self.counters = auth, counters
        self.clients = RateLimit(rate, burst)
        self.workers = RateLimit(worker_rate, worker_burst)

    def admit(self, msg, is_client: bool) -> Refusal | None:
        """None to go ahead, else the Refusal (already counted)."""
        if self.auth is not None:
            allow = self.auth.clients if is_client else self.auth.workers
            if msg.user is None or msg.user not in allow:
                self.counters["revoked_key"] += 1
                log.warning(
                    "refused a %s message from key %s: not in the allow-list (revoked?)",
                    msg.type,
                    msg.user,
                )
                if is_client:
                    return Refusal("not authorized: this key is not (or no longer) allowed")
                wid = msg.get("worker")
                # only the worker's own connections may get it dropped, never a claim
                own = (wid.encode(), f"{wid}#hb".encode()) if isinstance(wid, str) else ()
                mine = bool(msg.envelope) and msg.envelope[0] in own
                return Refusal(drop_worker=wid if mine else None)
        return self._take(msg, is_client)

    def _take(self, msg, is_client: bool) -> Refusal | None:
        conn = msg.envelope[0] if msg.envelope else b""
        if is_client:  # per key when auth is on, else per connection
            limit, peer = self.clients, msg.user or conn
        else:  # per connection: a worker's main and heartbeat sockets are separate peers
            limit, peer = self.workers, conn
        now = time.monotonic()
        b = limit.refused(peer, now)
        if b is None:
            return None
        if not is_client:
            self.counters["worker_rate_limited"] += 1
            return Refusal()
        self.counters["rate_limited"] += 1
        if now - b.warned < 1.0:
            return Refusal()
        b.warned = now
        return Refusal(
            f"rate limit: more than {limit.rate:g} messages/s (burst {limit.burst:g}) from "
            "this peer; excess messages are dropped"
        )

    def authorize(self, msg, row: dict, action: str) -> None:
        """With auth on, only the job's owner or an admin may `action` (cancel / fetch) it."""
        if self.auth is None:
            return
        if msg.user is not None and (msg.user == row.get("owner") or self.auth.is_admin(msg.user)):
            return
        self.counters["forbidden"] += 1
        raise wire.Refused(
            f"not authorized to {action} job {row['id']}: only the client that submitted it "
            "or an admin key may"
        )

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
