"""LR schedulers and gradient clipping against torch: the learning rate at every one of 200
steps equals torch's (exactly: the same float arithmetic), for each kind and for sequences
built from a job spec's `scheduler` tables; clip_grad_norm_ equals torch's within float32
tolerance."""

import json

import numpy as np
import pytest

from shardgrad.core import nn, optim
from shardgrad.core.clip import clip_grad_norm_
from shardgrad.core.tensor import Tensor
from shardgrad.jobspec import parse_spec
from shardgrad.registry import SCHEDULERS, make_scheduler

pytestmark = pytest.mark.oracle
STEPS = 200
LR = 0.1

# one case per kind; the sequences are job-spec tables (steps = each one's length)
CASES = {
    "step": [{"type": "step", "step_size": 30, "gamma": 0.5}],
    "multistep": [{"type": "multistep", "milestones": [20, 70, 71, 150], "gamma": 0.3}],
    "exponential": [{"type": "exponential", "gamma": 0.98}],
    "cosine": [{"type": "cosine", "T_max": 60, "eta_min": 0.001}],  # several periods
    "cosine-no-min": [{"type": "cosine", "T_max": 200}],
    "linear": [{"type": "linear", "start_factor": 0.1, "end_factor": 0.9, "total_iters": 40}],
    "warmup+cosine": [
        {"type": "linear", "start_factor": 0.01, "total_iters": 10, "steps": 10},
        {"type": "cosine", "T_max": 190},
    ],
    "three": [
        {"type": "linear", "start_factor": 0.5, "total_iters": 5, "steps": 25},
        {"type": "step", "step_size": 10, "gamma": 0.7, "steps": 50},
        {"type": "exponential", "gamma": 0.99},
    ],
}

TORCH_CLASSES = {
    "step": "StepLR",
    "multistep": "MultiStepLR",
    "exponential": "ExponentialLR",
    "cosine": "CosineAnnealingLR",
    "linear": "LinearLR",
}


def _tables(case):
    spec = {
        "name": "s",
        "model": [{"type": "linear", "out": 2}],
        "input_shape": [3],
        "optimizer": {"type": "sgd", "lr": LR},
        "data": {"source": "builtin:digits"},
        "global_batch": 8,
        "micro_batch": 8,
        "rounds": 1,
        "scheduler": CASES[case] if len(CASES[case]) > 1 else CASES[case][0],
    }
    return parse_spec(spec).scheduler  # defaults filled in, as the engine sees them


def _torch_sched(torch, opt, tables):
    sch = torch.optim.lr_scheduler
    made = []
    for t in tables:
        args = {k: v for k, v in t.items() if k not in ("type", "steps")}
        made.append(getattr(sch, TORCH_CLASSES[t["type"]])(opt, **args))
    if len(made) == 1:
        return made[0]
    milestones = list(np.cumsum([t["steps"] for t in tables[:-1]]).tolist())
    return sch.SequentialLR(opt, made, milestones)


def _ours(tables):
    p = nn.Parameter(np.zeros(3, np.float32))
    opt = optim.SGD([p], lr=LR)
    return opt, make_scheduler(opt, tables)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lr_equals_torch_every_step(torch, case):
    tables = _tables(case)
    tp = torch.nn.Parameter(torch.zeros(3))
    topt = torch.optim.SGD([tp], lr=LR)
    tsched = _torch_sched(torch, topt, tables)
    opt, sched = _ours(tables)
    for step in range(STEPS):
        want, got = topt.param_groups[0]["lr"], opt.param_groups[0]["lr"]
        assert got == want, f"{case}: step {step}: lr {got!r} != torch's {want!r}"
        assert sched.get_last_lr() == tsched.get_last_lr()
        topt.step()
        tsched.step()
        sched.step()


@pytest.mark.parametrize("case", ["warmup+cosine", "cosine", "three"])
def test_state_dict_resumes_the_same_schedule(case):
    tables = _tables(case)
    opt, sched = _ours(tables)
    for _ in range(87):
        sched.step()
    # what a checkpoint keeps, through JSON as the engine writes it
    state = json.loads(json.dumps(sched.state_dict()))
    lr = opt.param_groups[0]["lr"]
    opt2, sched2 = _ours(tables)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = lr
    for _ in range(STEPS - 87):
        sched.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_every_kind_is_tested():
    assert {t["type"] for c in CASES.values() for t in c} == set(SCHEDULERS)


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
def test_clip_grad_norm_matches_torch(torch, max_norm):
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ours = [nn.Parameter(np.zeros(s, np.float32)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, t, g in zip(ours, theirs, grads, strict=True):
        p.grad = Tensor._wrap(g.copy())
        t.grad = torch.tensor(g.copy())
    norm = clip_grad_norm_(ours, max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(tnorm), rel=1e-6)
    for p, t in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p.grad.data, t.grad.numpy(), rtol=1e-6, atol=1e-7)
