"""nn layers against torch (weights copied over), Module API, build(), initialisation,
optimizer trajectories against torch, and a small MLP that actually learns."""

import copy
import math

import numpy as np
import pytest
from core_helpers import SG, TOL32, assert_close, to_numpy, torch_lib

import shardgrad.core as sg
from shardgrad.core import functional as F
from shardgrad.core import nn, optim

# ---------------------------------------------------------------- layers vs torch


def compare_module(torch, sg_mod, th_mod, x, int_input=False, seed=0, tol=None):
    """Copy sg's weights into the torch module (by state_dict name), run both on x,
    backpropagate the same upstream gradient, compare output, input grad, param grads."""
    tol = TOL32 if tol is None else tol
    sd = sg_mod.state_dict()
    th_sd = th_mod.state_dict()
    assert list(sd) == list(th_sd), "state_dict keys differ from torch's"
    th_mod.load_state_dict({k: torch.tensor(np.array(to_numpy(v))) for k, v in sd.items()})
    if int_input:
        xs, xt = sg.tensor(x), torch.tensor(x)
    else:
        x = np.asarray(x, np.float32)
        xs, xt = SG.leaf(x), torch.tensor(x, requires_grad=True)
    ys, yt = sg_mod(xs), th_mod(xt)
    assert_close(ys, yt, **tol, what="forward")
    if not yt.requires_grad:
        return
    up = np.random.default_rng(seed).standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(up))
    ys.backward(sg.tensor(up))
    if not int_input:
        assert_close(xs.grad, xt.grad, **tol, what="input grad")
    th_params = dict(th_mod.named_parameters())
    for name, p in sg_mod.named_parameters():
        assert_close(p.grad, th_params[name].grad, **tol, what=f"grad of {name}")


def rnd32(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


LAYER_CASES = {
    "linear": (lambda m: m.nn.Linear(5, 3), (4, 5)),
    "linear_batched": (lambda m: m.nn.Linear(5, 3), (2, 3, 5)),
    "linear_no_bias": (lambda m: m.nn.Linear(5, 3, bias=False), (4, 5)),
    "conv2d": (lambda m: m.nn.Conv2d(2, 3, 3), (2, 2, 6, 5)),
    "conv2d_stride_pad": (lambda m: m.nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 2, 7, 6)),
    "conv2d_kw": (
        lambda m: m.nn.Conv2d(in_channels=1, out_channels=2, kernel_size=2, padding=1),
        (1, 1, 4, 4),
    ),
    "maxpool2d": (lambda m: m.nn.MaxPool2d(2), (2, 3, 6, 5)),
    "maxpool2d_stride": (lambda m: m.nn.MaxPool2d(3, stride=1), (1, 2, 5, 5)),
    "avgpool2d": (lambda m: m.nn.AvgPool2d(2), (2, 3, 6, 4)),
    "avgpool2d_stride": (lambda m: m.nn.AvgPool2d(2, 1), (2, 1, 3, 4)),
    "flatten": (lambda m: m.nn.Flatten(), (2, 3, 4, 2)),
    "flatten_dims": (lambda m: m.nn.Flatten(0, 1), (2, 3, 4)),
    "relu": (lambda m: m.nn.ReLU(), (3, 4)),
    "tanh": (lambda m: m.nn.Tanh(), (3, 4)),
    "sigmoid": (lambda m: m.nn.Sigmoid(), (3, 4)),
    "gelu": (lambda m: m.nn.GELU(), (3, 4)),
    "layernorm": (lambda m: m.nn.LayerNorm(4), (3, 4)),
    "layernorm_2d": (lambda m: m.nn.LayerNorm((3, 4)), (2, 3, 4)),
    "dropout_eval": (lambda m: m.nn.Dropout(0.5).eval(), (3, 4)),
    "dropout_p0": (lambda m: m.nn.Dropout(0.0), (3, 4)),
    "sequential_mlp": (
        lambda m: m.nn.Sequential(
            m.nn.Linear(6, 8), m.nn.ReLU(), m.nn.Linear(8, 8), m.nn.Tanh(), m.nn.Linear(8, 2)
        ),
        (5, 6),
    ),
    "sequential_cnn": (
        lambda m: m.nn.Sequential(
            m.nn.Conv2d(1, 4, 3, padding=1),
            m.nn.ReLU(),
            m.nn.MaxPool2d(2),
            m.nn.Conv2d(4, 2, 3),
            m.nn.GELU(),
            m.nn.AvgPool2d(2),
            m.nn.Flatten(),
            m.nn.Linear(2, 3),
        ),
        (2, 1, 8, 8),
    ),
}


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_torch(name, torch):
    make, shape = LAYER_CASES[name]
    sg_mod, th_mod = make(SG), make(torch_lib())
    if name == "layernorm":  # non-trivial affine parameters
        with sg.no_grad():
            sg_mod.weight.data[...] = rnd32(3, 4)
            sg_mod.bias.data[...] = rnd32(4, 4)
    compare_module(torch, sg_mod, th_mod, rnd32(1, *shape))


@pytest.mark.oracle
def test_embedding_layer_matches_torch(torch):
    idx = np.array([[0, 3, 3], [9, 1, 0]])
    compare_module(torch, nn.Embedding(10, 4), torch.nn.Embedding(10, 4), idx, int_input=True)


@pytest.mark.oracle
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_modules_match_torch(reduction, torch):
    T = torch_lib()
    logits, target = rnd32(0, 5, 4), np.array([0, 3, 1, 1, 2])
    a, b = rnd32(1, 3, 4), rnd32(2, 3, 4)
    for name, args, kwargs in [
        ("CrossEntropyLoss", (logits,), {"target": target}),
        ("MSELoss", (a, b), {}),
    ]:
        outs = {}
        for m in (SG, T):
            x = m.leaf(args[0])
            other = m.const(kwargs["target"]) if "target" in kwargs else m.const(args[1])
            loss = getattr(m.nn, name)(reduction=reduction)(x, other)
            loss.sum().backward() if reduction == "none" else loss.backward()
            outs[m.name] = (loss, x.grad)
        assert_close(outs["sg"][0], outs["torch"][0], **TOL32, what=f"{name} value")
        assert_close(outs["sg"][1], outs["torch"][1], **TOL32, what=f"{name} grad")
    assert_close(
        nn.CrossEntropyLoss()(sg.tensor(logits), sg.tensor(target)),
        T.F.cross_entropy(torch.tensor(logits), torch.tensor(target)),
        **TOL32,
    )


# ---------------------------------------------------------------- dropout


def test_dropout_train_mode_scales_and_masks():
    x = sg.tensor(np.ones((200, 50), np.float32), requires_grad=True)
    y = F.dropout(x, 0.25, training=True, generator=np.random.default_rng(0))
    out = y.detach().numpy()
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.02
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), kept / 0.75, rtol=1e-6)
    assert y.dtype == np.float32


def test_dropout_is_seeded_and_identity_when_not_training():
    x = sg.randn(10, 10, generator=np.random.default_rng(1))
    a = F.dropout(x, 0.5, generator=np.random.default_rng(7)).detach().numpy()
    b = F.dropout(x, 0.5, generator=np.random.default_rng(7)).detach().numpy()
    c = F.dropout(x, 0.5, generator=np.random.default_rng(8)).detach().numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(
        F.dropout(x, 0.5, training=False).detach().numpy(), x.detach().numpy()
    )
    layer = nn.Dropout(0.5)
    layer.eval()
    np.testing.assert_array_equal(layer(x).detach().numpy(), x.detach().numpy())
    layer.train()
    assert (layer(x).detach().numpy() == 0).any()


# ---------------------------------------------------------------- Module API


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8, generator=np.random.default_rng(0))
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 3, generator=np.random.default_rng(1))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_custom_module_registers_submodules():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert len(list(net.parameters())) == 4
    assert all(p.requires_grad and p.is_leaf for p in net.parameters())
    assert list(net.state_dict()) == names
    out = net(sg.randn(5, 4))
    assert tuple(out.shape) == (5, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None or not np.any(p.grad.numpy()) for p in net.parameters())


@pytest.mark.oracle
def test_named_parameters_and_state_dict_keys_match_torch(torch):
    for make, _ in LAYER_CASES.values():
        sg_mod, th_mod = make(SG), make(torch_lib())
        assert [n for n, _ in sg_mod.named_parameters()] == [
            n for n, _ in th_mod.named_parameters()
        ]
        for (n, p), (_, q) in zip(
            sg_mod.named_parameters(), th_mod.named_parameters(), strict=True
        ):
            assert tuple(p.shape) == tuple(q.shape), n
            assert p.dtype == np.float32, n


def test_state_dict_roundtrip():
    spec = [{"type": "linear", "out": 16}, {"type": "relu"}, {"type": "linear", "out": 3}]
    a, b = nn.build(spec, [5], seed=0), nn.build(spec, [5], seed=1)
    x = sg.randn(4, 5, generator=np.random.default_rng(2))
    assert not np.allclose(a(x).detach().numpy(), b(x).detach().numpy())
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(x).detach().numpy(), b(x).detach().numpy())
    # a deep copy (what a checkpoint holds) survives later training of the source
    saved = copy.deepcopy({k: np.array(to_numpy(v)) for k, v in a.state_dict().items()})
    opt = optim.SGD(a.parameters(), lr=0.5)
    a(x).sum().backward()
    opt.step()
    assert not np.array_equal(a(x).detach().numpy(), b(x).detach().numpy())
    a.load_state_dict(saved)  # plain ndarrays load too
    np.testing.assert_array_equal(a(x).detach().numpy(), b(x).detach().numpy())


def test_load_state_dict_rejects_bad_keys_and_shapes():
    m = nn.Linear(3, 2)
    sd = dict(m.state_dict())
    with pytest.raises((KeyError, RuntimeError, ValueError)):
        m.load_state_dict({"weight": sd["weight"]})
    with pytest.raises((RuntimeError, ValueError), match=r"weight"):
        m.load_state_dict({"weight": np.zeros((3, 3), np.float32), "bias": sd["bias"]})


def test_train_eval_propagate():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    assert model.training
    assert model.eval() is model
    assert not model.training and not model[1].training and not model[2][0].training
    model.train()
    assert model.training and model[1].training and model[2][0].training


# ---------------------------------------------------------------- initialisation


def test_linear_default_init_is_torch_kaiming_uniform():
    fan_in = 400
    layer = nn.Linear(fan_in, 300, generator=np.random.default_rng(0))
    bound = 1 / math.sqrt(fan_in)
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    assert w.shape == (300, 400) and b.shape == (300,)
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.99 * bound and np.abs(b).max() > 0.9 * bound
    assert abs(w.mean()) < 0.01 * bound * 10
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert abs(b.std() - bound / math.sqrt(3)) < 0.15 * bound


def test_conv_embedding_layernorm_init():
    conv = nn.Conv2d(4, 8, 3, generator=np.random.default_rng(0))
    bound = 1 / math.sqrt(4 * 3 * 3)
    w = conv.weight.detach().numpy()
    assert w.shape == (8, 4, 3, 3) and conv.bias.detach().numpy().shape == (8,)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert np.abs(conv.bias.detach().numpy()).max() <= bound
    emb = nn.Embedding(1000, 20, generator=np.random.default_rng(0)).weight.detach().numpy()
    assert abs(emb.mean()) < 0.02 and abs(emb.std() - 1.0) < 0.02  # N(0, 1) like torch
    ln = nn.LayerNorm(6)
    np.testing.assert_array_equal(ln.weight.detach().numpy(), np.ones(6, np.float32))
    np.testing.assert_array_equal(ln.bias.detach().numpy(), np.zeros(6, np.float32))


def test_init_is_seeded():
    a = nn.Linear(5, 4, generator=np.random.default_rng(3)).weight.detach().numpy()
    b = nn.Linear(5, 4, generator=np.random.default_rng(3)).weight.detach().numpy()
    c = nn.Linear(5, 4, generator=np.random.default_rng(4)).weight.detach().numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------- build


def test_build_mlp_from_spec():
    spec = [{"type": "linear", "out": 128}, {"type": "relu"}, {"type": "linear", "out": 10}]
    model = nn.build(spec, [784], seed=0)
    assert isinstance(model, nn.Sequential)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(128, 784), (128,), (10, 128), (10,)]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], nn.ReLU)
    out = model(sg.randn(3, 784))
    assert tuple(out.shape) == (3, 10) and out.dtype == np.float32
    bound = 1 / math.sqrt(784)
    assert np.abs(model[0].weight.detach().numpy()).max() <= bound
    again = nn.build(spec, [784], seed=0)
    other = nn.build(spec, [784], seed=1)
    for p, q, r in zip(model.parameters(), again.parameters(), other.parameters(), strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())
        assert not np.array_equal(p.detach().numpy(), r.detach().numpy())


def test_build_cnn_from_spec():
    spec = [
        {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel": 2},
        {"type": "conv2d", "out": 6, "kernel": 3, "stride": 2},
        {"type": "tanh"},
        {"type": "avgpool2d", "kernel": 2, "stride": 1},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 16},
        {"type": "layernorm"},
        {"type": "gelu"},
        {"type": "sigmoid"},
        {"type": "linear", "out": 10},
    ]
    model = nn.build(spec, [1, 12, 12], seed=0)
    x = sg.randn(2, 1, 12, 12)
    model.eval()
    out = model(x)
    assert tuple(out.shape) == (2, 10)
    # 12 -conv(p1)-> 12 -pool2-> 6 -conv(k3,s2)-> 2 -avgpool(k2,s1)-> 1: 6 features
    assert tuple(model[8].weight.shape) == (16, 6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_build_embedding_from_spec():
    spec = [
        {"type": "embedding", "num": 20, "dim": 4},
        {"type": "flatten"},
        {"type": "linear", "out": 2},
    ]
    model = nn.build(spec, [3], seed=0)
    out = model(sg.tensor(np.array([[1, 2, 3], [19, 0, 0]])))
    assert tuple(out.shape) == (2, 2)


# ---------------------------------------------------------------- optimizers vs torch

RNG = np.random.default_rng(42)
X = RNG.standard_normal((16, 4))
Y = RNG.standard_normal((16, 2))
P0 = [
    RNG.standard_normal((6, 4)) * 0.5,
    RNG.standard_normal(6) * 0.1,
    RNG.standard_normal((2, 6)) * 0.5,
    RNG.standard_normal(2) * 0.1,
]
QA = np.linspace(0.1, 5.0, 12).reshape(3, 4)
QB = RNG.standard_normal((3, 4))


def like(m, arr, t):
    """A constant with the dtype of tensor t."""
    return m.const(arr.astype(to_numpy(t).dtype))


def mlp_loss(m, ps):
    w1, b1, w2, b2 = ps
    h = m.tanh(like(m, X, w1) @ w1.T + b1)
    return m.F.mse_loss(h @ w2.T + b2, like(m, Y, w1))


def quad_loss(m, ps):
    (p,) = ps
    return (like(m, QA, p) * p * p).sum() * 0.5 + (like(m, QB, p) * p).sum()


PROBLEMS = {"mlp": (mlp_loss, P0), "quadratic": (quad_loss, [np.ones((3, 4))])}

OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 0.1}),
    "sgd_momentum": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "sgd_dampening": ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    "sgd_nesterov": ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd_weight_decay": ("SGD", {"lr": 0.1, "weight_decay": 0.05}),
    "sgd_all": ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    "adam_default": ("Adam", {}),
    "adam": ("Adam", {"lr": 0.05}),
    "adam_betas_eps": ("Adam", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}),
    "adam_weight_decay": ("Adam", {"lr": 0.05, "weight_decay": 0.1}),
    "adamw_default": ("AdamW", {}),
    "adamw": ("AdamW", {"lr": 0.05}),
    "adamw_weight_decay": ("AdamW", {"lr": 0.05, "weight_decay": 0.1, "betas": (0.85, 0.995)}),
}


def trajectory(m, opt_mod, problem, opt_name, steps=50, dtype=np.float64):
    loss_fn, p0 = PROBLEMS[problem]
    ps = [m.leaf(p.astype(dtype)) for p in p0]
    cls, kwargs = OPTIMIZERS[opt_name]
    opt = getattr(opt_mod, cls)(ps, **kwargs)
    history, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(m, ps)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        history.append([np.array(to_numpy(p)) for p in ps])
    return history, losses


@pytest.mark.oracle
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_trajectory_matches_torch(opt_name, problem, torch):
    hs, ls = trajectory(SG, optim, problem, opt_name)
    ht, lt = trajectory(torch_lib(), torch.optim, problem, opt_name)
    for step, (a, b) in enumerate(zip(hs, ht, strict=True)):
        for k, (pa, pb) in enumerate(zip(a, b, strict=True)):
            assert_close(pa, pb, what=f"step {step + 1}, param {k}")
    assert_close(np.array(ls), np.array(lt), what="losses")
    assert ls[-1] < ls[0]


@pytest.mark.oracle
@pytest.mark.parametrize("opt_name", ["sgd_all", "adam_weight_decay", "adamw"])
def test_optimizer_trajectory_float32_close_to_torch(opt_name, torch):
    hs, _ = trajectory(SG, optim, "quadratic", opt_name, dtype=np.float32)
    ht, _ = trajectory(torch_lib(), torch.optim, "quadratic", opt_name, dtype=np.float32)
    assert hs[-1][0].dtype == np.float32
    assert_close(hs[-1][0], ht[-1][0], rtol=1e-4, atol=1e-5, what="final params")


@pytest.mark.oracle
@pytest.mark.parametrize("opt_name", ["sgd_all", "adam_weight_decay", "adamw_weight_decay"])
def test_optimizer_skips_parameters_without_grad(opt_name, torch):
    res = {}
    for m, mod in ((SG, optim), (torch_lib(), torch.optim)):
        used, unused = m.leaf(np.ones(3)), m.leaf(np.full(2, 2.0))
        cls, kwargs = OPTIMIZERS[opt_name]
        opt = getattr(mod, cls)([used, unused], **kwargs)
        for _ in range(3):
            opt.zero_grad()
            (used * used).sum().backward()
            opt.step()
        assert unused.grad is None
        res[m.name] = (to_numpy(used), to_numpy(unused))
    assert_close(res["sg"][0], res["torch"][0])
    np.testing.assert_array_equal(res["sg"][1], np.full(2, 2.0))


def test_optimizer_zero_grad():
    p = sg.tensor([1.0, 2.0], requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    (p * p).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None
    np.testing.assert_array_equal(p.grad.numpy(), [0.0, 0.0])
    (p * p).sum().backward()
    opt.zero_grad()
    assert p.grad is None


def test_optimizer_updates_parameters_in_place():
    p = sg.tensor([1.0, 2.0], requires_grad=True)
    data = p.data
    opt = optim.Adam([p], lr=0.1)
    (p * p).sum().backward()
    opt.step()
    assert p.data is data and p.is_leaf and p.grad_fn is None
    assert not np.array_equal(data, [1.0, 2.0])


@pytest.mark.parametrize("opt_name", ["sgd_all", "sgd_dampening", "adam", "adamw_weight_decay"])
def test_optimizer_state_dict_roundtrip(opt_name):
    """Checkpoint after 10 steps, restore into a fresh optimizer: the next 10 steps are
    exactly those of the uninterrupted run."""
    cls, kwargs = OPTIMIZERS[opt_name]

    def fresh(values):
        ps = [SG.leaf(v.copy()) for v in values]
        return ps, getattr(optim, cls)(ps, **kwargs)

    def run(ps, opt, n):
        for _ in range(n):
            opt.zero_grad()
            mlp_loss(SG, ps).backward()
            opt.step()

    ps_a, opt_a = fresh(P0)
    run(ps_a, opt_a, 10)
    params_ckpt = [p.detach().numpy().copy() for p in ps_a]
    opt_ckpt = copy.deepcopy(opt_a.state_dict())
    run(ps_a, opt_a, 10)

    ps_b, opt_b = fresh(params_ckpt)
    opt_b.load_state_dict(opt_ckpt)
    run(ps_b, opt_b, 10)
    for pa, pb in zip(ps_a, ps_b, strict=True):
        np.testing.assert_array_equal(pa.detach().numpy(), pb.detach().numpy())

    # and without restoring the state, the continuation differs (the state matters)
    if opt_name != "sgd":
        ps_c, opt_c = fresh(params_ckpt)
        run(ps_c, opt_c, 10)
        assert not np.array_equal(ps_c[0].detach().numpy(), ps_a[0].detach().numpy())


def test_optimizer_state_dict_keeps_hyperparameters():
    p = sg.tensor([1.0], requires_grad=True)
    opt = optim.SGD([p], lr=0.3, momentum=0.5)
    sd = opt.state_dict()
    p2 = sg.tensor([1.0], requires_grad=True)
    opt2 = optim.SGD([p2], lr=0.1)
    opt2.load_state_dict(sd)
    p2.grad = sg.tensor([1.0])
    opt2.step()
    np.testing.assert_allclose(p2.detach().numpy(), [1.0 - 0.3])


def test_optimizer_param_groups_like_torch():
    p, q = sg.tensor([1.0], requires_grad=True), sg.tensor([2.0], requires_grad=True)
    opt = optim.Adam([p, q], lr=0.01)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["betas"] == (0.9, 0.999)
    assert group["params"][0] is p and group["params"][1] is q


# ---------------------------------------------------------------- it learns


def xor_data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (200, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    return sg.tensor(x), sg.tensor(y)


def test_mlp_learns_xor_with_adam():
    """A 2-32-32-2 tanh MLP, full batch, Adam lr=0.02, 300 steps: cross-entropy < 0.05
    (torch reaches ~0.004 on the same setup) and all points classified right."""
    x, y = xor_data()
    gen = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Linear(2, 32, generator=gen),
        nn.Tanh(),
        nn.Linear(32, 32, generator=gen),
        nn.Tanh(),
        nn.Linear(32, 2, generator=gen),
    )
    opt = optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    accuracy = (model(x).detach().numpy().argmax(1) == y.detach().numpy()).mean()
    assert accuracy >= 0.98


def test_built_mlp_learns_xor_with_sgd_momentum():
    """The same problem through nn.build and SGD(lr=0.2, momentum=0.9): loss < 0.05."""
    x, y = xor_data()
    spec = [
        {"type": "linear", "out": 32},
        {"type": "tanh"},
        {"type": "linear", "out": 32},
        {"type": "tanh"},
        {"type": "linear", "out": 2},
    ]
    model = nn.build(spec, [2], seed=0)
    opt = optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (model(x).detach().numpy().argmax(1) == y.detach().numpy()).mean() >= 0.98
