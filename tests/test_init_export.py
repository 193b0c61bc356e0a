"""`init` (start from given weights) and export (safetensors, a torch module): the names
and shapes checks, and the PyTorch round trip (outputs equal within float32 tolerance)."""

import copy

import numpy as np
import pytest

from shardgrad.core import from_numpy, no_grad
from shardgrad.export import (
    TORCH_LAYERS,
    expected_names,
    load_safetensors,
    to_safetensors,
    to_torch,
)
from shardgrad.jobspec import parse_spec
from shardgrad.training import JobRuntime, train_local

MLP = {
    "name": "mlp",
    "model": [
        {"type": "linear", "out": 32},
        {"type": "gelu"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 10},
    ],
    "input_shape": [64],
    "optimizer": {"type": "adam", "lr": 0.01},
    "data": {"source": "builtin:digits"},
    "global_batch": 64,
    "micro_batch": 16,
    "rounds": 8,
    "seed": 1,
}


def spec(base=MLP, **kw):
    d = copy.deepcopy(base)
    d.update(kw)
    return parse_spec(d)


def test_init_file_starts_from_those_weights(tmp_path):
    trained, _ = train_local(spec())
    np.savez(tmp_path / "w.npz", **trained)
    rt = JobRuntime(spec(init="file:w.npz"), str(tmp_path))
    rt.load_init()
    assert all(np.array_equal(rt.state_dict()[n], trained[n]) for n in trained)
    # and training goes on from there: not the weights from scratch
    cont, _ = train_local(spec(init="file:w.npz"), str(tmp_path))
    assert not np.array_equal(cont["0.weight"], trained["0.weight"])


def test_init_mismatches_are_each_named(tmp_path):
    trained, _ = train_local(spec(rounds=1))
    bad = dict(trained)
    bad["0.weight"] = np.zeros((16, 64), np.float32)
    del bad["3.bias"]
    bad["9.weight"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError) as e:
        train_local(spec(init="file:bad.npz"), str(tmp_path))
    msg = str(e.value)
    assert "init 'file:bad.npz' does not fit the model" in msg
    assert "'0.weight': float32[16, 64] does not fit the model's float32[32, 64]" in msg
    assert "missing '3.bias' [10]" in msg
    assert "unexpected '9.weight'" in msg


def test_init_errors_outside_the_data_root_and_for_jobs_locally(tmp_path):
    with pytest.raises(ValueError, match="outside the data root|contains '..'"):
        train_local(spec(init="file:../x.npz"), str(tmp_path))
    with pytest.raises(ValueError, match="cannot read the weights file"):
        train_local(spec(init="file:nothing.npz"), str(tmp_path))
    with pytest.raises(ValueError, match="weights live on the coordinator.*init = 'file:w.npz'"):
        train_local(spec(init="job:abc"))


def test_safetensors_round_trip(tmp_path):
    state, _ = train_local(spec(rounds=2))
    path = to_safetensors(spec(), state, str(tmp_path / "m.safetensors"))
    got = load_safetensors(path)
    assert expected_names(spec()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert sorted(got) == sorted(state)  # a safetensors file keeps its names sorted
    assert all(np.array_equal(got[n], state[n]) and got[n].dtype == state[n].dtype for n in state)
    with pytest.raises(ValueError, match="do not fit the spec's model"):
        to_safetensors(spec(), {"0.weight": state["0.weight"]}, str(tmp_path / "x.safetensors"))


def test_every_layer_type_has_a_torch_equivalent():
    from shardgrad.core.nn import LAYERS

    assert set(TORCH_LAYERS) == set(LAYERS)


def _outputs_match(job_spec, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    state, _ = train_local(job_spec)
    rt = JobRuntime(job_spec)
    rt.load_state(state, "trained")
    X = np.asarray(rt.X[rt.holdout_idx if len(rt.holdout_idx) else rt.train_idx])
    rt.model.eval()
    with no_grad():
        ours = rt.model(from_numpy(X)).data
    module = to_torch(job_spec, state)
    with torch.no_grad():
        theirs = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    # and what PyTorch users do: the safetensors file into the same torch.nn.Sequential
    path = to_safetensors(job_spec, state, str(tmp_path / "m.safetensors"))
    module.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(X)).numpy(), ours, rtol=1e-4, atol=1e-5)
    return ours


@pytest.mark.oracle
def test_to_torch_mlp_outputs_equal_shardgrads(tmp_path):
    _outputs_match(spec(eval={"holdout": 0.2}), tmp_path)


@pytest.mark.oracle
def test_init_from_a_torch_state_dict_in_safetensors(tmp_path):
    """A PyTorch user's weights (torch.nn.Sequential of the same layer list, saved with
    safetensors) are a job's starting point."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = to_torch(spec(), JobRuntime(spec()).state_dict())
    for p in module.parameters():
        torch.nn.init.normal_(p)
    save_file(module.state_dict(), str(tmp_path / "torch.safetensors"))
    rt = JobRuntime(spec(init="file:torch.safetensors"), str(tmp_path))
    rt.load_init()
    for name, t in module.state_dict().items():
        assert np.array_equal(rt.state_dict()[name], t.numpy()), name
