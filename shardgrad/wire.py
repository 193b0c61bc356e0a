"""The wire protocol shared by coordinator, workers and clients.

Every message is a ZeroMQ multipart message::

    frame 0      msgpack header: {"type": str, "v": PROTOCOL_VERSION, ...fields,
                                  "arrays": [[name, dtype, shape], ...]}
    frame 1..n   one raw little-endian C-order buffer per entry of "arrays"

Arrays never go inside msgpack and nothing is ever pickled. `decode` trusts nothing: every
size is checked against `Limits` before it is used, and the only exception it raises is
`ProtocolError`, so a server loop can catch exactly that and keep serving.

Routing: the coordinator binds ROUTER sockets. A DEALER peer's message arrives at the
ROUTER as [identity, header, arrays...] (no empty delimiter frame: DEALER does not add
one and we do not send one). A REQ peer adds an empty delimiter: [identity, b"", header,
...]; `recv_msg` strips it and remembers it in `Message.envelope` so `reply` can route the
answer back. A header is never empty, so an empty frame is always a delimiter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

# Bumped whenever what a worker computes may change bits, too: workers of two versions must
# never add to one job's sums. 2: core/ops.py _linear's GEMM order for few rows.
PROTOCOL_VERSION = 2

# --- message types -------------------------------------------------------------------------
# worker -> coordinator
READY = "READY"  # register (again, after a silent coordinator): {"worker", "info"}
HEARTBEAT = "HEARTBEAT"  # liveness, both ways: a worker's beat, the coordinator's answer
GRADS = "GRADS"  # one block's gradient sum: {"job", "round", "block", "worker"} + arrays
# (and the TASK's "gen" and "boot", which GRADS and FAULT echo: a sum of a timeline since
# abandoned, by a rollback or a coordinator restart, is late)
FAULT = "FAULT"  # job code raised: {"job", "round", "block", "micro_batch", "error"}
BYE = "BYE"  # clean leave (SIGTERM): its undelivered blocks are re-issued at once
# an aggregator caught one of its workers lying: what it sent since round "since" is suspect
RECALL = "RECALL"  # {"job", "since", "reason"}
# a lease the coordinator follows (TASK "lease" {"follow": S}): its training state after
# round "round" - 1, the metrics rows of the rounds since the last one, + "state.*" arrays
STATE = "STATE"  # {"job", "lease", "round", "rows", "state"}
# coordinator -> worker
TASK = "TASK"  # a round's assignment: {"job", "gen", "round", "blocks", "spec"} + weights
# (to an aggregator also "layout": [[shape, dtype], ...] of a GRADS, to check its workers';
# "again": true when a sum it sent was lost on its way and is asked for again; "boot": the
# top coordinator's boot id, as (gen, round) name other weights after a restart; not to be
# confused with the "boot" in HEARTBEAT answers, the answering process's own)
STOP_JOB = "STOP_JOB"  # job finished / cancelled / failed: drop its state
# a lone worker's lease (TASK "lease"): rounds before "round" are in the weights, go on
STEPPED = "STEPPED"  # {"job", "lease", "round"} (+ "grads_ack" on the shared-memory path,
# "end": true when a lease of several workers ends for all of them)
# worker -> worker, in a lease of several (worker.Lease): a block sum of one of its rounds
SUMS = "SUMS"  # {"worker", "lease", "round", "block"} + ring fields (shm) or arrays
# client -> coordinator
SUBMIT = "SUBMIT"
STATUS = "STATUS"
JOBS = "JOBS"
CANCEL = "CANCEL"
METRICS = "METRICS"
FETCH = "FETCH"
# coordinator -> client
OK = "OK"
ERROR = "ERROR"  # {"message", "kind": "refused" (an ordinary no) | "bad_message" (malformed)}

# What each side accepts: pass as `expect_types` to decode / recv_msg.
WORKER_TYPES = frozenset({READY, HEARTBEAT, GRADS, FAULT, BYE, RECALL, STATE})  # worker port
CLIENT_TYPES = frozenset({SUBMIT, STATUS, JOBS, CANCEL, METRICS, FETCH})  # client port
TO_WORKER_TYPES = frozenset({TASK, STOP_JOB, STEPPED, HEARTBEAT})  # worker side
TO_CLIENT_TYPES = frozenset({OK, ERROR})  # client side
PEER_TYPES = frozenset({SUMS})  # a worker's peer port

RESERVED_KEYS = frozenset({"type", "v", "arrays"})
ALLOWED_DTYPES = frozenset({"float32", "float64", "int64", "int32", "uint8", "bool"})

MiB = 1 << 20


class Refused(Exception):
    """An ordinary refusal of a well-formed request (queue full, no such job, not done yet,
    not yours): the client gets ERROR kind "refused"; nothing is counted as malformed."""


class ProtocolError(ValueError):
    """A message that cannot be accepted. The only exception `decode` raises.

    `identity` / `envelope` are set by `recv_msg` on a ROUTER so the caller can still send an
    ERROR reply to the peer that sent the bad message.
    """

    identity: bytes | None = None
    envelope: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Hard limits applied before anything is allocated from untrusted sizes."""

    max_frame_bytes: int = 256 * MiB
    max_message_bytes: int = 1024 * MiB
    max_arrays: int = 4096
    max_array_elements: int = 1 << 28
    max_header_bytes: int = 1 * MiB
    allowed_dtypes: frozenset[str] = ALLOWED_DTYPES


DEFAULT_LIMITS = Limits()
# The coordinator's client port: requests are a header only (a spec is at most 1 MiB), so a
# client can send no array frames and far less data than a worker. The frame cap (enforced
# by libzmq as MAXMSGSIZE, which drops the connection) sits above the header limit so that
# a moderately oversized request still gets a clear ERROR reply.
CLIENT_PORT_LIMITS = Limits(
    max_frame_bytes=8 * MiB, max_message_bytes=8 * MiB, max_arrays=0, max_header_bytes=2 * MiB
)


@dataclass(slots=True)
class Message:
    """A decoded message. Arrays are read-only views of the received frames (zero-copy)."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    envelope: tuple[bytes, ...] = ()  # routing frames to reply with (ROUTER side only)
    # The sender's authenticated ZMQ User-Id (z85 CURVE public key, set by ZAP); None when
    # the socket runs without authentication. Never taken from the header.
    user: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __getitem__(self, key: str) -> Any:
        try:
            return self.fields[key]
        except KeyError:
            raise ProtocolError(f"message {self.type} is missing field '{key}'") from None

    def __contains__(self, key: str) -> bool:
        return key in self.fields


# --- encoding ------------------------------------------------------------------------------


def _pack_default(obj: Any) -> Any:
    # numpy scalars sneak into fields (e.g. a loss value); send them as plain Python values.
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__} in a message header")


def encode(
    msg_type: str,
    fields: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] | None = None,
) -> list:
    """Frames for one message: the header bytes, then one buffer per array.

    C-contiguous little-endian arrays are sent without a copy (a memoryview of their
    memory), so the caller must not modify them until the send has completed.
    """
    header: dict[str, Any] = {"type": msg_type, "v": PROTOCOL_VERSION}
    for key, value in (fields or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(f"field name '{key}' is reserved by the wire protocol")
        header[key] = value
    items = arrays.items() if isinstance(arrays, Mapping) else (arrays or ())
    specs, buffers = [], []
    for name, arr in items:
        arr = np.asarray(arr)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise ValueError(
                f"array '{name}' has dtype {arr.dtype}; the wire allows {sorted(ALLOWED_DTYPES)}"
            )
        # The wire format is little-endian C order; a no-op (no copy) for native x86/ARM data.
        # (np.asarray, not ascontiguousarray, which turns a 0-d array into 1-d.)
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
        specs.append([name, arr.dtype.name, list(arr.shape)])
        buffers.append(arr.reshape(-1).view(np.uint8).data)
    header["arrays"] = specs
    return [msgpack.packb(header, use_bin_type=True, default=_pack_default), *buffers]


# --- decoding ------------------------------------------------------------------------------


def _as_bytes_view(frame: Any, index: int) -> memoryview:
    """A flat byte view of a frame (bytes, bytearray, memoryview or zmq.Frame), no copy."""
    buf = getattr(frame, "buffer", frame)  # zmq.Frame.buffer is a zero-copy memoryview
    try:
        view = memoryview(buf)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"frame {index} is not a byte buffer ({type(frame).__name__})") from exc


def _unpack_header(view: memoryview, limits: Limits) -> dict:
    if view.nbytes == 0:
        raise ProtocolError("empty header frame")
    n = limits.max_header_bytes
    try:
        header = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,  # the protocol uses no extension types
        )
    except Exception as exc:  # msgpack raises many types (ExtraData, StackError, ...)
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    # strict_map_key still lets bytes keys through; field names are always str.
    if not all(isinstance(k, str) for k in header):
        raise ProtocolError("header keys must all be strings")
    return header


def _check_header(header: dict, expect_types: Iterable[str] | None) -> str:
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or not msg_type:
        raise ProtocolError("header field 'type' must be a non-empty string")
    version = header.get("v")
    if type(version) is not int:
        raise ProtocolError(f"message {msg_type[:64]!r}: header field 'v' must be an int")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})"
        )
    if expect_types is not None and msg_type not in expect_types:
        raise ProtocolError(
            f"unknown message type {msg_type[:64]!r} (expected one of {sorted(expect_types)})"
        )
    return msg_type


def timeline(gen: int, boot) -> dict:
    """The fields naming a timeline of a job: its rollback generation and the top
    coordinator's boot id (None: a sender that has none). A TASK carries them; GRADS and
    FAULT echo them, and a sum of another timeline is late."""
    return {"gen": gen} if boot is None else {"gen": gen, "boot": boot}


def of_timeline(msg: Message, gen: int, boot) -> bool:
    """Whether `msg` belongs to timeline (gen, boot); a sender that names none does."""
    return msg.get("gen", gen) == gen and msg.get("boot", boot) == boot


def sum_names(n: int) -> list[str]:
    """The names a GRADS gives the `n` arrays of a block sum (JobRuntime.sum_layout's
    order): "0", "1", ... then "loss"."""
    return [str(i) for i in range(n - 1)] + ["loss"]


def array_specs(entries, limits: Limits) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """[(name, dtype, shape)] of a header's "arrays" entries ([name, dtype, shape] each),
    every one checked against `limits` (shardgrad/shm.py checks its layouts with it too)."""
    if not isinstance(entries, list):
        raise ProtocolError("header field 'arrays' must be a list of [name, dtype, shape]")
    if len(entries) > limits.max_arrays:
        raise ProtocolError(
            f"{len(entries)} arrays declared, above the limit of {limits.max_arrays}"
        )
    specs, seen = [], set()
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise ProtocolError(f"arrays[{i}] must be [name, dtype, shape]")
        name, dtype, shape = entry
        if name in seen:
            raise ProtocolError(f"array '{name}' is declared twice")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in limits.allowed_dtypes:
            raise ProtocolError(
                f"array '{name}': dtype {dtype!r} is not allowed "
                f"(allowed: {', '.join(sorted(limits.allowed_dtypes))})"
            )
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ProtocolError(f"array '{name}': shape must be a list of non-negative ints")
        if len(shape) > 32:  # numpy's own maximum number of dimensions
            raise ProtocolError(f"array '{name}': {len(shape)} dimensions, at most 32 allowed")
        size = math.prod(shape)  # Python ints: a huge declared shape cannot overflow
        if size > limits.max_array_elements:
            raise ProtocolError(
                f"array '{name}': shape {shape} has {size} elements, "
                f"above the limit of {limits.max_array_elements}"
            )
        specs.append((name, _little_endian(dtype), tuple(shape)))
    return specs


@functools.cache  # (only allowed dtypes get here: a handful of entries, each ~2 µs to build)
def _little_endian(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def decode(
    frames: Sequence[Any],
    limits: Limits = DEFAULT_LIMITS,
    expect_types: Iterable[str] | None = None,
) -> Message:
    """Validate and decode the frames of one message (without routing frames).

    Frames may be bytes-like or zmq.Frame (read with `.buffer`, zero-copy). Raises only
    ProtocolError, with a message naming what is wrong.
    """
    if not isinstance(frames, Sequence) or isinstance(frames, (bytes, bytearray, str)):
        raise ProtocolError(f"expected a list of frames, got {type(frames).__name__}")
    if not frames:
        raise ProtocolError("empty message (no header frame)")
    if len(frames) - 1 > limits.max_arrays:
        raise ProtocolError(f"{len(frames)} frames, above the limit of {limits.max_arrays + 1}")
    views = [_as_bytes_view(f, i) for i, f in enumerate(frames)]
    total = views[0].nbytes  # the header has its own, smaller limit
    if total > limits.max_header_bytes:
        raise ProtocolError(
            f"header is {total} bytes, above the limit of {limits.max_header_bytes}"
        )
    for i, view in enumerate(views[1:], start=1):
        if view.nbytes > limits.max_frame_bytes:
            raise ProtocolError(
                f"frame {i} is {view.nbytes} bytes, above the limit of {limits.max_frame_bytes}"
            )
        total += view.nbytes
    if total > limits.max_message_bytes:
        raise ProtocolError(
            f"message is {total} bytes, above the limit of {limits.max_message_bytes}"
        )

    header = _unpack_header(views[0], limits)
    msg_type = _check_header(header, expect_types)
    specs = array_specs(header.get("arrays", []), limits)
    if len(specs) != len(views) - 1:
        raise ProtocolError(
            f"message {msg_type} declares {len(specs)} arrays but carries "
            f"{len(views) - 1} array frames"
        )
    arrays = {}
    for (name, dtype, shape), view in zip(specs, views[1:], strict=True):
        need = dtype.itemsize * math.prod(shape)
        if view.nbytes != need:
            raise ProtocolError(
                f"array '{name}': dtype {dtype.name} shape {list(shape)} needs {need} bytes, "
                f"frame has {view.nbytes}"
            )
        arr = np.frombuffer(view, dtype=dtype).reshape(shape)
        # Any byte other than 0/1 in a bool array is undefined behaviour for numpy.
        if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
            raise ProtocolError(f"array '{name}': bool values must be bytes 0 or 1")
        arrays[name] = arr
    fields = {k: v for k, v in header.items() if k not in RESERVED_KEYS}
    return Message(msg_type, fields, arrays)


def require(msg: Message, *keys: str) -> tuple:
    """The values of `keys` in msg.fields, in order; ProtocolError naming the first missing.

    >>> job, rnd = require(msg, "job", "round")
    """
    missing = [k for k in keys if k not in msg.fields]
    if missing:
        raise ProtocolError(f"message {msg.type} is missing field '{missing[0]}'")
    return tuple(msg.fields[k] for k in keys)


def field_of(msg: Message, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """msg.fields[key] checked to be an instance of `kind` (bool is never accepted as int)."""
    if key not in msg.fields:
        if default is ...:
            raise ProtocolError(f"message {msg.type} is missing field '{key}'")
        return default
    value = msg.fields[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ProtocolError(
            f"field '{key}' of message {msg.type} must be {names}, got {type(value).__name__}"
        )
    return value


# --- socket helpers ------------------------------------------------------------------------


def send_msg(
    sock,
    msg_type: str,
    fields: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] | None = None,
    identity: bytes | Sequence[bytes] | None = None,
    flags: int = 0,
) -> None:
    """Send one message. `identity` (ROUTER side) is a peer identity or a whole envelope
    (`Message.envelope` / `ProtocolError.envelope`) put in front of the header frame."""
    frames = encode(msg_type, fields, arrays)
    if identity is not None:
        prefix = [identity] if isinstance(identity, (bytes, bytearray)) else list(identity)
        frames = prefix + frames
    # copy=False: arrays go out zero-copy; pyzmq still copies frames under its threshold.
    sock.send_multipart(frames, flags=flags, copy=False)


def reply(
    sock,
    request: Message,
    msg_type: str,
    fields: Mapping[str, Any] | None = None,
    arrays=None,
    flags: int = 0,
) -> None:
    """Answer `request` (received with recv_msg(router=True)) on the same ROUTER socket."""
    send_msg(sock, msg_type, fields, arrays, identity=request.envelope or None, flags=flags)


def recv_msg(
    sock,
    limits: Limits = DEFAULT_LIMITS,
    router: bool = False,
    expect_types: Iterable[str] | None = None,
    flags: int = 0,
    user: bool | None = None,
) -> tuple[bytes | None, Message]:
    """Receive and decode one message: (peer identity or None, Message).

    With router=True the first frame is the peer identity, and an empty delimiter frame
    after it (a REQ peer) is stripped; both are kept in Message.envelope. A ProtocolError
    raised here carries `.identity` and `.envelope` so an ERROR reply can still be sent.
    """
    frames = sock.recv_multipart(flags=flags, copy=False)
    identity, envelope = None, ()
    if router:
        identity = frames[0].bytes
        n_route = 2 if len(frames) > 2 and len(frames[1].buffer) == 0 else 1
        envelope = tuple(f.bytes for f in frames[:n_route])
        frames = frames[n_route:]
    try:
        msg = decode(frames, limits, expect_types)
    except ProtocolError as exc:
        exc.identity, exc.envelope = identity, envelope
        raise
    msg.envelope = envelope
    # Who authenticated (ZAP) matters only to a server; asking costs ~20 µs when nobody did.
    msg.user = _user_id(frames[0]) if (router if user is None else user) and frames else None
    return identity, msg


def _user_id(frame) -> str | None:
    """The ZMQ "User-Id" property of a received frame (copy=False), or None without ZAP."""
    try:
        return frame.get("User-Id")
    except Exception:  # ZMQError EINVAL: no User-Id metadata (no authentication)
        return None


def apply_socket_limits(sock, limits: Limits = DEFAULT_LIMITS, hwm: int = 1000) -> None:
    """Transport-level guards, set before bind/connect: libzmq drops a peer that sends a
    frame above MAXMSGSIZE before it is buffered, and HWMs bound queued messages."""
    import zmq

    sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDHWM, hwm)


def check_grads(msg, layout) -> list[np.ndarray]:
    """The GRADS arrays (gradients in parameter order, BatchNorm statistics, loss last),
    each checked against `layout` = JobRuntime.sum_layout(): [(shape, dtype)]; ProtocolError
    naming the first that does not fit."""
    want = list(layout)
    arrays = []
    for name, (shape, dtype) in zip(sum_names(len(want)), want, strict=True):
        a = msg.arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
            raise ProtocolError(f"GRADS array '{name}': expected {dtype}{list(shape)}, got {got}")
        arrays.append(a)
    return arrays
