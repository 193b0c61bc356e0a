"""What a lease the coordinator follows sends it (STATE) is checked before it is taken, as a
GRADS is: every array named, shaped and typed as the coordinator's own engine's, finite;
the meta shaped as its own; one metrics row of numbers per round (coordinator/workers.py
state_of). What passes is the member's state, bit for bit."""

import numpy as np
import pytest

from shardgrad import wire
from shardgrad.coordinator.workers import state_of
from shardgrad.engine import RoundEngine, weights_digest
from shardgrad.jobspec import parse_spec
from shardgrad.training import JobRuntime

SPEC = {
    "name": "follow-state",
    "model": [
        {"type": "linear", "out": 16},
        {"type": "batchnorm1d"},
        {"type": "relu"},
        {"type": "linear", "out": 10},
    ],
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "adam", "lr": 0.01},
    "scheduler": {"type": "step", "step_size": 2, "gamma": 0.5},
    "data": {"source": "builtin:digits"},
    "global_batch": 32,
    "micro_batch": 8,
    "accumulate_steps": 2,
    "epochs": 1,
    "seed": 3,
    "verify": 0.0,
}


def _engine(rounds: int) -> tuple[RoundEngine, list]:
    rt = JobRuntime(parse_spec(SPEC), None)
    engine, rows = RoundEngine(rt), []
    for r in range(rounds):
        rows.append(engine.step(rt.block_grad(r, 0, rt.n_micro)))
    return engine, rows


@pytest.fixture(scope="module")
def member():
    return _engine(3)  # (round 2 opened an accumulation group: its sum is in the state)


def _msg(member, change=None):
    engine, rows = member
    arrays, meta = engine.pack(copy=True)
    meta["metrics"] = []
    fields = {"worker": "w", "job": "j", "lease": 1, "round": engine.next_round,
              "rows": [dict(r) for r in rows], "state": meta}  # fmt: skip
    if change is not None:
        change(fields, arrays)
    frames = wire.encode(wire.STATE, fields, [(f"state.{k}", a) for k, a in arrays.items()])
    return wire.decode(frames, expect_types=wire.WORKER_TYPES)


def test_a_good_state_is_taken_bit_for_bit(member):
    ours, _ = _engine(0)
    arrays, meta, rows = state_of(_msg(member), ours, 0, 16)
    ours.restore(arrays, {**meta, "metrics": []})
    theirs = member[0]
    assert ours.next_round == theirs.next_round == 3 and [r["round"] for r in rows] == [0, 1, 2]
    assert weights_digest(ours.pack()[0]) == weights_digest(theirs.pack()[0])
    assert ours.opt.param_groups[0]["lr"] == theirs.opt.param_groups[0]["lr"]


def _set(key, value):
    return lambda fields, arrays: arrays.__setitem__(key, value)


def _meta(path, value):
    def change(fields, arrays):
        d = fields["state"]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "change, says",
    [
        (_set("w0", np.zeros((3, 3), np.float32)), "array 'w0'"),
        (_set("w0x", np.zeros(3, np.float32)), "not the model's state"),
        (lambda f, a: a.pop("w1"), "not the model's state"),
        (lambda f, a: a.pop("acc0"), "not the model's state"),
        (lambda f, a: a.__setitem__("w0", np.full_like(a["w0"], np.nan)), "NaN/Inf"),
        (lambda f, a: a.__setitem__("w0", a["w0"].astype(np.float64)), "array 'w0'"),
        (_meta(["round"], 4), "meta"),
        (_meta(["opt_scalars", "9.step"], 1), "no such parameter"),
        (_meta(["opt_scalars", "0.step"], 1.5), "not a count"),
        (_meta(["opt_scalars", "0.step"], -1), "not a count"),
        (lambda f, a: a.pop("opt0.exp_avg"), "optimizer state of parameter 0"),
        # an array where a count belongs, and the other way round: same names, wrong kinds
        (
            lambda f, a: (
                a.__setitem__("opt0.step", np.zeros_like(a["w0"])),
                f["state"]["opt_scalars"].pop("0.step"),
            ),
            "parameter 0",
        ),  # fmt: skip
        (
            lambda f, a: (
                a.pop("opt0.exp_avg"),
                f["state"]["opt_scalars"].__setitem__("0.exp_avg", 3),
            ),
            "parameter 0",
        ),  # fmt: skip
        (_meta(["lr"], float("nan")), "meta"),
        (lambda f, a: f["state"]["sched"].__setitem__("base_lrs", [float("inf")]), "meta"),
        (lambda f, a: f["rows"][0].__setitem__("round", 0.0), "row 0"),
        (lambda f, a: f["rows"][2].__setitem__("loss", float("nan")), "row 2"),
        (_meta(["sched"], "x"), "meta"),
        (_meta(["lr"], "0.01"), "meta"),
        (_meta(["extra"], 1), "meta"),
        (lambda f, a: f["rows"].pop(), "expected 3 rows"),
        (lambda f, a: f["rows"][1].__setitem__("loss", "x"), "row 1"),
        (lambda f, a: f["rows"][0].__setitem__("round", 5), "row 0"),
        (lambda f, a: f.__setitem__("round", 40), "we expect one in 1..16"),
        (lambda f, a: f.__setitem__("rows", "x"), "rows"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_naming_why(member, change, says):
    ours, _ = _engine(0)
    with pytest.raises(wire.ProtocolError, match=says.replace("(", r"\(")):
        state_of(_msg(member, change), ours, 0, 16)
    assert ours.next_round == 0


def test_a_map_with_bytes_keys_is_refused_not_raised(member):
    """msgpack lets bytes keys through in nested maps: they are refused like any misfit."""
    ours, _ = _engine(0)
    msg = _msg(member, _meta(["opt_scalars", b"0.step"], 1))
    with pytest.raises(wire.ProtocolError):
        state_of(msg, ours, 0, 16)


def test_rows_past_an_epochs_end_are_refused():
    """The coordinator evaluates at an epoch's end on the state it takes: a state must come
    there, not later."""
    spec_rounds = JobRuntime(parse_spec(SPEC), None).steps_per_epoch
    member = _engine(spec_rounds + 1)
    engine, rows = member
    ours, _ = _engine(spec_rounds - 1)
    msg = _msg((engine, rows[spec_rounds - 1 :]))
    with pytest.raises(wire.ProtocolError, match="ends an epoch"):
        state_of(msg, ours, spec_rounds - 1, spec_rounds + 4)
