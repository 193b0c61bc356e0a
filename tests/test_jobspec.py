"""Job spec parsing: every bad key gets its own clear message, good specs round-trip."""

import copy
import json

import pytest

from shardgrad.jobspec import JobSpec, SpecError, SpecLimits, parse_spec

GOOD_TOML = """
name = "digits-mlp"
input_shape = [64]
loss = "cross_entropy"
global_batch = 128
micro_batch = 32
epochs = 3
seed = 7
model = [
  {type = "linear", out = 32},
  {type = "relu"},
  {type = "dropout", p = 0.1},
  {type = "linear", out = 10},
]

[optimizer]
type = "sgd"
lr = 0.1
momentum = 0.9

[data]
source = "builtin:digits"

[eval]
holdout = 0.25
"""

GOOD = {
    "name": "mlp",
    "model": [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": 3}],
    "input_shape": [8],
    "optimizer": {"type": "adam", "lr": 0.01},
    "data": {"source": "builtin:synthetic", "n_features": 8, "n_classes": 3},
    "global_batch": 64,
    "micro_batch": 16,
    "rounds": 10,
}


def problems_of(spec, **limits):
    with pytest.raises(SpecError) as info:
        parse_spec(spec, SpecLimits(**limits)) if limits else parse_spec(spec)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def with_(**changes):
    spec = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is ...:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def test_good_toml_text_file_and_json(tmp_path):
    spec = parse_spec(GOOD_TOML)
    assert spec.name == "digits-mlp" and spec.input_shape == (64,) and spec.epochs == 3
    assert spec.rounds is None and spec.n_micro_batches == 4 and spec.task == "classification"
    assert spec.optimizer == {
        "type": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
    }
    assert spec.eval == {"holdout": 0.25, "metric": "accuracy"}
    path = tmp_path / "job.toml"
    path.write_text(GOOD_TOML)
    assert parse_spec(path) == spec == parse_spec(str(path))
    jpath = tmp_path / "job.json"
    jpath.write_text(json.dumps(spec.to_dict()))
    assert parse_spec(jpath) == spec == parse_spec(json.dumps(spec.to_dict()))


def test_defaults_and_dict_round_trip():
    spec = parse_spec(GOOD)
    assert (spec.loss, spec.accumulate_steps, spec.seed, spec.min_workers) == (
        "cross_entropy",
        1,
        0,
        1,
    )
    assert spec.checkpoint_every == 10 and spec.eval == {"holdout": 0.2, "metric": "accuracy"}
    assert spec.optimizer["betas"] == [0.9, 0.999] and spec.optimizer["eps"] == 1e-8
    assert spec.data["n_samples"] == 1000 and spec.data["task"] == "classification"
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain data: JSON / msgpack safe
    assert JobSpec.from_dict(d) == spec
    d["optimizer"]["betas"][0] = 0.5  # to_dict is a copy
    assert spec.optimizer["betas"] == [0.9, 0.999]
    assert spec.placement == "auto" and "placement" not in d  # older specs keep their dicts
    pinned = parse_spec({**GOOD, "placement": "workers"})
    assert pinned.to_dict()["placement"] == "workers"
    assert JobSpec.from_dict(pinned.to_dict()) == pinned


def test_mse_regression_defaults_metric_to_mse():
    spec = parse_spec(
        with_(
            loss="mse",
            data={"source": "builtin:synthetic", "task": "regression"},
            model=[{"type": "linear", "out": 1}],
        )
    )
    assert spec.eval["metric"] == "mse" and spec.task == "regression"


def test_all_layer_types_accepted():
    model = [
        {"type": "conv2d", "out": 4, "kernel": 3, "stride": 1, "padding": 1, "bias": False},
        {"type": "maxpool2d", "kernel": 2},
        {"type": "avgpool2d", "kernel": 2, "stride": 2},
        {"type": "gelu"},
        {"type": "tanh"},
        {"type": "sigmoid"},
        {"type": "flatten"},
        {"type": "layernorm", "eps": 1e-5},
        {"type": "linear", "out": 10, "bias": True},
        {"type": "dropout"},
    ]
    spec = parse_spec(with_(model=model, input_shape=[1, 8, 8], data={"source": "file:d.npz"}))
    assert len(spec.model) == len(model)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"optimiser": {}}, "unknown key 'optimiser' (did you mean 'optimizer'?)"),
        ({"name": ...}, "name: missing (required)"),
        ({"name": ""}, "name: expected a non-empty string"),
        ({"model": ...}, "model: missing (required)"),
        ({"model": []}, "model: expected a non-empty list of layer tables, got []"),
        ({"model": [3]}, "model[0]: expected a layer table"),
        ({"model": [{"type": "os.system"}]}, "model[0].type: expected one of linear, conv2d"),
        ({"model": [{"type": "linear"}]}, "model[0] (linear): missing required key 'out'"),
        ({"model": [{"type": "linear", "out": 0}]}, "model[0].out: expected an integer >= 1"),
        (
            {"model": [{"type": "linear", "out": 2, "bais": 1}]},
            "unknown key 'model[0].bais' (did you mean 'bias'?)",
        ),
        ({"model": [{"type": "linear", "out": 2, "bias": 1}]}, "model[0].bias: expected true"),
        ({"model": [{"type": "dropout", "p": 1.0}]}, "model[0].p: expected a probability"),
        ({"model": [{"type": "layernorm", "eps": 0}]}, "model[0].eps: expected a number > 0"),
        ({"input_shape": [0]}, "input_shape: expected a list of 1 to 8 positive integers"),
        ({"input_shape": 64}, "input_shape: expected a list"),
        ({"loss": "hinge"}, "loss: expected one of 'cross_entropy', 'mse', 'nll'"),
        ({"loss": "mse"}, "loss: 'mse' does not fit classification data"),
        ({"optimizer": "sgd"}, "optimizer: expected a table, got 'sgd'"),
        ({"optimizer": {"type": "rmsprop", "lr": 1}}, "optimizer.type: expected one of 'sgd'"),
        ({"optimizer": {"type": "sgd"}}, "optimizer.lr: missing"),
        ({"optimizer": {"type": "sgd", "lr": 0}}, "optimizer.lr: expected a number > 0, got 0"),
        ({"optimizer": {"type": "sgd", "lr": float("nan")}}, "optimizer.lr: expected a number"),
        ({"optimizer": {"type": "sgd", "lr": True}}, "optimizer.lr: expected a number > 0"),
        (
            {"optimizer": {"type": "sgd", "lr": 1, "momentun": 0.9}},
            "unknown key 'optimizer.momentun' (did you mean 'momentum'?)",
        ),
        (
            {"optimizer": {"type": "sgd", "lr": 1, "betas": [0.9, 0.9]}},
            "unknown key 'optimizer.betas'",
        ),
        (
            {"optimizer": {"type": "sgd", "lr": 1, "momentum": -1}},
            "optimizer.momentum: expected a number >= 0",
        ),
        (
            {"optimizer": {"type": "sgd", "lr": 1, "nesterov": True}},
            "optimizer.nesterov: needs momentum > 0 and dampening = 0",
        ),
        (
            {"optimizer": {"type": "sgd", "lr": 1, "nesterov": "yes"}},
            "optimizer.nesterov: expected true or false",
        ),
        (
            {"optimizer": {"type": "adam", "lr": 1, "betas": [0.9, 1.0]}},
            "optimizer.betas: expected two numbers in [0, 1)",
        ),
        ({"optimizer": {"type": "adam", "lr": 1, "betas": [0.9]}}, "optimizer.betas: expected"),
        ({"optimizer": {"type": "adamw", "lr": 1, "eps": 0}}, "optimizer.eps: expected a number"),
        (
            {"optimizer": {"type": "adam", "lr": 1, "momentum": 0.9}},
            "unknown key 'optimizer.momentum'",
        ),
        ({"data": ...}, "data: missing (required)"),
        ({"data": {"source": "http://x/y.npz"}}, "data.source: expected one of 'builtin:digits'"),
        ({"data": {"source": "file:data.csv"}}, "data.source: expected 'file:PATH.npz'"),
        ({"data": {"source": "builtin:digits", "n_samples": 3}}, "unknown key 'data.n_samples'"),
        ({"data": {"source": "builtin:synthetic", "task": "ranking"}}, "data.task: expected one"),
        ({"data": {"source": "builtin:synthetic", "n_samples": 0}}, "data.n_samples: expected"),
        ({"data": {"source": "builtin:synthetic", "n_classes": 1}}, "data.n_classes: expected"),
        ({"data": {"source": "builtin:synthetic", "noise": -1}}, "data.noise: expected"),
        (
            {"data": {"source": "builtin:synthetic", "n_samples": 10**6, "n_features": 10**6}},
            "data: expected n_samples * n_features <= ",
        ),
        (
            {"data": {"source": "builtin:synthetic", "n_sample": 5}},
            "unknown key 'data.n_sample' (did you mean 'n_samples'?)",
        ),
        ({"global_batch": ...}, "global_batch: missing (required)"),
        ({"global_batch": 0}, "global_batch: expected an integer >= 1"),
        ({"global_batch": 64.0}, "global_batch: expected an integer >= 1"),
        ({"micro_batch": 24}, "micro_batch: 24 does not divide global_batch 64"),
        ({"accumulate_steps": 0}, "accumulate_steps: expected an integer >= 1"),
        ({"rounds": ...}, "epochs / rounds: set exactly one of them"),
        ({"epochs": 2}, "epochs / rounds: set exactly one of them"),
        ({"rounds": -3}, "rounds: expected an integer >= 1"),
        ({"seed": -1}, "seed: expected an integer >= 0"),
        ({"seed": 2**64}, "seed: expected an integer >= 0"),
        ({"min_workers": 0}, "min_workers: expected an integer >= 1"),
        ({"checkpoint_every": "often"}, "checkpoint_every: expected an integer >= 1"),
        ({"eval": 0.2}, "eval: expected a table"),
        ({"eval": {"holdout": 1.0}}, "eval.holdout: expected a number in [0, 1)"),
        ({"eval": {"metric": "f1"}}, "eval.metric: expected one of 'accuracy', 'mse'"),
        ({"eval": {"metric": "mse"}}, "eval.metric: 'mse' does not fit loss 'cross_entropy'"),
        ({"eval": {"holdot": 0.1}}, "unknown key 'eval.holdot' (did you mean 'holdout'?)"),
        ({"__import__": "os"}, "unknown key '__import__'"),
        ({"placement": "coordinator"}, "placement: expected one of 'auto', 'workers'"),
    ],
)
def test_each_bad_key_gets_its_message(changes, expected):
    problems = problems_of(with_(**changes))
    assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_are_reported_together():
    problems = problems_of(with_(name=..., loss="hinge", seed=-1, optimiser={}))
    assert len(problems) == 4


def test_unknown_non_str_keys_from_a_dict():
    assert "unknown key '1'" in problems_of({**GOOD, 1: 2})[0]


def test_layer_and_parameter_limits():
    many = [{"type": "relu"}] * 300
    assert problems_of(with_(model=many)) == ["model: expected at most 256 layers, got 300"]
    huge = [{"type": "linear", "out": 10**6}, {"type": "linear", "out": 10**6}]
    assert problems_of(with_(model=huge))[0].startswith("model: expected at most 50000000 param")
    conv = [
        {"type": "conv2d", "out": 64, "kernel": 3},
        {"type": "flatten"},
        {"type": "linear", "out": 1000},
    ]
    spec = with_(model=conv, input_shape=[3, 32, 32], data={"source": "file:a.npz"})
    assert "parameters" in problems_of(spec, max_params=1000)[0]


def test_spec_size_limit(tmp_path):
    text = GOOD_TOML + "\n" + "# padding\n" * 200
    assert "larger than 1000 bytes" in problems_of(text, max_spec_bytes=1000)[0]
    path = tmp_path / "big.toml"
    path.write_text(text)
    assert "larger than 1000 bytes" in problems_of(path, max_spec_bytes=1000)[0]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("name = \n", "spec is not valid TOML"),
        ('{"name": ', "spec is not valid JSON"),
        ("[1, 2]\n=", "spec is not valid TOML"),
        ("[" * 50_000, "spec is not valid TOML"),
        ("{" + '"a": {' * 50_000, "spec is not valid JSON"),
        ("no/such/file.toml", "cannot read spec file 'no/such/file.toml'"),
        (b"\xff\xfe", "spec text is not valid UTF-8"),
        (12, "a spec must be a dict"),
    ],
)
def test_unreadable_sources(source, expected):
    assert problems_of(source)[0].startswith(expected)


def test_json_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert problems_of(path) == ["a spec must be a table/object, got list"]


def test_structural_errors_come_from_nn_build():
    model = [{"type": "conv2d", "out": 2, "kernel": 3}, {"type": "linear", "out": 3}]
    spec = with_(model=model, input_shape=[1, 8, 8], data={"source": "file:d.npz"})
    (problem,) = problems_of(spec)
    assert problem.startswith("model: layer 1 (linear): ")
    big_kernel = [{"type": "conv2d", "out": 2, "kernel": 9}, {"type": "flatten"}]
    spec = with_(model=big_kernel, input_shape=[1, 8, 8], data={"source": "file:d.npz"})
    assert problems_of(spec)[0].startswith("model: layer 0 (conv2d): kernel 9 does not fit")


def test_network_specs_never_name_a_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(GOOD_TOML)
    assert parse_spec(str(path)).name  # from a local caller: a path is read
    with pytest.raises(SpecError, match="never opens a file"):
        parse_spec(str(path), files=False)  # from a message: refused, the file is not opened
    assert parse_spec(GOOD_TOML, files=False).name  # text is fine


@pytest.mark.parametrize(
    "global_batch, micro_batch", [(1024, 128), (512, 64), (256, 64), (128, 64), (64, 64), (96, 96)]
)
def test_micro_batch_defaults_from_the_batch(global_batch, micro_batch):
    raw = {k: v for k, v in GOOD.items() if k != "micro_batch"}
    spec = parse_spec({**raw, "global_batch": global_batch})
    assert spec.micro_batch == micro_batch
    assert spec.to_dict()["micro_batch"] == micro_batch  # pinned in the stored spec
