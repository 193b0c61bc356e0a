"""Gradient equivalence of the distributed round, and optimizer trajectories against PyTorch.

1. The mean gradient the coordinator computes in round 1 equals the full-batch gradient of
   the same global batch computed by shardgrad.core in one process. The trick: a job with
   rounds=1 and SGD lr=1.0 without momentum ends at `init - mean_grad`, so
   `mean_grad = init - final` (init from nn.build(model, input_shape, seed)).
2. (oracle) A few rounds of Adam / SGD with momentum / AdamW (+ accumulation) through the
   cluster end where PyTorch ends on the same data, batches and loss.
"""

import importlib.util

import numpy as np
import pytest

from shardgrad.core import nn
from shardgrad.core.tensor import Tensor
from shardgrad.jobspec import parse_spec
from shardgrad.training import JobRuntime

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MLP_TANH = [{"type": "linear", "out": 32}, {"type": "tanh"}, {"type": "linear", "out": 10}]
DIGITS_BASE = {
    "name": "grad-digits",
    "model": MLP_TANH,
    "input_shape": [64],
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 1.0},
    "data": {"source": "builtin:digits"},
    "global_batch": 96,
    "micro_batch": 8,  # 12 micro-batches: a ragged canonical tree
    "rounds": 1,
    "seed": 5,
}
REGRESSION = {
    "name": "grad-synthetic-mse",
    "model": [{"type": "linear", "out": 16}, {"type": "gelu"}, {"type": "linear", "out": 1}],
    "input_shape": [20],
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": 1.0},
    "data": {
        "source": "builtin:synthetic",
        "task": "regression",
        "n_samples": 400,
        "n_features": 20,
        "noise": 0.1,
        "seed": 7,
    },
    "global_batch": 60,
    "micro_batch": 4,  # 15 micro-batches
    "rounds": 1,
    "seed": 2,
}


def _init_state(spec) -> dict[str, np.ndarray]:
    model = nn.build(list(spec.model), list(spec.input_shape), spec.seed)
    return {n: p.data.copy() for n, p in model.named_parameters()}


def _global_indices(rt: JobRuntime, rounds) -> np.ndarray:
    return np.concatenate([rt.sample_indices(r, k) for r in rounds for k in range(rt.n_micro)])


def _full_batch_grad(spec, rounds) -> tuple[dict[str, np.ndarray], float]:
    """One forward/backward over every sample of `rounds` with reduction='mean'."""
    rt = JobRuntime(spec)
    idx = _global_indices(rt, rounds)
    assert len(idx) == len(rounds) * spec.global_batch and len(set(idx.tolist())) == len(idx)
    rt.model.train()
    loss = rt.loss_fn(rt.model(Tensor(rt.X[idx])), Tensor(rt.y[idx]))  # reduction="mean"
    loss.backward()
    return {n: p.grad.data.copy() for n, p in zip(rt.names, rt.params, strict=True)}, loss.item()


CASES = {
    "digits-1-round": (DIGITS_BASE, [0]),
    # two global batches accumulated into one step: the mean over both
    "digits-accumulate-2": (dict(DIGITS_BASE, rounds=2, accumulate_steps=2), [0, 1]),
    "synthetic-mse": (REGRESSION, [0]),
}


def test_round_mean_gradient_equals_full_batch_gradient(make_cluster, svc):
    cluster = make_cluster(workers=3)
    with cluster.client(timeout=10) as c:
        for case, (raw, rounds) in CASES.items():
            spec = parse_spec(raw)
            init = _init_state(spec)
            _, status, final = svc.run_job(c, raw)
            metrics = c.metrics(status["id"])
            assert {m["workers"] for m in metrics} == {3}, (case, metrics)
            want, want_loss = _full_batch_grad(spec, rounds)
            assert sorted(final) == sorted(want) == sorted(init)
            for name in want:
                mean_grad = init[name].astype(np.float64) - final[name].astype(np.float64)
                assert np.abs(want[name]).max() > 0, (case, name, "a trivially zero gradient")
                np.testing.assert_allclose(
                    mean_grad,
                    want[name].astype(np.float64),
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"{case}: mean gradient of {name} (init - final) vs full batch",
                )
            # the reported loss is the same full-batch mean
            assert metrics[-1]["loss"] == pytest.approx(want_loss, rel=1e-5), case


# --- the PyTorch oracle ------------------------------------------------------------------------
ORACLE_JOBS = {
    "adam": dict(DIGITS_BASE, name="oracle-adam", rounds=5, optimizer={"type": "adam", "lr": 0.01}),
    "sgd-momentum": dict(
        DIGITS_BASE,
        name="oracle-sgd-momentum",
        rounds=5,
        optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    ),
    "adamw-accumulate-2": dict(
        DIGITS_BASE,
        name="oracle-adamw-acc2",
        rounds=6,
        accumulate_steps=2,
        optimizer={"type": "adamw", "lr": 0.01, "weight_decay": 0.05},
    ),
}


def _torch_run(spec, init):
    import torch

    layers = []
    in_features = spec.input_shape[0]
    for layer in spec.model:
        if layer["type"] == "linear":
            layers.append(torch.nn.Linear(in_features, layer["out"]))
            in_features = layer["out"]
        else:
            layers.append({"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[layer["type"]]())
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(init[name]))
    hyper = {k: v for k, v in spec.optimizer.items() if k != "type"}
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    opt = kind[spec.optimizer["type"]](model.parameters(), **hyper)
    rt = JobRuntime(spec)
    X, y = torch.from_numpy(np.array(rt.X)), torch.from_numpy(np.array(rt.y))
    A, losses = spec.accumulate_steps, []
    for first in range(0, rt.total_rounds, A):
        group = list(range(first, min(first + A, rt.total_rounds)))
        opt.zero_grad()
        total = 0.0
        for r in group:
            idx = torch.from_numpy(_global_indices(rt, [r]))
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx]) / len(group)
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}, losses


@pytest.mark.oracle
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="the PyTorch oracle needs the oracle extra (pip install -e '.[oracle]')",
)
def test_optimizer_trajectories_match_pytorch(make_cluster, svc):
    import torch

    cluster = make_cluster(workers=2)
    with cluster.client(timeout=10) as c:
        for case, raw in ORACLE_JOBS.items():
            spec = parse_spec(raw)
            init = _init_state(spec)
            _, status, final = svc.run_job(c, raw)
            metrics = c.metrics(status["id"])
            want, want_losses = _torch_run(spec, init)
            for name in want:
                torch.testing.assert_close(
                    torch.from_numpy(final[name]),
                    torch.from_numpy(want[name]),
                    msg=lambda m, name=name, case=case: f"{case}: {name}: {m}",
                )
            got_losses = [m["loss"] for m in metrics if "loss" in m]
            np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, err_msg=case)
