"""BatchNorm in jobs: the one-micro-batch round against torch (gradients, running
statistics), checkpoints that carry the running statistics, the example BatchNorm CNN
reaching >= 97 % held-out accuracy, and its export to torch."""

from pathlib import Path

import numpy as np
import pytest

from shardgrad.core import from_numpy
from shardgrad.engine import RoundEngine, run_local
from shardgrad.export import to_torch
from shardgrad.jobspec import parse_spec
from shardgrad.training import JobRuntime, train_local

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "digits_bn_cnn.toml"


def example(**kw):
    """The example job with changes; a value of None drops the key."""
    d = parse_spec(str(EXAMPLE)).to_dict()
    if "rounds" in kw:
        d.pop("epochs")
    d.update(kw)
    return parse_spec({k: v for k, v in d.items() if v is not None})


def test_example_bn_cnn_reaches_97_percent():
    _, metrics = train_local(example())
    assert metrics[-1]["accuracy"] >= 0.97, metrics[-1]
    assert {"lr", "grad_norm"} <= set(metrics[-1])


@pytest.mark.oracle
def test_one_micro_batch_round_equals_torch():
    """global_batch == micro_batch: the round's BatchNorm batch is torch's batch, so the
    running statistics after the round are torch's after one forward, and the step is
    torch's SGD step on the same gradient."""
    torch = pytest.importorskip("torch")
    spec = example(global_batch=32, micro_batch=32, rounds=1, scheduler=None, clip_grad_norm=None)
    rt = JobRuntime(spec)
    start = rt.state_dict()
    X = np.asarray(rt.X[rt.sample_indices(0, 0)])
    y = np.asarray(rt.y[rt.sample_indices(0, 0)])
    engine = run_local(rt)
    ours = rt.state_dict()

    module = to_torch(spec, start).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(X)), torch.from_numpy(y))
    loss.backward()
    opt.step()
    theirs = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert list(ours) == list(theirs)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert ours["1.num_batches_tracked"] == 1
    assert engine.metrics[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_checkpoint_carries_running_stats_and_resumes_bitwise():
    spec = example(rounds=14, accumulate_steps=3)
    want, _ = train_local(spec)
    rt = JobRuntime(spec)
    engine = RoundEngine(rt)
    for _ in range(8):  # ends inside an accumulation group
        engine.step(rt.block_grad(engine.next_round, 0, rt.n_micro))
    arrays, meta = engine.pack(copy=True)
    assert "buf.1.running_mean" in arrays
    resumed = RoundEngine(JobRuntime(spec))
    resumed.restore(arrays, meta)
    while not resumed.done:
        resumed.step(resumed.rt.block_grad(resumed.next_round, 0, resumed.rt.n_micro))
    got = resumed.rt.state_dict()
    assert list(got) == list(want)
    assert all(np.array_equal(got[n], want[n]) for n in want)


def test_micro_batch_of_one_is_refused_with_the_reason():
    # BatchNorm1d on (N, C): one sample is one value per channel (a 2d one still has H*W)
    model = [{"type": "linear", "out": 8}, {"type": "batchnorm1d"}, {"type": "linear", "out": 10}]
    spec = example(global_batch=4, micro_batch=1, model=model, input_shape=[64])
    with pytest.raises(ValueError, match="more than 1 value per channel.*micro_batch > 1"):
        JobRuntime(spec).micro_batch_grad(0, 0)


def test_block_sums_carry_the_statistics_in_the_declared_layout():
    rt = JobRuntime(example())
    total = rt.block_grad(0, 0, rt.n_micro)
    layout = rt.sum_layout()
    assert [(a.shape, a.dtype) for a in total] == [(tuple(s), d) for s, d in layout]
    assert len(layout) == len(rt.params) + 2 * 2 + 1


@pytest.mark.oracle
def test_to_torch_bn_cnn_outputs_equal_shardgrads():
    torch = pytest.importorskip("torch")
    spec = example(rounds=30)
    state, _ = train_local(spec)
    rt = JobRuntime(spec)
    rt.load_state(state, "trained")
    X = np.asarray(rt.X[rt.holdout_idx])
    rt.model.eval()
    ours = rt.model(from_numpy(X)).data
    with torch.no_grad():
        theirs = to_torch(spec, state)(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (theirs.argmax(1) == ours.argmax(1)).mean() > 0.99


def test_grads_without_the_statistics_are_refused():
    """The coordinator's check of a GRADS follows the runtime's layout: a worker that sends
    gradients but not the BatchNorm statistics (or the wrong dtype) is a bad message."""
    from types import SimpleNamespace

    from shardgrad.wire import ProtocolError, check_grads, sum_names

    rt = JobRuntime(example())
    total = rt.block_grad(0, 0, 2)
    good = dict(zip(sum_names(len(total)), total, strict=True))
    assert len(check_grads(SimpleNamespace(arrays=good), rt.sum_layout())) == len(total)
    k = len(rt.params)
    missing = {n: a for n, a in good.items() if n != str(k)}
    with pytest.raises(ProtocolError, match=f"GRADS array '{k}': expected float64"):
        check_grads(SimpleNamespace(arrays=missing), rt.sum_layout())
    wrong = {**good, str(k): good[str(k)].astype(np.float32)}
    with pytest.raises(ProtocolError, match="got float32"):
        check_grads(SimpleNamespace(arrays=wrong), rt.sum_layout())
