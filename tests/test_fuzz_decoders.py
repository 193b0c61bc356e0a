"""Fuzzing the three untrusted-input decoders (issue 6).

Each target (wire.decode, jobspec.parse_spec, datasets.load_dataset) gets malformed input
from hypothesis and from a fast seeded mutation loop; nothing but its documented error
(ProtocolError / SpecError / DataError) may escape.

Counts per target: the hypothesis tests run the profile's max_examples each (default 300,
HYPOTHESIS_PROFILE=fuzz 10,000); the seeded loops run BULK inputs each (10,000 by default).
The `fuzz`-marked tests (`make fuzz`) run 10,000+ hypothesis examples per test.
"""

import copy
import itertools
import json
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shardgrad import wire
from shardgrad.datasets import DataError, load_dataset
from shardgrad.jobspec import SpecError, parse_spec

BULK = int(os.environ.get("SHARDGRAD_FUZZ_BULK", "10000"))
LONG = settings(max_examples=max(10_000, settings.default.max_examples))
# tmp_path is shared by all examples of a test; each example writes its own file names.
_QUIET = [*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
FIXTURE_OK = settings(suppress_health_check=_QUIET)
LONG_FIXTURE_OK = settings(LONG, suppress_health_check=_QUIET)

# --- strategies ----------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)
)
keys = st.one_of(
    st.sampled_from(
        [
            "type",
            "v",
            "arrays",
            "name",
            "model",
            "optimizer",
            "data",
            "lr",
            "source",
            "out",
            "input_shape",
        ]
    ),
    st.text(max_size=8),
)


def nested(leaves):
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    )


array_entries = st.lists(
    st.one_of(
        st.tuples(
            st.text(max_size=4),
            st.sampled_from(sorted(wire.ALLOWED_DTYPES) + ["object"]),
            st.lists(st.integers(-2, 2**40), max_size=4),
        ).map(list),
        nested(scalars),
    ),
    max_size=4,
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(sorted(wire.WORKER_TYPES | wire.CLIENT_TYPES)) | scalars,
        "v": st.just(wire.PROTOCOL_VERSION) | scalars,
        "arrays": array_entries | nested(scalars),
        "job": nested(scalars),
    },
)
wire_arrays = st.dictionaries(
    st.text(max_size=4),
    hnp.arrays(
        st.sampled_from(sorted(wire.ALLOWED_DTYPES)),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    ),
    max_size=3,
)


def decode_ok(frames, **kw):
    try:
        wire.decode(frames, **kw)
    except wire.ProtocolError:
        pass


def mutate_frames(frames, rng):
    """One random corruption of a valid message: flip, truncate, extend, drop or add."""
    frames = [bytes(f) for f in frames]
    if not frames:
        return [rng.bytes(int(rng.integers(0, 16)))]
    i = int(rng.integers(len(frames)))
    kind = int(rng.integers(6))
    f = bytearray(frames[i])
    if kind == 0 and f:
        for _ in range(int(rng.integers(1, 4))):
            f[int(rng.integers(len(f)))] = int(rng.integers(256))
    elif kind == 1:
        del f[int(rng.integers(len(f) + 1)) :]
    elif kind == 2:
        f += rng.bytes(int(rng.integers(1, 9)))
    elif kind == 3:
        frames.pop(i)
        return frames
    elif kind == 4:
        frames.insert(i, rng.bytes(int(rng.integers(0, 16))))
        return frames
    else:
        f[int(rng.integers(len(f) + 1)) : int(rng.integers(len(f) + 1))] = b""
    frames[i] = bytes(f)
    return frames


def valid_message(rng):
    arrays = {
        f"a{k}": rng.random(int(rng.integers(0, 5))).astype(
            rng.choice(["<f4", "<i8", "u1", "<f8", "<i4", "?"])
        )
        for k in range(int(rng.integers(0, 3)))
    }
    fields = {"job": "j", "round": int(rng.integers(100)), "worker": "w"}
    return wire.encode(str(rng.choice(sorted(wire.WORKER_TYPES))), fields, arrays)


# --- wire.decode ---------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=64), max_size=6))
def test_decode_random_frames(frames):
    decode_ok(frames)


@given(headers, st.lists(st.binary(max_size=32), max_size=4))
def test_decode_random_headers(header, payload):
    try:
        raw = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not representable in msgpack (int above 64 bits)
    decode_ok([raw, *payload], expect_types=wire.WORKER_TYPES)


@given(st.sampled_from(sorted(wire.WORKER_TYPES)), wire_arrays, st.data())
def test_decode_mutated_valid_messages(msg_type, arrays, data):
    frames = wire.encode(msg_type, {"job": "j", "round": 1}, arrays)
    msg = wire.decode(frames)  # the valid message itself decodes
    assert set(msg.arrays) == set(arrays)
    seed = data.draw(st.integers(0, 2**32 - 1))
    decode_ok(mutate_frames(frames, np.random.default_rng(seed)))


def test_decode_bulk_mutations():
    rng = np.random.default_rng(1234)
    for _ in range(BULK):
        frames = valid_message(rng)
        for _ in range(int(rng.integers(1, 3))):
            frames = mutate_frames(frames, rng)
        decode_ok(frames, expect_types=wire.WORKER_TYPES)


@pytest.mark.fuzz
@LONG
@given(st.lists(st.binary(max_size=256), max_size=8), headers, st.integers(0, 2**32 - 1))
def test_decode_long(frames, header, seed):
    decode_ok(frames)
    try:
        decode_ok([msgpack.packb(header, use_bin_type=True), *frames[:3]])
    except (OverflowError, ValueError, TypeError):
        pass
    decode_ok(
        mutate_frames(valid_message(np.random.default_rng(seed)), np.random.default_rng(seed))
    )


# --- jobspec.parse_spec --------------------------------------------------------------------

GOOD = {
    "name": "mlp",
    "model": [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 3}],
    "input_shape": [4],
    "optimizer": {"type": "adam", "lr": 0.01, "betas": [0.9, 0.99]},
    "data": {"source": "builtin:synthetic", "n_features": 4, "n_classes": 3},
    "global_batch": 8,
    "micro_batch": 4,
    "rounds": 3,
    "eval": {"holdout": 0.1},
}
GOOD_TOML = """name = "t"
input_shape = [4]
global_batch = 8
micro_batch = 4
epochs = 1
model = [{type = "linear", out = 3}]
[optimizer]
type = "sgd"
lr = 0.1
momentum = 0.9
[data]
source = "file:d.npz"
"""
SPEC_VALUES = nested(json_scalars) | st.sampled_from(
    [
        0,
        -1,
        1,
        2**63,
        0.5,
        float("nan"),
        "",
        "linear",
        "sgd",
        "builtin:digits",
        "file:../x.npz",
        [1, 2],
        [0.9, 1.0],
        {"type": "linear"},
        {"type": "conv2d", "out": 2, "kernel": 9},
    ]
)


def paths(spec, prefix=()):
    """Every (path of keys / indices) inside a nested spec."""
    yield prefix
    if isinstance(spec, (dict, list)):
        for k, v in spec.items() if isinstance(spec, dict) else enumerate(spec):
            yield from paths(v, prefix + (k,))


ALL_PATHS = list(paths(GOOD))[1:]


def set_path(spec, path, value):
    spec = copy.deepcopy(spec)
    node = spec
    for k in path[:-1]:
        node = node[k]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return spec


def parse_ok(source):
    try:
        parse_spec(source)
    except SpecError:
        pass


@given(st.dictionaries(keys, nested(json_scalars), max_size=8))
def test_parse_random_dicts(d):
    parse_ok(d)


@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), SPEC_VALUES | st.just(...)), max_size=3))
def test_parse_mutated_good_spec(changes):
    spec = GOOD
    for path, value in changes:
        try:
            spec = set_path(spec, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this path
    parse_ok(spec)


@given(st.text(max_size=200), st.sampled_from(["\n", "{", "["]))
def test_parse_random_text(text, lead):
    parse_ok(lead + text)  # the lead makes it text, never a path to open


@given(st.lists(st.tuples(st.integers(0, len(GOOD_TOML)), st.text(max_size=3)), max_size=4))
def test_parse_mutated_toml(edits):
    text = GOOD_TOML
    for pos, s in edits:
        text = text[:pos] + s + text[pos + 1 :]
    parse_ok("\n" + text)
    parse_ok(json.dumps(GOOD)[: len(text) % 200] + text[:5])


def test_parse_bulk_mutations():
    rng = np.random.default_rng(99)
    pool = [
        0,
        -1,
        3,
        2**64,
        1e308,
        float("inf"),
        "",
        "x",
        None,
        True,
        [],
        {},
        [0.9, 0.5],
        {"type": "linear", "out": 2},
        "file:a.npz",
        "builtin:synthetic",
    ]
    for _ in range(BULK):
        spec = GOOD
        for _ in range(int(rng.integers(1, 4))):
            path = ALL_PATHS[int(rng.integers(len(ALL_PATHS)))]
            value = ... if rng.random() < 0.2 else pool[int(rng.integers(len(pool)))]
            try:
                spec = set_path(spec, path, copy.deepcopy(value))
            except (KeyError, IndexError, TypeError):
                pass
        parse_ok(spec)


@pytest.mark.fuzz
@LONG
@given(
    st.dictionaries(keys, nested(json_scalars), max_size=8),
    st.text(max_size=300),
    st.lists(st.tuples(st.sampled_from(ALL_PATHS), SPEC_VALUES), max_size=3),
)
def test_parse_long(d, text, changes):
    parse_ok(d)
    parse_ok("\n" + text)
    spec = GOOD
    for path, value in changes:
        try:
            spec = set_path(spec, path, value)
        except (KeyError, IndexError, TypeError):
            continue
    parse_ok(spec)


# --- datasets.load_dataset -----------------------------------------------------------------

_names = itertools.count()


def load_ok(data_spec, root, **kw):
    try:
        load_dataset(data_spec, root, **kw)
    except DataError:
        pass


def fresh(root, content: bytes) -> str:
    """Write content to a new file name (never reuse one: loads are cached per file)."""
    name = f"f{os.getpid()}_{next(_names)}.npz"
    with open(os.path.join(root, name), "wb") as f:
        f.write(content)
    return name


def npz_bytes(tmp, **arrays) -> bytes:
    path = os.path.join(tmp, f"src{next(_names)}.npz")
    np.savez(path, **arrays)
    with open(path, "rb") as f:
        return f.read()


@FIXTURE_OK
@given(st.binary(max_size=512))
def test_load_random_bytes(tmp_path, content):
    load_ok({"source": f"file:{fresh(tmp_path, content)}"}, str(tmp_path))


@FIXTURE_OK
@given(
    st.dictionaries(
        st.sampled_from(["X", "y", "z"]),
        st.sampled_from(
            [
                np.zeros((3, 2)),
                np.zeros(3),
                np.arange(4),
                np.zeros((3, 2), "U2"),
                np.array([None, 1]),
                np.full((3, 2), np.inf),
                np.zeros((0, 2)),
                np.zeros((3, 1, 1), np.uint8),
                np.ones(3, bool),
                np.zeros(3, "complex64"),
                np.zeros((2, 2), ">f8"),
            ]
        ),
    )
)
def test_load_random_npz_contents(tmp_path, arrays):
    content = npz_bytes(tmp_path, **arrays) if arrays else b"PK\x05\x06" + b"\0" * 18
    load_ok({"source": f"file:{fresh(tmp_path, content)}"}, str(tmp_path))


@FIXTURE_OK
@given(
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 2000),
)
def test_load_mutated_npz(tmp_path, flips, cut):
    content = bytearray(npz_bytes(tmp_path, X=np.ones((4, 3)), y=np.arange(4)))
    for pos, byte in flips:
        content[pos % len(content)] = byte
    load_ok({"source": f"file:{fresh(tmp_path, bytes(content[: max(cut, 1)]))}"}, str(tmp_path))


@FIXTURE_OK
@given(
    st.dictionaries(
        st.sampled_from(
            ["source", "task", "n_samples", "n_features", "n_classes", "noise", "seed"]
        ),
        SPEC_VALUES | st.text(max_size=20),
    )
)
def test_load_random_data_specs(tmp_path, spec):
    if isinstance(spec.get("n_samples"), int) and isinstance(spec.get("n_features"), int):
        spec["n_samples"] = spec["n_samples"] % 100  # keep generated data small
    load_ok(spec, str(tmp_path), max_elements=10_000)


def test_load_bulk_mutations(tmp_path):
    rng = np.random.default_rng(7)
    base = npz_bytes(tmp_path, X=np.ones((4, 3), np.float32), y=np.arange(4))
    for i in range(BULK):
        content = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            content[int(rng.integers(len(content)))] = int(rng.integers(256))
        if rng.random() < 0.3:
            content = content[: int(rng.integers(len(content)))]
        # One file name reused with a changing size/content: exercises the cache key too.
        name = f"bulk{i % 50}.npz"
        with open(tmp_path / name, "wb") as f:
            f.write(content)
        os.utime(tmp_path / name, ns=(i, i))
        load_ok({"source": f"file:{name}"}, str(tmp_path))


@pytest.mark.fuzz
@LONG_FIXTURE_OK
@given(
    st.binary(max_size=2048),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
)
def test_load_long(tmp_path, content, flips):
    load_ok({"source": f"file:{fresh(tmp_path, content)}"}, str(tmp_path))
    good = bytearray(npz_bytes(tmp_path, X=np.ones((4, 3)), y=np.arange(4)))
    for pos, byte in flips:
        good[pos % len(good)] = byte
    load_ok({"source": f"file:{fresh(tmp_path, bytes(good))}"}, str(tmp_path))
