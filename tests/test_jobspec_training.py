"""Job-spec keys of issue 11: scheduler, clip_grad_norm, init. Each mistake is reported
naming the key and what to write instead; a valid spec round-trips through to_dict."""

import copy

import pytest

from shardgrad.jobspec import SpecError, parse_spec

BASE = {
    "name": "t",
    "model": [{"type": "linear", "out": 10}],
    "input_shape": [64],
    "optimizer": {"type": "sgd", "lr": 0.1},
    "data": {"source": "builtin:digits"},
    "global_batch": 8,
    "micro_batch": 8,
    "rounds": 3,
}


def spec(**kw):
    d = copy.deepcopy(BASE)
    d.update(kw)
    return d


def problems(**kw):
    with pytest.raises(SpecError) as e:
        parse_spec(spec(**kw))
    return str(e.value)


def test_one_table_and_sequence_with_defaults_round_trip():
    one = parse_spec(spec(scheduler={"type": "cosine", "T_max": 10}))
    assert one.scheduler == ({"type": "cosine", "T_max": 10, "eta_min": 0.0},)
    seq = parse_spec(
        spec(
            scheduler=[
                {"type": "linear", "steps": 5, "total_iters": 5},
                {"type": "step", "step_size": 3},
            ],
            clip_grad_norm=1,
            init="file:w.npz",
        )
    )
    assert seq.scheduler[0] == {
        "type": "linear", "steps": 5, "start_factor": 1 / 3, "end_factor": 1.0, "total_iters": 5
    }  # fmt: skip
    assert seq.clip_grad_norm == 1.0 and seq.init == "file:w.npz"
    assert parse_spec(seq.to_dict()) == seq
    assert "scheduler" not in parse_spec(spec()).to_dict()  # unset keys stay out


def test_toml_array_of_tables():
    text = """
name = "t"
model = [{type = "linear", out = 10}]
input_shape = [64]
global_batch = 8
micro_batch = 8
rounds = 3
clip_grad_norm = 1.0
optimizer = {type = "sgd", lr = 0.1}
data = {source = "builtin:digits"}
[[scheduler]]
type = "linear"
start_factor = 0.01
total_iters = 100
steps = 100
[[scheduler]]
type = "cosine"
T_max = 900
"""
    s = parse_spec(text)
    assert [t["type"] for t in s.scheduler] == ["linear", "cosine"]


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"scheduler": {"type": "cosin", "T_max": 3}}, "scheduler.type: expected one of"),
        ({"scheduler": {"type": "cosine"}}, "scheduler.T_max: missing (required for 'cosine')"),
        ({"scheduler": {"type": "step", "step_size": 0}}, "step_size: expected an integer >= 1"),
        ({"scheduler": {"type": "step", "step_size": 2, "gama": 0.5}}, "did you mean 'gamma'"),
        ({"scheduler": {"type": "multistep", "milestones": [5, 3]}}, "increasing integers"),
        ({"scheduler": {"type": "linear", "start_factor": 0}}, "expected a number in (0, 1]"),
        ({"scheduler": {"type": "exponential", "gamma": 0.9, "steps": 3}}, "remove 'steps'"),
        ({"scheduler": [{"type": "exponential", "gamma": 0.9}, {"type": "cosine", "T_max": 3}]},
         "scheduler[0].steps: missing"),
        ({"scheduler": "cosine"}, "scheduler: expected a table [scheduler] or an array"),
        ({"clip_grad_norm": 0}, "clip_grad_norm: expected a number > 0"),
        ({"clip_grad_norm": True}, "clip_grad_norm: expected a number > 0"),
        ({"init": "weights.npz"}, "init: expected 'file:PATH.npz' or 'file:PATH.safetensors'"),
        ({"init": "file:w.pt"}, "init: expected"),
        ({"init": "job:"}, "init: expected"),
    ],
)  # fmt: skip
def test_mistakes_name_the_key_and_the_fix(kw, needle):
    assert needle in problems(**kw)
