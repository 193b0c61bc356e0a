"""Autograd semantics as PyTorch's: retain_grad, hooks, no_grad, detach, requires_grad
propagation, leaf .grad accumulation, freed graphs, version counters, higher order."""

import numpy as np
import pytest
from core_helpers import DTYPE_IDS, FLOAT_DTYPES, SG, assert_close, check, torch_lib

import shardgrad.core as sg
from shardgrad.core import functional as F
from shardgrad.core.autograd import grad

f64 = sg.float64


def t64(data, requires_grad=True):
    return sg.tensor(np.asarray(data, dtype=np.float64), requires_grad=requires_grad, dtype=f64)


# ---------------------------------------------------------------- requires_grad, leaves


def test_requires_grad_propagation_and_leaves():
    a = t64([1.0, 2.0])
    b = t64([3.0, 4.0], requires_grad=False)
    assert a.is_leaf and b.is_leaf and a.grad_fn is None
    c = a * b
    assert c.requires_grad and not c.is_leaf and c.grad_fn is not None
    d = b * 2.0
    assert not d.requires_grad and d.is_leaf and d.grad_fn is None
    e = d + c
    assert e.requires_grad
    b.requires_grad_()
    assert b.requires_grad and b.is_leaf
    f = b.exp()
    assert f.requires_grad
    g = sg.tensor([1.0, 2.0])
    assert not g.requires_grad
    assert g.requires_grad_() is g and g.requires_grad
    assert g.requires_grad_(False) is g and not g.requires_grad


def test_leaf_grad_accumulates_and_nonleaf_grad_is_not_kept():
    x = t64([1.0, 2.0, 3.0])
    y = x * 2.0
    (y * y).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 8.0 * np.array([1.0, 2.0, 3.0]))
    assert y.grad is None  # non-leaf without retain_grad()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 8.0 * np.array([1.0, 2.0, 3.0]) + 3.0)
    assert x.grad.dtype == np.float64 and not x.grad.requires_grad
    x.grad = None
    x.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0, 1.0, 1.0])


def test_retain_grad_on_non_leaf():
    x = t64([1.0, -2.0, 3.0])
    y = x * x
    y.retain_grad()
    z = y * 3.0
    z.retain_grad()
    z.sum().backward()
    np.testing.assert_allclose(z.grad.numpy(), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(y.grad.numpy(), [3.0, 3.0, 3.0])
    np.testing.assert_allclose(x.grad.numpy(), 6.0 * x.detach().numpy())


def test_data_is_always_an_ndarray_and_grads_can_be_zeroed_in_place():
    """.data is an ndarray also for 0-d results and 0-d gradients, so in-place ops on them
    (x.grad.zero_(), the PyTorch idiom) work."""
    x = sg.tensor(2.0, requires_grad=True)
    y = (x * x).sum()
    assert isinstance(y.data, np.ndarray) and y.data.shape == ()
    y.backward()
    assert isinstance(x.grad.data, np.ndarray), type(x.grad.data)
    x.grad.zero_()
    assert x.grad.item() == 0.0
    v = t64([1.0, 2.0])
    (v * v).sum().backward()
    v.grad.zero_()
    np.testing.assert_array_equal(v.grad.numpy(), [0.0, 0.0])


def test_backward_with_explicit_gradient():
    x = t64([[1.0, 2.0], [3.0, 4.0]])
    y = x * x
    y.backward(t64([[1.0, 0.0], [0.5, 2.0]], requires_grad=False))
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.detach().numpy() * [[1.0, 0.0], [0.5, 2.0]])


def test_gradient_dtype_follows_the_tensor():
    x = sg.tensor([1.0, 2.0], requires_grad=True)  # float32
    (x * 2.5 + x**2).sum().backward()
    assert x.grad.dtype == np.float32
    w = sg.tensor([1.0, 2.0], requires_grad=True, dtype=sg.float32)
    v = sg.tensor([3.0, 4.0], requires_grad=True, dtype=sg.float64)
    out = w * v
    assert out.dtype == np.float64
    out.sum().backward()
    assert w.grad.dtype == np.float32 and v.grad.dtype == np.float64
    np.testing.assert_allclose(w.grad.numpy(), [3.0, 4.0])


# ---------------------------------------------------------------- hooks


def test_hook_on_leaf_can_replace_gradient():
    x = t64([1.0, 2.0])
    seen = []

    def hook(g):
        seen.append(g.detach().numpy().copy())
        return g * 10.0

    x.register_hook(hook)
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(seen[0], [3.0, 3.0])
    np.testing.assert_allclose(x.grad.numpy(), [30.0, 30.0])


def test_hook_on_non_leaf_changes_upstream_gradient():
    x = t64([1.0, 2.0])
    y = x * 2.0
    seen = []
    y.register_hook(lambda g: seen.append(g.detach().numpy().copy()))  # returns None: observe only
    z = y * y
    z.register_hook(lambda g: g * 0.5)
    z.sum().backward()
    # dz/dy = 2y scaled by 0.5 -> y; then dy/dx = 2
    np.testing.assert_allclose(seen[0], 0.5 * 2 * np.array([2.0, 4.0]))
    np.testing.assert_allclose(x.grad.numpy(), 2.0 * np.array([2.0, 4.0]))


def test_hooks_match_torch(torch):
    def fn(m, x):
        y = x.tanh()
        y.register_hook(lambda g: g * 2.0 + 1.0)
        z = y * x
        z.register_hook(lambda g: g * g)
        return (z * 3.0).sum()

    check(fn, [np.array([[0.3, -1.2], [2.0, 0.5]])])


# ---------------------------------------------------------------- no_grad, detach


def test_no_grad_and_enable_grad():
    x = t64([1.0, 2.0])
    with sg.no_grad():
        y = x * 2.0
        assert not y.requires_grad and y.grad_fn is None
        with sg.enable_grad():
            z = x * 2.0
            assert z.requires_grad
        w = x.exp()
        assert not w.requires_grad
    assert (x * 2.0).requires_grad


def test_no_grad_as_decorator():
    x = t64([1.0, 2.0])

    @sg.no_grad()
    def f(t):
        return t * 3.0

    assert not f(x).requires_grad
    assert (x * 3.0).requires_grad


def test_no_grad_restored_after_exception():
    x = t64([1.0])
    with pytest.raises(KeyError), sg.no_grad():
        raise KeyError("boom")
    assert (x * 2.0).requires_grad


def test_detach():
    x = t64([1.0, 2.0])
    y = x * 2.0
    d = y.detach()
    assert not d.requires_grad and d.grad_fn is None and d.is_leaf
    np.testing.assert_array_equal(d.detach().numpy(), y.detach().numpy())
    assert np.shares_memory(d.data, y.data)  # torch: detach shares storage
    (x * d).sum().backward()  # no gradient through d
    np.testing.assert_allclose(x.grad.numpy(), d.detach().numpy())


# ---------------------------------------------------------------- graph lifetime


def test_second_backward_through_freed_graph_raises():
    x = t64([1.0, 2.0])
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        y.backward()


def test_second_backward_through_freed_intermediate_raises():
    x = t64([1.0, 2.0])
    h = x.exp()
    (h * h).sum().backward()
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        (h * 2.0).sum().backward()


def test_retain_graph_allows_second_backward():
    x = t64([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * 2 * np.array([1.0, 2.0]))


def test_backward_on_non_scalar_without_gradient_raises():
    x = t64([1.0, 2.0])
    with pytest.raises(
        RuntimeError, match="grad can be implicitly created only for scalar outputs"
    ):
        (x * 2.0).backward()


def test_backward_on_tensor_without_grad_raises():
    x = t64([1.0, 2.0], requires_grad=False)
    with pytest.raises(RuntimeError):
        x.sum().backward()


# ---------------------------------------------------------------- in-place and versions


def test_inplace_on_saved_non_leaf_raises():
    x = t64([1.0, 2.0])
    a = x * 2.0
    b = a * a  # saves a
    a.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()


def test_inplace_iadd_on_saved_tensor_raises():
    x = t64([1.0, 2.0])
    a = x * 2.0
    b = a.exp() * a
    a += 1.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()


def test_inplace_on_saved_constant_raises():
    x = t64([1.0, 2.0])
    w = t64([3.0, 4.0], requires_grad=False)
    y = x * w  # d/dx needs w
    w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inplace_on_saved_output_raises():
    x = t64([1.0, 2.0])
    y = x.exp()  # exp's derivative reads its output
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inplace_op_whose_rule_reads_the_overwritten_value_raises():
    x = t64([1.0, 2.0])
    w = t64([3.0, 4.0])
    a = x * 2.0
    a.mul_(w)  # w's gradient needs a's old value, which mul_ overwrote (as in PyTorch)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        a.sum().backward()


def test_inplace_op_whose_rules_need_no_old_value_is_fine():
    x = t64([1.0, 2.0])
    a = x * 2.0
    a.mul_(3.0)  # x's gradient needs only the constant
    a.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [6.0, 6.0])


def test_inplace_change_through_a_detached_alias_raises():
    x = t64([1.0, 2.0])
    a = x * 2.0
    b = a * a
    a.detach().add_(1.0)  # shares a's version counter, as in PyTorch
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()


def test_optimizer_step_between_forward_and_backward_raises():
    w = t64([1.0, 2.0])
    x = t64([3.0, 4.0])
    y = (w * x).sum()  # x's gradient needs w
    w.grad = sg.tensor([1.0, 1.0], dtype=np.float64)
    sg.optim.SGD([w], lr=0.1).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_change_before_the_forward_is_fine():
    x = t64([1.0, 2.0])
    a = x * 2.0
    a.add_(1.0)
    b = a * a  # saved after the change
    b.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [12.0, 20.0])


def test_inplace_on_unsaved_tensor_is_fine_and_correct(torch):
    def fn(m, x):
        a = x * 2.0
        b = a + 1.0  # add saves nothing
        a.mul_(3.0)
        c = a * a  # uses the new value: fine
        return (b + c).sum()

    check(fn, [np.array([1.0, -2.0, 0.5])])


def test_inplace_ops_update_values_and_versions():
    x = t64([1.0, 2.0], requires_grad=False)
    x.add_(1.0)
    x.mul_(2.0)
    np.testing.assert_allclose(x.detach().numpy(), [4.0, 6.0])
    x.copy_(t64([5.0, 7.0], requires_grad=False))
    np.testing.assert_allclose(x.detach().numpy(), [5.0, 7.0])
    x.zero_()
    np.testing.assert_allclose(x.detach().numpy(), [0.0, 0.0])
    x += 2.0
    x *= 3.0
    np.testing.assert_allclose(x.detach().numpy(), [6.0, 6.0])
    with sg.no_grad():
        y = t64([1.0, 2.0])
        y.sub_(t64([0.5, 0.5], requires_grad=False))  # like an optimizer step
    np.testing.assert_allclose(y.detach().numpy(), [0.5, 1.5])


def test_inplace_on_leaf_requiring_grad_raises():
    x = t64([1.0, 2.0])
    with pytest.raises(RuntimeError):
        x.add_(1.0)


# ---------------------------------------------------------------- autograd.grad


def test_grad_function_basic_and_no_accumulation():
    x = t64([1.0, 2.0])
    y = t64([3.0, 4.0])
    (gx, gy) = grad((x * y).sum(), [x, y])
    np.testing.assert_allclose(gx.detach().numpy(), [3.0, 4.0])
    np.testing.assert_allclose(gy.detach().numpy(), [1.0, 2.0])
    assert x.grad is None and y.grad is None
    (g,) = grad(x * 2.0, x, grad_outputs=t64([1.0, -1.0], requires_grad=False))
    np.testing.assert_allclose(g.detach().numpy(), [2.0, -2.0])


def test_grad_allow_unused():
    x, z = t64([1.0, 2.0]), t64([5.0])
    with pytest.raises(RuntimeError):
        grad((x * x).sum(), [x, z])
    gx, gz = grad((x * x).sum(), [x, z], allow_unused=True)
    np.testing.assert_allclose(gx.detach().numpy(), [2.0, 4.0])
    assert gz is None


def test_grad_retain_graph():
    x = t64([1.0, 2.0])
    y = (x * x).sum()
    grad(y, x, retain_graph=True)
    (g,) = grad(y, x)
    np.testing.assert_allclose(g.detach().numpy(), [2.0, 4.0])
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        grad(y, x)


# ---------------------------------------------------------------- second order


def test_second_derivative_of_cube_via_grad():
    x = sg.tensor(3.0, requires_grad=True, dtype=f64)
    y = x**3
    (g,) = grad(y, x, create_graph=True)
    assert g.item() == pytest.approx(27.0)
    assert g.requires_grad
    (g2,) = grad(g, x, create_graph=True)
    assert g2.item() == pytest.approx(18.0)
    (g3,) = grad(g2, x)
    assert g3.item() == pytest.approx(6.0)


def test_second_derivative_of_cube_via_backward():
    x = sg.tensor(3.0, requires_grad=True, dtype=f64)
    (x**3).backward(create_graph=True)
    g = x.grad
    assert g.item() == pytest.approx(27.0)
    assert g.requires_grad
    x.grad = None
    g.backward()
    assert x.grad.item() == pytest.approx(18.0)


def test_second_derivative_float32_default():
    x = sg.tensor(3.0, requires_grad=True)
    (g,) = grad(x**3, x, create_graph=True)
    (g2,) = grad(g, x)
    assert g2.item() == pytest.approx(18.0)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_backward_create_graph_accumulates_like_torch(torch):
    def fn(m, x):
        (x**3).sum().backward(create_graph=True)
        g = x.grad
        return (g * g).sum()

    T = torch_lib()
    xs = np.array([1.0, -2.0, 0.5])
    s, t = SG.leaf(xs), T.leaf(xs)
    ls, lt = fn(SG, s), fn(T, t)
    assert_close(ls, lt)
    ls.backward()
    lt.backward()
    assert_close(s.grad, t.grad)  # first-order grad + second-order contribution


SECOND_ORDER = {
    "mul_div": lambda m, x, y: (x * y / (y * y + 1.0)).sum(),
    "pow": lambda m, x, y: (x**3 + x**-1.0 * y**2).sum(),
    "exp_log": lambda m, x, y: (m.exp(x * 0.5) * m.log(y * y + 1.0)).sum(),
    "sqrt": lambda m, x, y: m.sqrt(x * x + y * y + 1.0).sum(),
    "tanh_sigmoid": lambda m, x, y: (x.tanh() * y.sigmoid()).sum(),
    "sin_cos": lambda m, x, y: (x.sin() * y.cos()).sum(),
    "matmul": lambda m, x, y: ((x @ y.T) ** 2).sum(),
    "sum_mean_var": lambda m, x, y: (x.sum(dim=1) * y.mean(dim=1) + x.var(dim=0)).sum() ** 2,
    "softmax": lambda m, x, y: (x.softmax(dim=1) * y).sum() ** 2,
    "log_softmax": lambda m, x, y: (m.F.log_softmax(x * y, dim=-1) ** 2).sum(),
    "logsumexp": lambda m, x, y: m.logsumexp(x * y, dim=0).sum() ** 2,
    "gelu": lambda m, x, y: (m.F.gelu(x) * y).sum() ** 2,
    "relu_max": lambda m, x, y: (m.relu(x) * m.maximum(x, y) * y).sum(),
    "abs_clamp": lambda m, x, y: (x.abs() * y.clamp(-0.5, 0.5) * x).sum(),
    "layer_norm": lambda m, x, y: (m.F.layer_norm(x, (x.shape[-1],)) * y).sum() ** 2,
    "cross_entropy": lambda m, x, y: m.F.cross_entropy(x * y, m.const(np.array([0, 2, 1]))),
    "mse": lambda m, x, y: m.F.mse_loss(x.tanh(), y),
    "bce": lambda m, x, y: m.F.binary_cross_entropy_with_logits(x * y, y.sigmoid().detach()),
    "indexing": lambda m, x, y: ((x[[0, 0, 2], 1:] * y[:, :2]) ** 2).sum(),
    "reshape_cat": lambda m, x, y: (m.cat([x, y], dim=0).reshape(-1, 3).T ** 3).sum(),
    "amax": lambda m, x, y: (x.amax(dim=1) * (x * y).sum(dim=1)).sum(),
}


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SECOND_ORDER))
def test_second_order_vs_torch(name, dtype, torch):
    """grad(f, create_graph=True), then the gradient of <grad f, v> (a Hessian-vector
    product), against torch."""
    fn = SECOND_ORDER[name]
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((3, 3)), rng.standard_normal((3, 3)) * 0.8 + 0.3
    v = [rng.standard_normal((3, 3)), rng.standard_normal((3, 3))]
    T = torch_lib()
    results = {}
    for m in (SG, T):
        x, y = m.leaf(xs.astype(dtype)), m.leaf(ys.astype(dtype))
        f = fn(m, x, y)
        gfn = grad if m is SG else torch.autograd.grad
        gx, gy = gfn(f, [x, y], create_graph=True)
        gv = (gx * m.const(v[0].astype(dtype))).sum() + (gy * m.const(v[1].astype(dtype))).sum()
        hx, hy = gfn(gv, [x, y], allow_unused=True)
        results[m.name] = [f, gx, gy, hx, hy]
    tols = {} if dtype == np.float64 else {"rtol": 1e-3, "atol": 1e-4}
    for k, what in enumerate(["f", "grad x", "grad y", "hvp x", "hvp y"]):
        s, t = results["sg"][k], results["torch"][k]
        if t is None:
            assert s is None or not np.any(s.detach().numpy()), what
            continue
        assert s is not None, f"{what}: None, torch has a value"
        assert_close(s, t, **tols, what=what)


@pytest.mark.oracle
def test_hessian_vector_product_of_mlp_vs_torch(torch):
    rng = np.random.default_rng(1)
    shapes = {"w1": (8, 4), "b1": (8,), "w2": (3, 8), "b2": (3,)}
    params = {k: rng.standard_normal(s) * 0.5 for k, s in shapes.items()}
    vecs = {k: rng.standard_normal(s) for k, s in shapes.items()}
    x = rng.standard_normal((6, 4))
    target = rng.integers(0, 3, 6)
    T = torch_lib()
    res = {}
    for m in (SG, T):
        ps = {k: m.leaf(v) for k, v in params.items()}
        h = m.tanh(m.const(x) @ ps["w1"].T + ps["b1"])
        logits = h @ ps["w2"].T + ps["b2"]
        loss = m.F.cross_entropy(logits, m.const(target)) + (ps["w1"] ** 2).sum() * 1e-2
        gfn = grad if m is SG else torch.autograd.grad
        gs = gfn(loss, list(ps.values()), create_graph=True)
        gv = sum(
            ((g * m.const(vecs[k])).sum() for g, k in zip(gs, ps, strict=True)),
            start=m.const(np.array(0.0)),
        )
        hv = gfn(gv, list(ps.values()))
        res[m.name] = (loss, gs, hv)
    assert_close(res["sg"][0], res["torch"][0], what="loss")
    for k, (gs, gt) in enumerate(zip(res["sg"][1], res["torch"][1], strict=True)):
        assert_close(gs, gt, what=f"grad {k}")
    for k, (hs, ht) in enumerate(zip(res["sg"][2], res["torch"][2], strict=True)):
        assert_close(hs, ht, what=f"hvp {k}")


def test_hvp_of_quadratic_is_exact():
    a = np.array([[2.0, 1.0], [1.0, 3.0]])
    x = t64([1.0, -1.0])
    f = (x @ sg.tensor(a, dtype=f64) @ x) * 0.5
    (g,) = grad(f, x, create_graph=True)
    np.testing.assert_allclose(g.detach().numpy(), a @ np.array([1.0, -1.0]))
    v = np.array([0.3, 0.7])
    (hv,) = grad((g * sg.tensor(v, dtype=f64)).sum(), x)
    np.testing.assert_allclose(hv.detach().numpy(), a @ v)


def test_first_grad_without_create_graph_is_constant():
    x = t64([1.0, 2.0])
    (g,) = grad((x**3).sum(), x)
    assert not g.requires_grad and g.grad_fn is None


# ---------------------------------------------------------------- dtype promotion


def test_dtype_promotion_like_torch(torch):
    a32 = sg.tensor([1.0, 2.0], dtype=sg.float32)
    a64 = sg.tensor([1.0, 2.0], dtype=sg.float64)
    assert (a32 * 2.5).dtype == np.float32
    assert (2.5 * a32).dtype == np.float32
    assert (a32 / 3).dtype == np.float32
    assert (a32**2.0).dtype == np.float32
    assert (1.0 - a32).dtype == np.float32
    assert (a32 + a64).dtype == np.float64
    assert (a64 * a32).dtype == np.float64
    assert (a64 * 2.5).dtype == np.float64
    assert sg.maximum(a32, a64).dtype == np.float64
    assert (a32 > 1.0).dtype == np.bool_
    ints = sg.tensor([1, 2])
    assert ints.dtype == np.int64
    assert (ints * 2.5).dtype == np.float32  # as torch: int tensor * float -> default float
    assert (ints * 2).dtype == np.int64
    assert a32.exp().dtype == np.float32 and a32.mean().dtype == np.float32
    assert a32.var().dtype == np.float32 and F.softmax(a32, dim=0).dtype == np.float32
    assert sg.tensor(np.array([1.0, 2.0])).dtype == np.float64  # ndarray keeps its dtype
    for expr in ["a * 2.5", "a + b", "a / 3", "a ** 2.0", "1.0 - a", "ints * 2.5"]:
        env_sg = {"a": a32, "b": a64, "ints": ints}
        env_t = {
            "a": torch.tensor([1.0, 2.0], dtype=torch.float32),
            "b": torch.tensor([1.0, 2.0], dtype=torch.float64),
            "ints": torch.tensor([1, 2]),
        }
        assert_close(eval(expr, env_sg), eval(expr, env_t), what=expr)
