"""Stacked micro-batches: `JobRuntime.block_grad` runs several micro-batches as one
forward/backward over (k, m, ...) arrays. The determinism contract holds only if a
micro-batch's gradient bits do not depend on k or on its place in the stack, so:

* block_grad over [0, n) equals, bit for bit, the canonical tree completed from any split
  into aligned blocks computed separately (sizes 1, 2, 4, 8), and from any chunk size;
* it matches the old one-micro-batch-at-a-time path within float tolerance;
* dropout masks still come from each micro-batch's own stream.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgrad import training, wire
from shardgrad.core import functional as F
from shardgrad.core import nn, ops
from shardgrad.core.sampling import aligned_blocks, tree_sum
from shardgrad.core.tensor import Tensor
from shardgrad.jobspec import parse_spec
from shardgrad.shm import GradsReader, GradsRing
from shardgrad.training import JobRuntime

LIN = {"type": "linear", "out": 6}

# name -> (layers, input shape, loss, data maker(rng, n) -> (X, y))
MODELS = {
    "mlp-relu-ce": (
        [LIN, {"type": "relu"}, {"type": "linear", "out": 5}],
        [12],
        "cross_entropy",
        lambda r, n: (_x(r, n, 12), r.integers(0, 5, n)),
    ),
    "mlp-tanh-dropout-nll": (
        [LIN, {"type": "tanh"}, {"type": "dropout", "p": 0.3}, {"type": "linear", "out": 4}],
        [12],
        "nll",
        lambda r, n: (_x(r, n, 12), r.integers(0, 4, n)),
    ),
    "mlp-gelu-dropout-mse": (
        [LIN, {"type": "gelu"}, {"type": "dropout", "p": 0.5}, {"type": "linear", "out": 3}],
        [12],
        "mse",
        lambda r, n: (_x(r, n, 12), _x(r, n, 3)),
    ),
    "mlp-sigmoid-bce": (
        [LIN, {"type": "sigmoid"}, {"type": "linear", "out": 1}],
        [12],
        "bce_with_logits",
        lambda r, n: (_x(r, n, 12), r.integers(0, 2, (n, 1)).astype(np.float32)),
    ),
    "cnn-maxpool": (
        [
            {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel": 2},
            {"type": "conv2d", "out": 3, "kernel": 2, "stride": 2, "bias": False},
            {"type": "flatten"},
            {"type": "linear", "out": 5},
        ],
        [2, 8, 8],
        "cross_entropy",
        lambda r, n: (_x(r, n, 2, 8, 8), r.integers(0, 5, n)),
    ),
    "cnn-avgpool-layernorm": (
        [
            {"type": "conv2d", "out": 3, "kernel": 3},
            {"type": "tanh"},
            {"type": "avgpool2d", "kernel": 2, "stride": 1},
            {"type": "flatten"},
            {"type": "layernorm"},
            {"type": "linear", "out": 4},
        ],
        [1, 7, 7],
        "cross_entropy",
        lambda r, n: (_x(r, n, 1, 7, 7), r.integers(0, 4, n)),
    ),
    "embedding-layernorm": (
        [
            {"type": "embedding", "num": 20, "dim": 4},
            {"type": "layernorm"},
            {"type": "flatten"},
            {"type": "linear", "out": 3},
        ],
        [6],
        "cross_entropy",
        lambda r, n: (r.integers(0, 20, (n, 6)), r.integers(0, 3, n)),
    ),
}


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _runtime(tmp_path, name, n_micro, micro_batch):
    layers, shape, loss, make = MODELS[name]
    n = 3 * n_micro * micro_batch  # three rounds of data
    X, y = make(np.random.default_rng(len(name)), n)
    np.savez(tmp_path / "data.npz", X=X, y=y)
    spec = parse_spec(
        {
            "name": "stacked",
            "model": layers,
            "input_shape": shape,
            "loss": loss,
            "optimizer": {"type": "sgd", "lr": 0.1},
            "data": {"source": "file:data.npz"},
            "global_batch": n_micro * micro_batch,
            "micro_batch": micro_batch,
            "rounds": 2,
            "seed": 3,
        }
    )
    return JobRuntime(spec, data_root=str(tmp_path))


def _same_bits(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(a, b, strict=True)
    )


CASES = [
    (name, n_micro, mb)
    for name in MODELS
    for n_micro, mb in ((12, 3), (5, 4))
    if not (name.startswith("cnn") and n_micro == 5 and mb == 4)
] + [("mlp-relu-ce", 3, 1), ("cnn-maxpool", 9, 2)]


@pytest.mark.parametrize(("name", "n_micro", "mb"), CASES)
def test_block_bits_do_not_depend_on_the_split(tmp_path, name, n_micro, mb):
    rt = _runtime(tmp_path, name, n_micro, mb)
    assert rt.stacked, "every registered layer and loss has a stacked form"
    for rnd in (0, 1):
        whole = rt.block_grad(rnd, 0, n_micro)
        for size in (1, 2, 4, 8):
            known = {blk: rt.block_grad(rnd, *blk) for blk in aligned_blocks(n_micro, size)}
            assert _same_bits(tree_sum(None, 0, n_micro, known), whole), (rnd, size)
        singles = tree_sum(lambda i, r=rnd: rt.micro_batch_grad(r, i), 0, n_micro)
        assert _same_bits(singles, whole), rnd


@pytest.mark.parametrize("name", ["mlp-tanh-dropout-nll", "cnn-maxpool", "embedding-layernorm"])
@pytest.mark.parametrize("stack_max", [1, 3, 5])
def test_chunking_does_not_change_bits(tmp_path, monkeypatch, name, stack_max):
    rt = _runtime(tmp_path, name, 12, 3)
    whole = rt.block_grad(0, 0, 12)
    assert rt.stack_size() == 16
    monkeypatch.setattr(rt, "stack_size", lambda: stack_max)
    assert _same_bits(rt.block_grad(0, 0, 12), whole)
    assert _same_bits(rt.block_grad(0, 8, 12), tree_sum(lambda i: rt.micro_batch_grad(0, i), 8, 12))


@pytest.mark.parametrize("name", ["mlp-relu-ce", "cnn-maxpool"])
@pytest.mark.parametrize("stack_max", [1, 3, 16])
def test_a_block_sum_written_into_a_ring_slot_has_the_same_bits(
    tmp_path, monkeypatch, name, stack_max
):
    """A worker computes its block sums straight into its ring's next slot (`out`): the
    same bits as a fresh sum, for every split of the work, and `put` then copies nothing."""
    rt = _runtime(tmp_path, name, 12, 3)
    monkeypatch.setattr(rt, "stack_size", lambda: stack_max)
    ring = GradsRing(slots=2)
    try:
        for lo, hi in ((0, 12), (8, 12), (5, 6)):
            fresh = rt.block_grad(1, lo, hi)
            slot = ring.slot(rt.sum_layout())
            into = rt.block_grad(1, lo, hi, out=slot)
            assert all(a is b for a, b in zip(into, slot, strict=True))
            assert _same_bits(into, fresh), (lo, hi)
            fields = ring.put(into)
            reader = GradsReader()
            msg = wire.Message(wire.GRADS, dict(fields))
            reader.load("w", msg)
            assert _same_bits([msg.arrays[k] for k in msg.arrays], fresh)
            reader.forget("w")
            ring.ack(fields["seq"])
    finally:
        ring.close()


@pytest.mark.parametrize(("name", "n_micro", "mb"), [(n, 12, 3) for n in MODELS])
def test_stacked_matches_the_per_micro_batch_path(tmp_path, name, n_micro, mb):
    rt = _runtime(tmp_path, name, n_micro, mb)
    for rnd in (0, 1):
        new = rt.block_grad(rnd, 0, n_micro)
        old = tree_sum(lambda i, r=rnd: rt.unstacked_grad(r, i), 0, n_micro)
        for pname, a, b in zip(rt.names + ["loss"], new, old, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype, pname
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=pname)


def test_dropout_masks_come_from_each_micro_batch_stream(tmp_path):
    # p=0.5 dropout right after the input: which features a micro-batch sees is its mask.
    rt = _runtime(tmp_path, "mlp-gelu-dropout-mse", 5, 4)
    rt.model = nn.Sequential(nn.Dropout(0.5))
    x = Tensor(np.ones((5, 4, 12), np.float32))
    epoch, step = rt.position(1)
    rngs = [training.micro_batch_rng(rt.spec.seed, epoch, step, i) for i in range(5)]
    out = rt.model.stacked(x, nn.Stack(5, rngs)).data
    for i in range(5):
        d = nn.Dropout(0.5, generator=training.micro_batch_rng(rt.spec.seed, epoch, step, i))
        assert out[i].tobytes() == d(Tensor(np.ones((4, 12), np.float32))).data.tobytes()


def test_a_model_with_an_unstackable_layer_runs_micro_batches_one_by_one(tmp_path):
    class Double(nn.Module):  # no stacked(): the trainer cannot know it is per-sample
        def forward(self, x):
            return x * 2.0

    rt = _runtime(tmp_path, "mlp-relu-ce", 5, 4)
    assert nn.stackable(rt.model)
    rt.model = nn.Sequential(*rt.model, Double())
    assert not nn.stackable(rt.model)
    with pytest.raises(NotImplementedError, match="Double cannot run stacked"):
        rt.model.stacked(Tensor(np.ones((1, 4, 12), np.float32)), nn.Stack(1))
    assert not rt.stacked
    old = tree_sum(lambda i: rt.unstacked_grad(0, i), 0, 5)
    assert _same_bits(rt.block_grad(0, 0, 5), old)


def test_a_forward_overridden_without_its_stacked_twin_is_not_stacked():
    class Shifted(nn.Linear):  # forward changed, stacked() inherited: it would be wrong
        def forward(self, x):
            return super().forward(x) + 1.0

    assert not nn.stackable(nn.Sequential(Shifted(3, 2)))
    patched = nn.Sequential(nn.Linear(3, 2))
    patched[0].forward = lambda x: x
    assert not nn.stackable(patched)
    assert nn.stackable(nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.GELU()))


@pytest.mark.parametrize(
    ("fn", "out_shape", "target"),
    [
        (F.cross_entropy, (4, 5), lambda r: r.integers(0, 5, 4)),
        (F.nll_loss, (4, 5), lambda r: r.integers(0, 5, 4)),
        (F.mse_loss, (4, 3), lambda r: _x(r, 4, 3)),
        (F.binary_cross_entropy_with_logits, (4, 1), lambda r: _x(r, 4, 1) > 0),
        # a (m,) target against (m, 1) logits broadcasts to (m, m), as unstacked
        (F.binary_cross_entropy_with_logits, (4, 1), lambda r: (_x(r, 4) > 0) * 1.0),
    ],
)
def test_stacked_loss_is_the_loss_of_each_micro_batch(fn, out_shape, target):
    r = np.random.default_rng(0)
    k = 6
    outs = _x(r, k, *out_shape)
    ys = np.stack([np.asarray(target(r)) for _ in range(k)])
    if ys.dtype == bool:
        ys = ys.astype(np.float32)
    stacked = Tensor(outs, requires_grad=True)
    losses = F.stacked_loss(fn, stacked, Tensor(ys))
    losses.backward(np.ones(k, losses.dtype))
    for i in range(k):
        one = Tensor(outs[i], requires_grad=True)
        loss = fn(one, Tensor(ys[i]))
        loss.backward()
        np.testing.assert_allclose(losses.data[i], loss.data, rtol=1e-6)
        np.testing.assert_allclose(stacked.grad.data[i], one.grad.data, rtol=1e-5, atol=1e-7)


def test_stacked_loss_errors_name_the_problem():
    with pytest.raises(ValueError, match="target 7 is out of range for 5 classes"):
        F.stacked_loss(F.cross_entropy, Tensor(np.zeros((2, 3, 5))), np.full((2, 3), 7))
    with pytest.raises(ValueError, match=r"mse_loss: input shape \(3, 2\) and target shape"):
        F.stacked_loss(F.mse_loss, Tensor(np.zeros((2, 3, 2))), Tensor(np.zeros((2, 3, 1))))
    with pytest.raises(ValueError, match="call it per micro-batch"):
        F.stacked_loss(lambda a, b: a, Tensor(np.zeros((2, 3))), None)


def test_stacked_linear_double_backward_matches_the_fast_path():
    # One derivative table for both paths: create_graph must agree with the ndarray path.
    from shardgrad.core.autograd import grad

    r = np.random.default_rng(1)
    x = Tensor(_x(r, 3, 4, 5), requires_grad=True)
    w = Tensor(_x(r, 3, 2, 5), requires_grad=True)
    b = Tensor(_x(r, 3, 2), requires_grad=True)
    y = F.linear(x, w, b)
    fast = grad((y * y).sum(), [x, w, b], retain_graph=True)
    slow = grad((y * y).sum(), [x, w, b], create_graph=True)
    for f, s in zip(fast, slow, strict=True):
        np.testing.assert_allclose(f.data, s.data, rtol=1e-6)
    # and per slice it is PyTorch's 2-D linear
    for i in range(3):
        one = F.linear(Tensor(x.data[i]), Tensor(w.data[i]), Tensor(b.data[i]))
        np.testing.assert_array_equal(one.data, y.data[i])


@pytest.mark.parametrize("k", range(1, 9))
def test_numpy_reduces_a_stacked_axis_like_a_lone_one(k):
    # The premise of stacking: (k, m, C) summed over axis 1 gives each (m, C) axis-0 sum.
    g = np.random.default_rng(k).standard_normal((k, 37, 10)).astype(np.float32)
    sums = g.sum(axis=1)
    for i in range(k):
        assert sums[i].tobytes() == g[i].sum(axis=0).tobytes()


# ---- the property itself, on random shapes -------------------------------------------------
ACTS = ["relu", "tanh", "gelu", "sigmoid"]


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 9),
    m=st.integers(1, 9),
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    act=st.sampled_from(ACTS),
    loss=st.sampled_from([F.cross_entropy, F.mse_loss]),
    seed=st.integers(0, 2**16),
)
def test_a_micro_batch_gives_the_same_bits_alone_and_in_any_stack(k, m, widths, act, loss, seed):
    layers = []
    for w in widths:
        layers += [{"type": "linear", "out": w}, {"type": act}]
    model = nn.build(layers + [{"type": "linear", "out": 3}], [5], seed)
    r = np.random.default_rng(seed)
    x = _x(r, k, m, 5)
    y = r.integers(0, 3, (k, m)) if loss is F.cross_entropy else _x(r, k, m, 3)
    _same_bits_in_any_stack(model, loss, x, y, lo=int(r.integers(0, k - 1)))


def _same_bits_in_any_stack(model, loss, x, y, lo):
    """Each of the k micro-batches (x, y) has the same gradient and loss bits stacked with
    all k, alone, and from `lo` on in a shorter stack (at other places)."""
    k, m = y.shape[:2]
    params = list(model.parameters())

    def run(lo, hi):
        stack = nn.Stack(hi - lo)
        out = model.stacked(Tensor(x[lo:hi]), stack)
        losses = F.stacked_loss(loss, out, Tensor(y[lo:hi])) * float(m)
        losses.backward(np.ones(hi - lo, losses.dtype))
        return [stack.grad(p) for p in params] + [losses.data]

    whole, part = run(0, k), run(lo, k)
    for i in range(k):
        alone = run(i, i + 1)
        for a, b in zip(whole, alone, strict=True):
            assert a[i].tobytes() == b[0].tobytes()
        if i >= lo:
            for a, b in zip(whole, part, strict=True):
                assert a[i].tobytes() == b[i - lo].tobytes()


def test_the_gemm_order_of_a_linear_is_chosen_per_micro_batch():
    """ops._linear computes w @ x^T for few rows and a big weight, x @ w^T otherwise; the
    two can differ in bits (on Haswell's kernels they do), so the choice may depend on one
    micro-batch's shapes only: alone (m, in), or stacked (k, m, in) with any k."""
    chosen = set()
    for m in (1, 2, 5, 32, 33, 64):
        for out, inp in ((10, 784), (128, 128), (128, 256), (256, 784), (512, 512)):
            alone = ops._w_first((m, inp), (out, inp))
            assert all(ops._w_first((k, m, inp), (k, out, inp)) == alone for k in range(1, 10))
            chosen.add(alone)
    assert chosen == {True, False}
    assert ops._w_first((4, 2, 5, 256), (256, 256)) is False  # (more dims than the weight)


WIDE = [
    {"type": "linear", "out": 256},
    {"type": "relu"},
    {"type": "linear", "out": 192},
    {"type": "relu"},
    {"type": "linear", "out": 3},
]  # weights 256x200 and 192x256: both take w @ x^T at 2..32 rows


def _wide_layer_bits(m, k=4):
    """A micro-batch of m rows through wide layers has the bits of its own pass, stacked
    with any others, and its forward those of a lone 2-D linear."""
    model = nn.build(WIDE, [200], seed=m)
    r = np.random.default_rng(m)
    x, y = _x(r, k, m, 200), r.integers(0, 3, (k, m))
    _same_bits_in_any_stack(model, F.cross_entropy, x, y, lo=1)
    params = list(model.parameters())
    assert ops._w_first((k, m, 200), (k, 256, 200)) == (2 <= m <= 32)  # both orders met
    stack = nn.Stack(k)  # the zero-copy views a stacked pass uses
    stacked = F.linear(Tensor(x), stack(params[0]), stack(params[1])).data
    for i in range(k):
        one = F.linear(Tensor(x[i]), params[0], params[1]).data
        assert one.tobytes() == stacked[i].tobytes()


@pytest.mark.parametrize("m", [1, 2, 5, 32, 33])
def test_wide_layers_with_few_rows_give_the_same_bits_alone_and_in_any_stack(m):
    _wide_layer_bits(m)


def test_wide_layers_give_the_same_bits_in_any_stack_on_haswell_kernels():
    """The same on OpenBLAS's Haswell kernels (what docker-compose.yml runs everywhere),
    on which the two GEMM orders of ops._linear give different bits: a choice that
    depended on k would show here."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_batched import _wide_layer_bits\n"
        "for m in (1, 2, 5, 32, 33): _wide_layer_bits(m)"
    )
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
