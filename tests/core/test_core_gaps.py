"""Issue 11's core gaps: a vectorised erf (GELU) against math.erf and torch, max_pool2d with
padding and pad's reflect / replicate / circular modes against torch (values and
gradients)."""

import math

import numpy as np
import pytest

import shardgrad.core as sg
from shardgrad.core import functional as F
from shardgrad.core import nn
from shardgrad.core.special import erf


def test_erf_within_a_few_ulp_of_math_erf_in_float64():
    xs = np.concatenate(
        [
            np.linspace(-7, 7, 100_001),
            np.geomspace(1e-300, 1, 500),
            -np.geomspace(1e-30, 6, 500),
            [0.0, -0.0, 0.999999, 1.0, 1.000001, 5.93, 6.0],
        ]
    )
    want = np.array([math.erf(v) for v in xs])
    got = erf(xs)
    ulps = np.abs(got - want) / np.spacing(np.abs(want))
    assert ulps.max() <= 8, (ulps.max(), xs[ulps.argmax()])
    assert np.array_equal(np.signbit(got), np.signbit(want))  # erf(-0.0) is -0.0
    special = erf(np.array([np.inf, -np.inf, np.nan]))
    assert special[0] == 1 and special[1] == -1 and np.isnan(special[2])
    assert erf(np.float32([0.5])).dtype == np.float32
    # in float32, what np.vectorize(math.erf) gave before, to at most one float32 ulp
    x32 = np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 3
    before = np.array([math.erf(v) for v in x32.tolist()]).astype(np.float32)
    assert np.max(np.abs(erf(x32) - before) / np.spacing(np.abs(before))) <= 1


@pytest.mark.oracle
def test_gelu_and_erf_match_torch(torch):
    x = np.random.default_rng(0).standard_normal(20_000).astype(np.float32) * 4
    xs = sg.tensor(x, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    ys, yt = F.gelu(xs), torch.nn.functional.gelu(xt)
    # float32 1 + erf(x) cancels for x << 0: both sides round there (1.2e-6 apart at most)
    np.testing.assert_allclose(ys.data, yt.detach().numpy(), rtol=1e-6, atol=2e-6)
    ys.sum().backward()
    yt.sum().backward()
    np.testing.assert_allclose(xs.grad.data, xt.grad.numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(erf(x), torch.erf(torch.tensor(x)).numpy(), rtol=2e-7, atol=1e-7)


def _check(torch, fn_sg, fn_th, shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    xs, xt = sg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ys, yt = fn_sg(xs), fn_th(xt)
    assert ys.shape == tuple(yt.shape)
    np.testing.assert_allclose(ys.data, yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    up = np.random.default_rng(seed + 1).standard_normal(ys.shape).astype(np.float32)
    (ys * sg.tensor(up)).sum().backward()
    (yt * torch.tensor(up)).sum().backward()
    np.testing.assert_allclose(xs.grad.data, xt.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "shape, pad", [((2, 3, 7), (2, 3)), ((2, 3, 5, 6), (1, 2, 3, 0)), ((1, 2, 4, 4), (3, 3, 3, 3))]
)
def test_pad_modes_match_torch(torch, mode, shape, pad):
    _check(
        torch, lambda x: F.pad(x, pad, mode), lambda x: torch.nn.functional.pad(x, pad, mode), shape
    )


def test_pad_mode_errors_name_the_problem():
    x = sg.tensor(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="reflect padding \\(3, 0\\) must be smaller"):
        F.pad(x, (3, 0), "reflect")
    with pytest.raises(ValueError, match="mode must be"):
        F.pad(x, (1, 1), "mirror")


@pytest.mark.oracle
@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (2, 2, 1), (3, 1, 1), (4, 3, 2)])
def test_max_pool2d_padding_matches_torch(torch, kernel, stride, padding):
    # all-negative inputs too: the -inf padding must never win, zeros would
    for seed, shift in ((0, 0.0), (1, -10.0)):
        _check(
            torch,
            lambda x, s=shift: F.max_pool2d(x + s, kernel, stride, padding),
            lambda x, s=shift: torch.nn.functional.max_pool2d(x + s, kernel, stride, padding),
            (2, 3, 7, 6),
            seed,
        )
    _check(
        torch,
        lambda x: F.avg_pool2d(x, kernel, stride, padding),
        lambda x: torch.nn.functional.avg_pool2d(x, kernel, stride, padding),
        (2, 3, 7, 6),
    )


def test_pool_padding_in_the_layer_registry():
    model = nn.build([{"type": "maxpool2d", "kernel": 3, "stride": 2, "padding": 1}], [2, 7, 7])
    assert model.output_shape == (2, 4, 4)
    assert model(sg.tensor(np.zeros((1, 2, 7, 7), np.float32))).shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="at most half the kernel"):
        nn.plan([{"type": "avgpool2d", "kernel": 2, "padding": 2}], [1, 8, 8])
