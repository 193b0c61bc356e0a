"""The wire protocol: round trips, zero-copy, and one clear ProtocolError per malformed kind."""

import msgpack
import numpy as np
import pytest
import zmq

from shardgrad import wire
from shardgrad.wire import Limits, ProtocolError, decode, encode

DTYPES = ["float32", "float64", "int64", "int32", "uint8", "bool"]


def header_bytes(**header):
    return msgpack.packb(header, use_bin_type=True)


def valid_header(**extra):
    return {"type": wire.GRADS, "v": wire.PROTOCOL_VERSION, **extra}


def expect_error(frames, match, **kw):
    with pytest.raises(ProtocolError, match=match):
        decode(frames, **kw)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4, 5)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 100).astype(dtype)
    msg = decode(encode(wire.GRADS, {"job": "j1", "round": 7}, {"g": arr}))
    assert msg.type == wire.GRADS
    assert msg.fields == {"job": "j1", "round": 7}
    out = msg.arrays["g"]
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    assert np.array_equal(out, arr)


def test_round_trip_through_zmq_frames_is_zero_copy():
    arr = np.arange(1000, dtype=np.float64).reshape(10, 100)
    frames = [zmq.Frame(f) for f in encode(wire.TASK, {"job": "a"}, [("w", arr)])]
    msg = decode(frames)
    out = msg.arrays["w"]
    assert np.array_equal(out, arr)
    # The decoded array is a view of the frame's own memory: no copy on receive.
    assert np.shares_memory(out, np.frombuffer(frames[1].buffer, dtype=np.uint8))


def test_encode_does_not_copy_contiguous_arrays():
    arr = np.arange(12, dtype=np.float32)
    frames = encode(wire.GRADS, None, {"a": arr})
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), arr)


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly():
    arr = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    big = np.arange(5, dtype=">i8")
    msg = decode(encode(wire.GRADS, None, {"a": arr, "b": big}))
    assert np.array_equal(msg.arrays["a"], arr) and np.array_equal(msg.arrays["b"], big)


def test_array_order_and_fields_are_kept_and_numpy_scalars_become_plain():
    arrays = [(f"p{i}", np.full(i + 1, i, dtype=np.int32)) for i in range(5)]
    msg = decode(encode(wire.GRADS, {"loss": np.float32(0.5), "n": np.int64(3)}, arrays))
    assert list(msg.arrays) == [name for name, _ in arrays]
    assert msg["loss"] == 0.5 and msg.get("n") == 3 and msg.get("nope", 1) == 1
    assert "loss" in msg


def test_encode_rejects_reserved_fields_and_unsupported_dtypes():
    with pytest.raises(ValueError, match="reserved"):
        encode(wire.OK, {"arrays": []})
    with pytest.raises(ValueError, match="dtype"):
        encode(wire.OK, None, {"c": np.zeros(2, dtype=np.complex64)})


def test_message_getitem_and_require():
    msg = decode(encode(wire.READY, {"worker": "w1", "pid": 4}))
    assert wire.require(msg, "worker", "pid") == ("w1", 4)
    with pytest.raises(ProtocolError, match="message READY is missing field 'slots'"):
        wire.require(msg, "worker", "slots")
    with pytest.raises(ProtocolError, match="missing field 'x'"):
        msg["x"]


def test_field_of_checks_types():
    msg = decode(encode(wire.GRADS, {"round": 3, "flag": True, "job": "j"}))
    assert wire.field_of(msg, "round", int) == 3
    assert wire.field_of(msg, "other", int, default=None) is None
    with pytest.raises(ProtocolError, match="field 'flag' of message GRADS must be int, got bool"):
        wire.field_of(msg, "flag", int)
    with pytest.raises(ProtocolError, match="must be int, got str"):
        wire.field_of(msg, "job", int)


def test_type_sets_cover_each_direction():
    assert wire.WORKER_TYPES == {"READY", "HEARTBEAT", "GRADS", "FAULT", "BYE", "RECALL", "STATE"}
    assert wire.CLIENT_TYPES == {"SUBMIT", "STATUS", "JOBS", "CANCEL", "METRICS", "FETCH"}
    assert wire.TO_WORKER_TYPES == {"TASK", "STOP_JOB", "STEPPED", "HEARTBEAT"}
    assert wire.TO_CLIENT_TYPES == {"OK", "ERROR"}


# --- every malformed kind ------------------------------------------------------------------


def good_frames():
    return encode(wire.GRADS, {"job": "j"}, {"w0": np.zeros((3, 4), np.float32)})


def test_truncated_array_frame():
    frames = good_frames()
    frames[1] = bytes(frames[1])[:40]
    expect_error(frames, r"array 'w0': dtype float32 shape \[3, 4\] needs 48 bytes, frame has 40")


def test_truncated_header():
    frames = good_frames()
    frames[0] = frames[0][:-3]
    expect_error(frames, "header is not valid msgpack")


def test_missing_array_frame():
    expect_error(good_frames()[:1], "declares 1 arrays but carries 0 array frames")


def test_extra_frame():
    expect_error(good_frames() + [b"\0" * 4], "declares 1 arrays but carries 2 array frames")


def test_empty_message_and_empty_header():
    expect_error([], "empty message")
    expect_error([b""], "empty header")


def test_not_a_frame_list():
    expect_error(b"abc", "expected a list of frames")
    expect_error([b"\x80", 12], "frame 1 is not a byte buffer")


@pytest.mark.parametrize("dtype", ["object", "complex64", "float16", "<f4", 5, None])
def test_disallowed_dtype(dtype):
    h = header_bytes(**valid_header(arrays=[["w", dtype, [1]]]))
    expect_error([h, b"\0" * 8], "dtype .* is not allowed")


@pytest.mark.parametrize(
    "shape, match",
    [
        ([-1], "non-negative ints"),
        ([1.5], "non-negative ints"),
        ([True], "non-negative ints"),
        ("3", "non-negative ints"),
        ([1] * 40, "dimensions"),
        ([2**31, 2**31], "elements, above the limit"),
        ([2**62, 2**62, 2**62], "elements, above the limit"),
    ],
)
def test_bad_or_huge_declared_shape(shape, match):
    h = header_bytes(**valid_header(arrays=[["w", "float32", shape]]))
    expect_error([h, b""], match)


def test_shape_byte_mismatch_for_each_dtype():
    for dtype in DTYPES:
        h = header_bytes(**valid_header(arrays=[["w", dtype, [2, 3]]]))
        need = np.dtype(dtype).itemsize * 6
        expect_error([h, b"\0" * (need + 1)], f"needs {need} bytes, frame has {need + 1}")


def test_malformed_array_entries():
    for entry in (["w", "float32"], "w", [1, "float32", [1]], ["w", "float32", [1], 4]):
        h = header_bytes(**valid_header(arrays=[entry]))
        expect_error([h, b"\0" * 4], r"arrays\[0\] must be \[name, dtype, shape\]")
    expect_error([header_bytes(**valid_header(arrays="x"))], "'arrays' must be a list")


def test_duplicate_array_names():
    h = header_bytes(**valid_header(arrays=[["w", "uint8", [1]], ["w", "uint8", [1]]]))
    expect_error([h, b"\0", b"\0"], "array 'w' is declared twice")


def test_bool_arrays_must_hold_0_or_1():
    h = header_bytes(**valid_header(arrays=[["m", "bool", [2]]]))
    expect_error([h, b"\x01\x07"], "bool values")


def test_unknown_type_with_expect_types():
    frames = encode("LAUNCH_MISSILES", {"x": 1})
    expect_error(frames, "unknown message type 'LAUNCH_MISSILES'", expect_types=wire.CLIENT_TYPES)
    # Client messages are refused on the worker port and vice versa.
    expect_error(encode(wire.SUBMIT), "unknown message type", expect_types=wire.WORKER_TYPES)
    expect_error(encode(wire.GRADS), "unknown message type", expect_types=wire.CLIENT_TYPES)


@pytest.mark.parametrize("v", [0, wire.PROTOCOL_VERSION - 1, wire.PROTOCOL_VERSION + 1, -1, 2**40])
def test_wrong_version(v):
    expect_error([header_bytes(type="READY", v=v)], f"unsupported protocol version {v}")


@pytest.mark.parametrize(
    "header", [{"type": "READY"}, {"type": "READY", "v": "1"}, {"type": "READY", "v": True}]
)
def test_missing_or_non_int_version(header):
    expect_error([header_bytes(**header)], "'v' must be an int")


@pytest.mark.parametrize("t", [None, 3, "", b"READY"])
def test_bad_type_field(t):
    expect_error(
        [msgpack.packb({"type": t, "v": wire.PROTOCOL_VERSION})],
        "'type' must be a non-empty string",
    )


@pytest.mark.parametrize("garbage", [b"\xc1", b"\xff" * 10, b"hello world", b"\x92\x01"])
def test_garbage_bytes(garbage):
    with pytest.raises(ProtocolError):
        decode([garbage])


@pytest.mark.parametrize("value", [[1, 2], "READY", 7, None, 1.5])
def test_header_not_a_map(value):
    expect_error([msgpack.packb(value)], "header must be a msgpack map")


def test_non_str_keys():
    expect_error(
        [msgpack.packb({1: "x", "type": "READY", "v": wire.PROTOCOL_VERSION})], "not valid msgpack"
    )
    raw = msgpack.packb({b"type": "READY", "v": wire.PROTOCOL_VERSION}, use_bin_type=True)
    expect_error([raw], "header keys must all be strings")


def test_extension_types_and_trailing_data_are_refused():
    ext = msgpack.packb(
        {"type": "READY", "v": wire.PROTOCOL_VERSION, "x": msgpack.ExtType(5, b"abc")}
    )
    expect_error([ext], "not valid msgpack")
    expect_error(
        [header_bytes(type="READY", v=wire.PROTOCOL_VERSION) + b"\x01"], "not valid msgpack"
    )


def test_deeply_nested_header():
    expect_error([b"\x91" * 100_000 + b"\x01"], "not valid msgpack")


def test_limits_frame_message_header_and_array_count():
    small = Limits(max_frame_bytes=16, max_message_bytes=40, max_header_bytes=64, max_arrays=2)
    arr = {"a": np.zeros(5, np.float32)}  # 20 bytes
    expect_error(encode(wire.GRADS, None, arr), "frame 1 is 20 bytes, above", limits=small)
    expect_error(encode(wire.GRADS, {"pad": "x" * 100}), "header is .* above", limits=small)
    three = [(f"a{i}", np.zeros(3, np.uint8)) for i in range(3)]
    expect_error(encode(wire.GRADS, None, three), "4 frames, above the limit", limits=small)
    h = header_bytes(**valid_header(arrays=[[f"a{i}", "uint8", [0]] for i in range(3)]))
    expect_error([h], "3 arrays declared, above the limit of 2", limits=Limits(max_arrays=2))
    two = [(f"a{i}", np.zeros(16, np.uint8)) for i in range(2)]
    limits = Limits(max_frame_bytes=16, max_message_bytes=40)
    expect_error(encode(wire.GRADS, None, two), "message is .* bytes, above", limits=limits)


def test_elements_limit():
    expect_error(
        encode(wire.GRADS, None, {"a": np.zeros(11, np.uint8)}),
        "has 11 elements, above the limit of 10",
        limits=Limits(max_array_elements=10),
    )


# --- sockets -------------------------------------------------------------------------------


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_router_dealer_round_trip_and_error_reply(ctx, tmp_path):
    addr = f"ipc://{tmp_path}/w.sock"
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    wire.apply_socket_limits(router)
    router.bind(addr)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"worker-1")
    dealer.connect(addr)
    for sock in (router, dealer):
        sock.setsockopt(zmq.RCVTIMEO, 5000)

    grads = np.arange(6, dtype=np.float32)
    wire.send_msg(dealer, wire.GRADS, {"job": "j", "round": 1}, {"g": grads})
    ident, msg = wire.recv_msg(router, router=True, expect_types=wire.WORKER_TYPES)
    assert ident == b"worker-1" and msg.envelope == (b"worker-1",)
    assert np.array_equal(msg.arrays["g"], grads)

    wire.send_msg(router, wire.TASK, {"round": 2}, identity=ident)
    none, task = wire.recv_msg(dealer)
    assert none is None and task.type == wire.TASK and task["round"] == 2

    dealer.send_multipart([b"\xff\xfe garbage"])
    with pytest.raises(ProtocolError) as info:
        wire.recv_msg(router, router=True, expect_types=wire.WORKER_TYPES)
    assert info.value.identity == b"worker-1"
    wire.send_msg(router, wire.ERROR, {"error": str(info.value)}, identity=info.value.envelope)
    assert wire.recv_msg(dealer)[1].type == wire.ERROR


def test_router_req_peer_delimiter_is_kept_for_reply(ctx, tmp_path):
    addr = f"ipc://{tmp_path}/c.sock"
    router = ctx.socket(zmq.ROUTER)
    router.bind(addr)
    req = ctx.socket(zmq.REQ)
    req.connect(addr)
    for sock in (router, req):
        sock.setsockopt(zmq.RCVTIMEO, 5000)
    wire.send_msg(req, wire.JOBS)
    ident, msg = wire.recv_msg(router, router=True, expect_types=wire.CLIENT_TYPES)
    assert msg.type == wire.JOBS and msg.envelope == (ident, b"")
    wire.reply(router, msg, wire.OK, {"jobs": []})
    assert wire.recv_msg(req)[1].fields == {"jobs": []}
