"""The seed's examples, as written in the issue (no torch needed)."""

import numpy as np
import pytest

import shardgrad.core as sg


def test_square_of_sum_gradients():
    x = sg.tensor(2.0, requires_grad=True)
    y = sg.tensor(3.0, requires_grad=True)
    z = (x + y) ** 2
    z.backward()
    assert z.item() == pytest.approx(25.0)
    assert x.grad.item() == pytest.approx(2 * (2.0 + 3.0))
    assert y.grad.item() == pytest.approx(2 * (2.0 + 3.0))


def test_square_of_sum_gradients_vector():
    xv, yv = np.array([1.0, -2.0, 0.5]), np.array([0.25, 4.0, -3.0])
    x = sg.tensor(xv, requires_grad=True, dtype=sg.float64)
    y = sg.tensor(yv, requires_grad=True, dtype=sg.float64)
    ((x + y) ** 2).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * (xv + yv))
    np.testing.assert_allclose(y.grad.numpy(), 2 * (xv + yv))


def test_gradients_accumulate_across_backward_calls_then_zero():
    x = sg.tensor(2.0, requires_grad=True)
    y = sg.tensor(3.0, requires_grad=True)
    ((x + y) ** 2).backward()
    ((x + y) ** 2).backward()
    assert x.grad.item() == pytest.approx(2 * 2 * 5.0)
    assert y.grad.item() == pytest.approx(2 * 2 * 5.0)
    # zero in place, the PyTorch way ...
    x.grad.zero_()
    assert x.grad.item() == 0.0
    ((x + y) ** 2).backward()
    assert x.grad.item() == pytest.approx(10.0)
    # ... or drop the gradient altogether
    y.grad = None
    ((x + y) ** 2).backward()
    assert y.grad.item() == pytest.approx(10.0)
    assert x.grad.item() == pytest.approx(20.0)


def test_weight_times_input_with_label_10_and_prediction_6():
    w = sg.tensor(2.0, requires_grad=True)
    x = sg.tensor(3.0)
    label = 10.0
    prediction = w * x
    assert prediction.item() == pytest.approx(6.0)
    loss = (prediction - label) ** 2
    assert loss.item() == pytest.approx(16.0)
    loss.backward()
    assert w.grad.item() == pytest.approx(2 * (6.0 - 10.0) * 3.0)  # -24
    assert x.grad is None  # x does not require grad


def test_weight_times_input_one_sgd_step():
    from shardgrad.core import optim

    w = sg.tensor(2.0, requires_grad=True)
    opt = optim.SGD([w], lr=0.01)
    loss = (w * 3.0 - 10.0) ** 2
    loss.backward()
    opt.step()
    assert w.item() == pytest.approx(2.0 - 0.01 * -24.0)
    opt.zero_grad()
    assert w.grad is None
