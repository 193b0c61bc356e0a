"""BatchNorm1d / BatchNorm2d against torch: forward, input and parameter gradients, the
running statistics after several training batches (torch's momentum rule, unbiased
variance), num_batches_tracked, eval mode and the state_dict names."""

import numpy as np
import pytest

import shardgrad.core as sg
from shardgrad.core import nn

pytestmark = pytest.mark.oracle


@pytest.mark.parametrize(
    "cls, shape, momentum",
    [
        ("BatchNorm1d", (16, 5), 0.1),
        ("BatchNorm1d", (6, 4, 7), 0.3),
        ("BatchNorm2d", (8, 3, 5, 4), 0.1),
        ("BatchNorm2d", (2, 6, 3, 3), 0.9),
    ],
)
def test_batchnorm_matches_torch(torch, cls, shape, momentum):
    rng = np.random.default_rng(0)
    c = shape[1]
    ours = getattr(nn, cls)(c, eps=1e-5, momentum=momentum)
    theirs = getattr(torch.nn, cls)(c, eps=1e-5, momentum=momentum)
    ours.weight.data[:] = rng.uniform(0.5, 2, c)
    ours.bias.data[:] = rng.normal(0, 1, c)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(
        {k: torch.tensor(np.array(v.data)) for k, v in ours.state_dict().items()}
    )
    for step in range(3):  # several batches: the running statistics accumulate
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(np.float32)
        up = rng.standard_normal(shape).astype(np.float32)
        xs, xt = sg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        ys, yt = ours(xs), theirs(xt)
        np.testing.assert_allclose(ys.data, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        ours.zero_grad()
        theirs.zero_grad()
        (ys * sg.tensor(up)).sum().backward()
        (yt * torch.tensor(up)).sum().backward()
        np.testing.assert_allclose(xs.grad.data, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
        for name in ("weight", "bias"):
            g_ours, g_theirs = getattr(ours, name).grad.data, getattr(theirs, name).grad.numpy()
            np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-6)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1
    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(
        ours(sg.tensor(x)).data, theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5
    )


def test_deferred_running_stats_only_records_the_batch():
    bn = nn.BatchNorm1d(3)
    bn.defer_running_stats = True
    x = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    bn(sg.tensor(x))
    assert np.array_equal(bn.running_mean, np.zeros(3, np.float32))
    mean, var = bn.batch_stats
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(var, x.astype(np.float64).var(0, ddof=1))
    assert int(bn.num_batches_tracked) == 0


def test_wrong_input_is_named():
    with pytest.raises(ValueError, match="batchnorm2d: expected 4-d input with 3 channels"):
        nn.BatchNorm2d(3)(sg.tensor(np.zeros((2, 3, 4), np.float32)))
    with pytest.raises(ValueError, match="layer 0 \\(batchnorm2d\\): expects input"):
        nn.plan([{"type": "batchnorm2d"}], [8])
