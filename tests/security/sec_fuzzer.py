"""A separate process that fires hypothesis-generated and mutated frames at both of the
coordinator's ports (authenticated with valid keys, so the frames reach the decoder and
the handlers rather than stopping at the handshake).

    python sec_fuzzer.py WORKER_ADDR CLIENT_ADDR KEYS_DIR|- EXAMPLES

Prints one JSON line: how many messages it sent to each port and how many replies came.
"""

import json
import sys

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardgrad import wire
from shardgrad.security import peer_security

worker_addr, client_addr, keys, examples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = zmq.Context()


def sock(address, role, identity):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.SNDHWM, 100_000)
    if keys != "-":
        peer_security(keys, role).apply(s)
    s.connect(address)
    return s


ports = {
    "worker": sock(worker_addr, "worker", b"fuzz-w"),
    "client": sock(client_addr, "client", b"fuzz-c"),
}
counts = {"worker": 0, "client": 0, "replies": 0}

ALL_TYPES = sorted(wire.WORKER_TYPES | wire.CLIENT_TYPES | wire.TO_WORKER_TYPES) + ["", "X" * 70]
FIELDS = [
    "worker",
    "job",
    "round",
    "block",
    "blocks",
    "spec",
    "req",
    "since",
    "info",
    "user",
    "gen",
    "micro_batch",
    "error",
    "nonfinite",
    "compute_s",
    "type",
    "v",
    "arrays",
]
NAMES = ["job-000001", "w", "fuzz-w", "builtin:digits", "file:../x.npz", "/dev/zero"]
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.sampled_from(NAMES),
)
key = st.one_of(st.sampled_from(FIELDS), st.text(max_size=6))
value = st.recursive(
    leaf,
    lambda v: st.lists(v, max_size=4) | st.dictionaries(key, v, max_size=4),
    max_leaves=10,
)
header = st.fixed_dictionaries(
    {
        "type": st.sampled_from(ALL_TYPES),
        "v": st.sampled_from(
            [
                wire.PROTOCOL_VERSION,
                wire.PROTOCOL_VERSION,
                wire.PROTOCOL_VERSION,
                0,
                wire.PROTOCOL_VERSION + 1,
                str(wire.PROTOCOL_VERSION),
            ]
        ),
    },
    optional={"arrays": value, **{k: value for k in FIELDS[:12]}},
)
array_frame = st.binary(max_size=256)


def packed(h):
    try:
        return msgpack.packb(h, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return b"\xc1"  # never-used msgpack byte


def mutate(data, flips, cut):
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b[: len(b) - cut % (len(b) + 1)]) if cut else bytes(b)


message = st.one_of(
    st.lists(st.binary(max_size=64), min_size=0, max_size=5),  # raw frames
    st.tuples(header, st.lists(array_frame, max_size=3)).map(lambda t: [packed(t[0]), *t[1]]),
    st.tuples(
        header,
        st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
        st.integers(0, 8),
    ).map(lambda t: [mutate(packed(t[0]), t[1], t[2])]),
)


@settings(
    max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(st.sampled_from(["worker", "client"]), message)
def fire(port, frames):
    if not frames:
        frames = [b""]
    try:
        ports[port].send_multipart(frames, flags=zmq.NOBLOCK)
        counts[port] += 1
    except zmq.Again:
        pass
    for s in ports.values():
        while s.poll(0):
            s.recv_multipart()
            counts["replies"] += 1


fire()
print(json.dumps(counts), flush=True)
