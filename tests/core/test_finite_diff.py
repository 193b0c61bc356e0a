"""Central finite-difference gradient checks in float64, independent of torch.

For f: inputs -> output, we check <grad f, v> against a random upstream v, i.e. the
analytic gradient of L = sum(f(inputs) * v) against (L(x + h e_i) - L(x - h e_i)) / 2h
for every input element. Inputs stay away from kinks (relu at 0, max ties, ...).
"""

import numpy as np
import pytest

import shardgrad.core as sg
from shardgrad.core import functional as F

H = 1e-6
RTOL, ATOL = 1e-5, 1e-7


def _scalar(fn, arrays, v):
    with sg.no_grad():
        out = fn(*[sg.tensor(a, dtype=sg.float64) for a in arrays])
    return float(np.sum(np.asarray(out.data, dtype=np.float64) * v))


def fd_check(fn, arrays, seed=0, requires_grad=None):
    """Compare the analytic gradient of sum(fn(*inputs) * v) with central differences."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    if requires_grad is None:
        requires_grad = [True] * len(arrays)
    leaves = [
        sg.tensor(a.copy(), requires_grad=rg, dtype=sg.float64)
        for a, rg in zip(arrays, requires_grad, strict=True)
    ]
    out = fn(*leaves)
    assert out.dtype == np.float64
    v = np.random.default_rng(seed + 99).standard_normal(out.shape)
    (out * sg.tensor(v, dtype=sg.float64)).sum().backward()
    for i, (a, leaf) in enumerate(zip(arrays, leaves, strict=True)):
        if not requires_grad[i]:
            continue
        numeric = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            plus, minus = [x.copy() for x in arrays], [x.copy() for x in arrays]
            plus[i][j] += H
            minus[i][j] -= H
            numeric[j] = (_scalar(fn, plus, v) - _scalar(fn, minus, v)) / (2 * H)
        assert leaf.grad is not None, f"input {i} got no gradient"
        analytic = leaf.grad.numpy()
        assert analytic.shape == a.shape, f"grad shape {analytic.shape} != input shape {a.shape}"
        np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL, err_msg=f"input {i}")


def rnd(seed, *shape, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if kind == "away0":  # magnitudes in [0.2, 2]: no kink within H
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)
    return rng.standard_normal(shape)


SEEDS = [0, 1, 2]

CASES = {
    "add_broadcast": (lambda a, b: a + b, lambda s: [rnd(s, 3, 1, 4), rnd(s + 7, 2, 1)]),
    "sub_mul_broadcast": (lambda a, b: (a - b) * b, lambda s: [rnd(s, 2, 3), rnd(s + 7, 3)]),
    "div_broadcast": (
        lambda a, b: a / b,
        lambda s: [rnd(s, 2, 3), rnd(s + 7, 2, 1, kind="positive")],
    ),
    "pow_tensor": (
        lambda a, b: a**b,
        lambda s: [rnd(s, 2, 3, kind="positive"), rnd(s + 7, 3)],
    ),
    "pow_scalar": (lambda a: a**3 + a**-0.5, lambda s: [rnd(s, 4, kind="positive")]),
    "matmul_batched": (lambda a, b: a @ b, lambda s: [rnd(s, 2, 1, 3, 4), rnd(s + 7, 3, 4, 2)]),
    "matmul_vec": (lambda a, b: a @ b, lambda s: [rnd(s, 3, 4), rnd(s + 7, 4)]),
    "exp_log_sqrt": (
        lambda a: a.exp() + a.log() * a.sqrt(),
        lambda s: [rnd(s, 5, kind="positive")],
    ),
    "tanh_sigmoid": (lambda a: a.tanh() * a.sigmoid(), lambda s: [rnd(s, 2, 3)]),
    "sin_cos": (lambda a: a.sin() - a.cos() * 2.0, lambda s: [rnd(s, 2, 3)]),
    "gelu": (lambda a: F.gelu(a), lambda s: [rnd(s, 3, 4) * 2.0]),
    "relu_abs": (lambda a: a.relu() + a.abs() * 0.5, lambda s: [rnd(s, 3, 4, kind="away0")]),
    "clamp": (lambda a: a.clamp(-0.5, 0.5), lambda s: [rnd(s, 10, kind="away0") * 0.6]),
    "maximum": (lambda a, b: sg.maximum(a, b), lambda s: [rnd(s, 6), rnd(s, 6) + 0.3]),
    "where": (
        lambda a, b: sg.where(a > 0, a * b, b * 2.0),
        lambda s: [rnd(s, 3, 4, kind="away0"), rnd(s + 7, 4)],
    ),
    "sum_mean": (lambda a: a.sum(dim=1) * a.mean(dim=0, keepdim=True), lambda s: [rnd(s, 3, 3)]),
    "var": (lambda a: a.var(dim=-1) + a.var(), lambda s: [rnd(s, 3, 4)]),
    "var_biased": (lambda a: a.var(dim=0, unbiased=False, keepdim=True), lambda s: [rnd(s, 3, 4)]),
    "max_dim": (
        lambda a: a.max(dim=1)[0].unsqueeze(1) * 2.0 + a.amax(dim=0),
        lambda s: [rnd(s, 3, 4)],
    ),
    "max_all": (lambda a: a.max() - a.min(), lambda s: [rnd(s, 3, 4)]),
    "logsumexp": (lambda a: sg.logsumexp(a, dim=1, keepdim=True), lambda s: [rnd(s, 3, 4) * 3]),
    "softmax": (lambda a: a.softmax(dim=-1), lambda s: [rnd(s, 2, 5) * 2]),
    "log_softmax": (lambda a: F.log_softmax(a, dim=0), lambda s: [rnd(s, 4, 3) * 2]),
    "reshape_transpose": (
        lambda a: a.reshape(3, 2, 2).transpose(0, 2).permute(1, 2, 0).flatten() * a.sum(),
        lambda s: [rnd(s, 2, 6)],
    ),
    "squeeze_unsqueeze_expand": (
        lambda a: a.unsqueeze(0).expand(3, -1, 4).sum(dim=0) * a.squeeze(1).unsqueeze(-1),
        lambda s: [rnd(s, 2, 1)],
    ),
    "index_basic": (lambda a: a[1:, None, ::2, -1] * 3.0, lambda s: [rnd(s, 3, 5, 2)]),
    "index_advanced_repeats": (
        lambda a: a[[0, 2, 0, 0]] * a[:, [1, 1]].sum(),
        lambda s: [rnd(s, 3, 2)],
    ),
    "index_mask": (lambda a: a[a > 0] ** 2, lambda s: [rnd(s, 3, 4, kind="away0")]),
    "cat_stack": (
        lambda a, b: sg.cat([a, b, a], dim=1) + sg.stack([a, a], dim=1).sum(dim=1).sum(),
        lambda s: [rnd(s, 2, 3), rnd(s + 7, 2, 3)],
    ),
    "pad": (lambda a: F.pad(a, (1, 2, 0, 1), value=0.5) ** 2, lambda s: [rnd(s, 2, 3, 2)]),
    "conv2d": (
        lambda x, w, b: F.conv2d(x, w, b),
        lambda s: [rnd(s, 2, 2, 5, 4), rnd(s + 7, 3, 2, 3, 2), rnd(s + 8, 3)],
    ),
    "conv2d_stride_padding": (
        lambda x, w: F.conv2d(x, w, stride=2, padding=1),
        lambda s: [rnd(s, 1, 2, 5, 6), rnd(s + 7, 2, 2, 3, 3)],
    ),
    "conv2d_tuple_stride_padding": (
        lambda x, w: F.conv2d(x, w, None, stride=(1, 2), padding=(2, 0)),
        lambda s: [rnd(s, 1, 1, 4, 5), rnd(s + 7, 2, 1, 2, 3)],
    ),
    "max_pool2d": (lambda x: F.max_pool2d(x, 2), lambda s: [rnd(s, 2, 2, 4, 5)]),
    "max_pool2d_stride": (lambda x: F.max_pool2d(x, 3, stride=1), lambda s: [rnd(s, 1, 2, 4, 4)]),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), lambda s: [rnd(s, 2, 2, 4, 5)]),
    "avg_pool2d_stride": (lambda x: F.avg_pool2d(x, 3, 2), lambda s: [rnd(s, 1, 2, 5, 5)]),
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, (4,), w, b),
        lambda s: [rnd(s, 3, 4), rnd(s + 7, 4), rnd(s + 8, 4)],
    ),
    "layer_norm_2d": (lambda x: F.layer_norm(x, (2, 3)), lambda s: [rnd(s, 2, 2, 3) * 3.0]),
    "embedding": (
        lambda w: F.embedding(sg.tensor(np.array([[0, 2, 2], [1, 0, 2]])), w) * 2.0,
        lambda s: [rnd(s, 4, 3)],
    ),
    "mse_loss": (lambda a, b: F.mse_loss(a, b), lambda s: [rnd(s, 3, 4), rnd(s + 7, 3, 4)]),
    "mse_loss_sum": (
        lambda a, b: F.mse_loss(a, b, reduction="sum"),
        lambda s: [rnd(s, 5), rnd(s + 7, 5)],
    ),
    "cross_entropy": (
        lambda x: F.cross_entropy(x, sg.tensor(np.array([0, 2, 1, 2]))),
        lambda s: [rnd(s, 4, 3) * 2],
    ),
    "cross_entropy_none": (
        lambda x: F.cross_entropy(x, sg.tensor(np.array([1, 0, 1])), reduction="none"),
        lambda s: [rnd(s, 3, 2) * 2],
    ),
    "nll_loss": (
        lambda x: F.nll_loss(F.log_softmax(x, dim=1), sg.tensor(np.array([2, 0, 1]))),
        lambda s: [rnd(s, 3, 4)],
    ),
    "bce_with_logits": (
        lambda x: F.binary_cross_entropy_with_logits(
            x, sg.tensor(np.array([0.0, 1.0, 0.3, 1.0, 0.0]), dtype=sg.float64)
        ),
        lambda s: [rnd(s, 5) * 3],
    ),
    "mlp": (
        lambda x, w1, b1, w2: F.cross_entropy(
            (x @ w1.T + b1).tanh() @ w2.T, sg.tensor(np.array([0, 1, 1]))
        ),
        lambda s: [rnd(s, 3, 4), rnd(s + 1, 5, 4), rnd(s + 2, 5), rnd(s + 3, 2, 5)],
    ),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CASES))
def test_finite_differences(name, seed):
    fn, make_inputs = CASES[name]
    fd_check(fn, make_inputs(seed), seed=seed)


def test_finite_differences_fan_out_graph():
    def fn(x, y):
        a = x * y
        b = a.tanh() + x
        c = b * a - y.exp()
        return (c @ b.T).sum(dim=0) + c.sum()

    fd_check(fn, [rnd(0, 3, 3), rnd(1, 3, 3)])


def test_finite_difference_checker_catches_a_wrong_gradient():
    """The checker itself must fail on a wrong gradient (guard against a vacuous test)."""
    with pytest.raises(AssertionError):
        fd_check(lambda a: a.detach() * a, [rnd(0, 3)])
