"""Bad input gets a clear error naming what is wrong, never a bare NumPy traceback."""

import re

import numpy as np
import pytest

import shardgrad.core as sg
from shardgrad.core import functional as F
from shardgrad.core import nn

RAW_NUMPY = [
    "operands could not be broadcast together with shapes",
    "mismatch in its core dimension",
    "cannot reshape array of size",
]


def shape_pattern(shape) -> str:
    """A shape written as (2, 3), [2, 3], (2,3) or torch.Size([2, 3])."""
    inner = r",\s*".join(str(n) for n in shape) + ("," if len(shape) == 1 else "")
    inner_list = r",\s*".join(str(n) for n in shape)
    return rf"(\({inner}\)|\[{inner_list}\])"


def assert_names_shapes(excinfo, *shapes):
    msg = str(excinfo.value)
    for s in shapes:
        assert re.search(shape_pattern(s), msg), f"shape {s} not named in: {msg!r}"
    assert not any(msg.startswith(raw) for raw in RAW_NUMPY), f"raw NumPy message: {msg!r}"


def ones(*shape, requires_grad=True):
    return sg.ones(*shape, requires_grad=requires_grad)


BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "maximum": lambda a, b: sg.maximum(a, b),
    "where": lambda a, b: sg.where(a > 0, a, b),
    "mse_loss": lambda a, b: F.mse_loss(a, b),
}


@pytest.mark.parametrize("name", list(BINARY))
def test_broadcast_mismatch_names_both_shapes(name):
    with pytest.raises(ValueError) as excinfo:
        BINARY[name](ones(2, 3), ones(4, 5))
    assert_names_shapes(excinfo, (2, 3), (4, 5))


@pytest.mark.parametrize(
    "a, b",
    [((2, 3), (4, 5)), ((3,), (4,)), ((2, 3), (2,)), ((5, 2, 3), (5, 4, 2))],
)
def test_matmul_mismatch_names_both_shapes(a, b):
    with pytest.raises(ValueError) as excinfo:
        ones(*a) @ ones(*b)
    assert_names_shapes(excinfo, a, b)


def test_cat_mismatch_names_shapes():
    with pytest.raises(ValueError) as excinfo:
        sg.cat([ones(2, 3), ones(2, 4)], dim=0)
    assert_names_shapes(excinfo, (2, 3), (2, 4))


def test_reshape_to_incompatible_shape():
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        ones(2, 3).reshape(4, 2)
    msg = str(excinfo.value)
    assert re.search(shape_pattern((4, 2)), msg) or "6" in msg, msg
    assert not any(msg.startswith(raw) for raw in RAW_NUMPY), msg


def test_linear_with_wrong_input_features():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError) as excinfo:
        layer(sg.ones(2, 5))
    assert_names_shapes(excinfo, (2, 5))


def test_conv2d_with_wrong_channels():
    with pytest.raises(ValueError) as excinfo:
        F.conv2d(ones(1, 3, 5, 5), ones(2, 4, 3, 3))
    assert_names_shapes(excinfo, (1, 3, 5, 5), (2, 4, 3, 3))


def test_cross_entropy_with_mismatched_batch():
    with pytest.raises(ValueError) as excinfo:
        F.cross_entropy(ones(4, 3), sg.tensor(np.array([0, 1, 2])))
    msg = str(excinfo.value)
    assert "4" in msg and "3" in msg, msg


def test_cross_entropy_with_out_of_range_target():
    with pytest.raises((ValueError, IndexError)) as excinfo:
        F.cross_entropy(ones(2, 3), sg.tensor(np.array([0, 3])))
    assert "3" in str(excinfo.value)


def test_sequential_error_names_the_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"(?i)layer\W*2\b"):
        model(sg.ones(3, 4))


# ---------------------------------------------------------------- backward misuse


def test_non_scalar_backward_without_gradient():
    y = ones(2, 2) * 2.0
    msg = "grad can be implicitly created only for scalar outputs"
    with pytest.raises(RuntimeError, match=msg):
        y.backward()


def test_backward_gradient_of_wrong_shape():
    y = ones(2, 2) * 2.0
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        y.backward(sg.ones(3))
    msg = str(excinfo.value)
    assert re.search(shape_pattern((3,)), msg) and re.search(shape_pattern((2, 2)), msg), msg


# ---------------------------------------------------------------- build


@pytest.mark.parametrize("index", [0, 2])
def test_unknown_layer_type_names_index_and_type(index):
    spec = [{"type": "linear", "out": 8}, {"type": "relu"}, {"type": "linear", "out": 2}]
    spec[index] = {"type": "transformer_block", "out": 8}
    with pytest.raises(ValueError) as excinfo:
        nn.build(spec, [4], seed=0)
    msg = str(excinfo.value)
    assert str(index) in msg and "transformer_block" in msg, msg


def test_build_layer_shape_error_names_the_layer():
    spec = [{"type": "conv2d", "out": 4, "kernel": 3}, {"type": "linear", "out": 2}]
    with pytest.raises(ValueError, match=r"(?i)layer\W*1\b"):
        nn.build(spec, [1, 8, 8], seed=0)


# ---------------------------------------------------------------- dtypes


def test_requires_grad_on_integer_tensor():
    with pytest.raises((RuntimeError, TypeError, ValueError), match=r"(?i)float|dtype"):
        sg.tensor([1, 2, 3], requires_grad=True)


def test_cross_entropy_with_float_targets():
    with pytest.raises((TypeError, ValueError, RuntimeError), match=r"(?i)int|long|dtype|float"):
        F.cross_entropy(ones(2, 3), sg.tensor([0.0, 1.0]))


def test_embedding_with_float_indices():
    with pytest.raises((TypeError, ValueError, IndexError), match=r"(?i)int|long|dtype|float"):
        F.embedding(sg.tensor([0.0, 1.0]), ones(3, 2))


def test_non_numeric_data():
    with pytest.raises((TypeError, ValueError)):
        sg.tensor(["a", "b"])
