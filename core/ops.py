"""The derivative table: every primitive op is a NumPy forward plus one vector-Jacobian
rule per input, in one place.

A rule is `vjp(xp, g, out, *inputs, **params) -> gradient for that input`. The engine calls
it with `xp = NP` and ndarrays on the fast path, and with `xp = T` (the same names, built
from these very ops) and Tensors under `create_graph=True`, so one rule serves both and
higher-order gradients come for free. Rules call `xp.<op>(tensors..., param=...)`: tensors
positional, parameters by keyword. Gradients may come back broadcast; the engine sums them
back to each input's shape (`sum_to`), so rules never unbroadcast by hand.

`saves` says, per input, which values its rule reads ("0", "1", ... inputs, "o" the output);
the engine version-checks just those, so an in-place change of a value no rule needs is
allowed, as in PyTorch.
"""

import math

import numpy as np

from . import special

OPS: dict[str, "Op"] = {}


class Op:
    __slots__ = ("name", "forward", "vjps", "saves", "saves_any", "uses_out", "variadic")

    def __init__(self, name, forward, vjps, saves, variadic):
        self.name, self.forward, self.vjps, self.variadic = name, forward, vjps, variadic
        # per input: the indices its rule reads, -1 for the output
        self.saves = tuple(tuple(-1 if c == "o" else int(c) for c in s) for s in saves)
        self.saves_any = any(self.saves)
        self.uses_out = any(-1 in s for s in self.saves)


def defop(name, forward, *vjps, saves=None, variadic=False):
    """Register op `name`. `saves` defaults to: every rule reads every input."""
    if saves is None:
        saves = ("0123456789",) * max(1, len(vjps))
    OPS[name] = Op(name, forward, vjps, saves, variadic)
    return OPS[name]


class _Namespace:
    """`xp` for rules: attribute per op, plus a few helpers that are not ops."""

    def __init__(self, fns):
        self.__dict__.update(fns)


def _axes(dim, ndim):
    if dim is None:
        return tuple(range(ndim))
    dims = dim if isinstance(dim, tuple | list) else (dim,)
    return tuple(sorted(d % ndim if ndim else 0 for d in dims))


# ---- shape helpers used by the forwards ------------------------------------------------------


def sum_to(x, shape):
    """The adjoint of broadcast is sum: add up the axes broadcasting created."""
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    kept = ()  # the size-1 axes of `shape` that broadcasting stretched (a bias has none)
    if 1 in shape:
        kept = tuple(i + lead for i, n in enumerate(shape) if n == 1 and x.shape[i + lead] != 1)
    if lead and not kept:  # leading axes only (a bias): no reshape, so .grad needs no copy
        return np.asarray(x.sum(axis=tuple(range(lead))))
    out = x.sum(axis=tuple(range(lead)) + kept, keepdims=True)
    return np.asarray(out.reshape(shape) if lead else out)


def expand_reduced(g, shape, dim=None, keepdim=False):
    """Broadcast the gradient of a reduction over `dim` back to the input's shape."""
    if not keepdim and dim is not None:
        g = np.expand_dims(g, _axes(dim, len(shape)))
    elif not keepdim:
        g = np.reshape(g, (1,) * len(shape))
    return np.broadcast_to(g, shape)


def _unfold2d(x, kernel, stride):
    """(N, C, H, W) -> (N, C, OH, OW, kh, kw) windows: a strided view, no copy, no loop."""
    w = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))
    return w[:, :, :: stride[0], :: stride[1]]


def _fold2d(g, size, stride):
    """Adjoint of _unfold2d: add each window back where it came from (a loop over the
    kh*kw kernel offsets, never over pixels)."""
    n, c, oh, ow, kh, kw = g.shape
    out = np.zeros((n, c) + tuple(size), dtype=g.dtype)
    sh, sw = stride
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw] += g[:, :, :, :, i, j]
    return out


def _index_add(g, shape, index):
    """Adjoint of indexing: scatter-add g into zeros (np.add.at sums repeated indices)."""
    out = np.zeros(shape, dtype=g.dtype)
    if _is_basic(index):
        out[index] = g
    else:
        np.add.at(out, index, g)
    return out


def _is_basic(index):
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)


def _put_along(g, shape, indices, dim):
    out = np.zeros(shape, dtype=g.dtype)
    np.put_along_axis(out, indices, g, axis=dim)
    return out


def _pad(x, pad, value=0.0):
    # torch order: (last_lo, last_hi, second_last_lo, ...)
    widths = [(0, 0)] * x.ndim
    for k in range(len(pad) // 2):
        widths[x.ndim - 1 - k] = (pad[2 * k], pad[2 * k + 1])
    return np.pad(x, widths, constant_values=value)


def _unpad(pad, ndim):
    index = [slice(None)] * ndim
    for k in range(len(pad) // 2):
        index[ndim - 1 - k] = slice(pad[2 * k], -pad[2 * k + 1] or None)
    return tuple(index)


def _softmax(x, dim):
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)


def _log_softmax(x, dim):
    z = x - x.max(axis=dim, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=dim, keepdims=True))


def _cross_entropy_sum(logits, target):
    """Sum over samples of -log softmax(logits)[target] (fused and stable). Logits
    (..., m, classes) with targets (..., m) give one sum per leading index (micro-batch)."""
    z = _log_softmax(logits, -1)
    picked = _rows(z)[np.arange(target.size), target.reshape(-1)].reshape(target.shape)
    return np.asarray(-picked.sum(axis=-1), dtype=logits.dtype)


def _onehot(target, like):
    out = np.zeros(like.shape, dtype=like.dtype)
    _rows(out)[np.arange(target.size), target.reshape(-1)] = 1
    return out


def _rows(x):
    """x as (rows, classes), a view: one row per target. Indexing it with (row, class)
    pairs picks what take_along_axis / put_along_axis would, without the index arrays those
    build in Python (a few µs per call, at every step)."""
    return x.reshape(-1, x.shape[-1])


def _erf(x):
    return special.erf(x).astype(x.dtype, copy=False)


def _mask(cond, dtype):
    return cond.astype(dtype)


# ---- the table -------------------------------------------------------------------------------
# Elementwise arithmetic (broadcasting is undone by the engine's sum_to).
defop("add", np.add, lambda xp, g, o, a, b: g, lambda xp, g, o, a, b: g, saves=("", ""))
defop("sub", np.subtract, lambda xp, g, o, a, b: g, lambda xp, g, o, a, b: -g, saves=("", ""))
defop("neg", np.negative, lambda xp, g, o, a: -g, saves=("",))
defop(
    "mul", np.multiply, lambda xp, g, o, a, b: g * b, lambda xp, g, o, a, b: g * a, saves=("1", "0")
)
defop(
    "div",
    np.true_divide,
    lambda xp, g, o, a, b: g / b,
    lambda xp, g, o, a, b: -g * a / (b * b),
    saves=("1", "01"),
)
defop(
    "pow",
    np.power,
    lambda xp, g, o, a, b: g * b * a ** (b - 1),
    lambda xp, g, o, a, b: g * o * xp.log(xp.where(a, 1.0, cond=np.asarray(xp.raw(a)) > 0)),
    saves=("01", "0o"),
)
defop("exp", np.exp, lambda xp, g, o, a: g * o, saves=("o",))
defop("log", np.log, lambda xp, g, o, a: g / a, saves=("0",))
defop("sqrt", np.sqrt, lambda xp, g, o, a: g / (2 * o), saves=("o",))
defop("abs", np.abs, lambda xp, g, o, a: g * np.sign(xp.raw(a)), saves=("0",))
defop("sin", np.sin, lambda xp, g, o, a: g * xp.cos(a), saves=("0",))
defop("cos", np.cos, lambda xp, g, o, a: -g * xp.sin(a), saves=("0",))
defop("tanh", np.tanh, lambda xp, g, o, a: g * (1 - o * o), saves=("o",))
defop(
    "sigmoid",
    lambda a: np.asarray(0.5 * (1 + np.tanh(0.5 * a)), dtype=a.dtype),
    lambda xp, g, o, a: g * o * (1 - o),
    saves=("o",),
)
defop(
    "relu",
    lambda a: np.maximum(a, 0, dtype=a.dtype),
    lambda xp, g, o, a: g * (xp.raw(a) > 0),  # float * bool: one pass, dtype kept
    saves=("0",),
)
defop(
    "erf",
    _erf,
    lambda xp, g, o, a: g * (2 / math.sqrt(math.pi)) * xp.exp(-(a * a)),
    saves=("0",),
)


def _clamp_mask(a, min, max, dtype):
    # Gradient passes where min <= a <= max, boundaries included (PyTorch).
    keep = np.ones(a.shape, dtype=bool)
    if min is not None:
        keep &= a >= min
    if max is not None:
        keep &= a <= max
    return _mask(keep, dtype)


defop(
    "clamp",
    lambda a, min=None, max=None: np.clip(a, min, max).astype(a.dtype, copy=False),
    lambda xp, g, o, a, min=None, max=None: g * _clamp_mask(xp.raw(a), min, max, xp.raw(g).dtype),
    saves=("0",),
)


def _tie(a, b, dtype):
    """maximum/minimum gradient: all to the winner, split 0.5/0.5 on a tie (PyTorch)."""
    return _mask(a > b, dtype) + 0.5 * _mask(a == b, dtype)


defop(
    "maximum",
    np.maximum,
    lambda xp, g, o, a, b: g * _tie(xp.raw(a), xp.raw(b), xp.raw(g).dtype),
    lambda xp, g, o, a, b: g * _tie(xp.raw(b), xp.raw(a), xp.raw(g).dtype),
    saves=("01", "01"),
)
defop(
    "minimum",
    np.minimum,
    lambda xp, g, o, a, b: g * _tie(xp.raw(b), xp.raw(a), xp.raw(g).dtype),
    lambda xp, g, o, a, b: g * _tie(xp.raw(a), xp.raw(b), xp.raw(g).dtype),
    saves=("01", "01"),
)
defop(
    "where",
    lambda a, b, cond: np.where(cond, a, b),
    lambda xp, g, o, a, b, cond: xp.where(g, 0.0, cond=cond),
    lambda xp, g, o, a, b, cond: xp.where(0.0, g, cond=cond),
    saves=("", ""),
)

# Reductions.
defop(
    "sum",
    lambda a, dim=None, keepdim=False: np.sum(a, axis=dim, keepdims=keepdim),
    lambda xp, g, o, a, dim=None, keepdim=False: xp.expand_reduced(
        g, shape=a.shape, dim=dim, keepdim=keepdim
    ),
    saves=("",),
)


def _amax_vjp(xp, g, o, a, dim=None, keepdim=False):
    # Ties share the gradient evenly (PyTorch's amax/amin and full max()/min()).
    ra, ro = xp.raw(a), xp.raw(o)
    ro = ro if keepdim or dim is None else np.expand_dims(ro, _axes(dim, ra.ndim))
    hit = _mask(ra == ro, ra.dtype)
    share = hit / hit.sum(axis=_axes(dim, ra.ndim), keepdims=True)
    return xp.expand_reduced(g, shape=a.shape, dim=dim, keepdim=keepdim) * share


defop(
    "amax",
    lambda a, dim=None, keepdim=False: np.amax(a, axis=dim, keepdims=keepdim),
    _amax_vjp,
    saves=("0o",),
)
defop(
    "amin",
    lambda a, dim=None, keepdim=False: np.amin(a, axis=dim, keepdims=keepdim),
    _amax_vjp,
    saves=("0o",),
)
defop(
    "expand_reduced",
    expand_reduced,
    lambda xp, g, o, a, shape, dim=None, keepdim=False: (
        xp.sum(g, dim=dim, keepdim=keepdim)
        if dim is not None
        else xp.reshape(xp.sum(g), shape=a.shape)
    ),
    saves=("",),
)

# Shape ops: their rules are the inverse reshaping.
defop(
    "reshape",
    lambda a, shape: np.reshape(a, shape),
    lambda xp, g, o, a, shape: xp.reshape(g, shape=a.shape),
    saves=("",),
)
defop(
    "permute",
    lambda a, axes: np.transpose(a, axes),
    lambda xp, g, o, a, axes: xp.permute(g, axes=tuple(np.argsort(axes))),
    saves=("",),
)
defop(
    "expand",
    lambda a, shape: np.broadcast_to(a, shape),
    lambda xp, g, o, a, shape: xp.sum_to(g, shape=a.shape),
    saves=("",),
)
defop("sum_to", sum_to, lambda xp, g, o, a, shape: xp.expand(g, shape=a.shape), saves=("",))
defop(
    "getitem",
    lambda a, index: a[index],
    lambda xp, g, o, a, index: xp.index_add(g, shape=a.shape, index=index),
    saves=("",),
)
defop(
    "index_add",
    _index_add,
    lambda xp, g, o, a, shape, index: xp.getitem(g, index=index),
    saves=("",),
)
defop(
    "take_along",
    lambda a, indices, dim: np.take_along_axis(a, indices, axis=dim),
    lambda xp, g, o, a, indices, dim: xp.put_along(g, shape=a.shape, indices=indices, dim=dim),
    saves=("",),
)
defop(
    "put_along",
    _put_along,
    lambda xp, g, o, a, shape, indices, dim: xp.take_along(g, indices=indices, dim=dim),
    saves=("",),
)
defop(
    "pad",
    _pad,
    lambda xp, g, o, a, pad, value=0.0: xp.getitem(g, index=_unpad(pad, a.ndim)),
    saves=("",),
)


def _cat_vjp(i, xp, g, o, *xs, dim):
    start = sum(x.shape[dim] for x in xs[:i])
    index = (slice(None),) * (dim % g.ndim) + (slice(start, start + xs[i].shape[dim]),)
    return xp.getitem(g, index=index)


def _stack_vjp(i, xp, g, o, *xs, dim):
    return xp.getitem(g, index=(slice(None),) * (dim % g.ndim) + (i,))


defop("cat", lambda *xs, dim: np.concatenate(xs, axis=dim), _cat_vjp, saves=("",), variadic=True)
defop("stack", lambda *xs, dim: np.stack(xs, axis=dim), _stack_vjp, saves=("",), variadic=True)

# Linear algebra.


def _matmul_vjp_a(xp, g, o, a, b):
    if b.ndim == 1:  # (..., m, k) @ (k,) -> (..., m)
        return xp.unsqueeze(g, dim=-1) * b
    if a.ndim == 1:  # (k,) @ (..., k, n) -> (..., n)
        return xp.matmul(xp.unsqueeze(g, dim=-2), xp.mT(b))
    return xp.matmul(g, xp.mT(b))


def _matmul_vjp_b(xp, g, o, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * a
    if b.ndim == 1:
        return xp.unsqueeze(g, dim=-1) * a
    if a.ndim == 1:
        return xp.unsqueeze(a, dim=-1) * xp.unsqueeze(g, dim=-2)
    return xp.matmul(xp.mT(a), g)


defop("matmul", np.matmul, _matmul_vjp_a, _matmul_vjp_b, saves=("1", "0"))


# A weight (out, in) is PyTorch's linear. A stacked weight (k, out, in) with x (k, n, in)
# and bias (k, out) is k micro-batches at once: slice i of everything is micro-batch i, and
# every product is one batched (3-D) matmul, which computes each slice exactly as it would
# alone, so a micro-batch's bits do not depend on k (docs/architecture.md).
#
# With a few rows and a big weight, OpenBLAS spends most of x @ w^T packing the transposed
# weight: w @ x^T, made contiguous again, is up to 2x faster for 2..32 rows on AVX-512
# kernels (slower with more rows or a small weight; benchmarks/core_step.py), 5-10 % on
# Haswell's. The two orders can differ in bits (they do on Haswell's kernels), so the choice
# is a function of one micro-batch's shapes alone, never of k (tests/test_batched.py).
def _w_first(x_shape, w_shape) -> bool:
    """Whether `_linear` computes w @ x^T: one micro-batch's x (rows, in), or k of them
    stacked (k, rows, in) with a stacked weight, with 2..32 rows and a weight of at least
    128 x 256."""
    if len(x_shape) != len(w_shape):
        return False
    out, inp = w_shape[-2:]
    return 2 <= x_shape[-2] <= 32 and min(out, inp) >= 128 and out * inp >= 1 << 15


def x_wT(x, w):
    """x @ w^T over the last two axes, in the GEMM order `_w_first` picks: plain NumPy,
    which the hand-written benchmark steps use too."""
    if _w_first(x.shape, w.shape):
        return np.ascontiguousarray(np.matmul(w, x.swapaxes(-1, -2)).swapaxes(-1, -2))
    return np.matmul(x, w.swapaxes(-1, -2))  # the method: np.swapaxes' wrapper costs more


def _linear(x, w, b=None):
    out = x_wT(x, w)
    if b is not None:
        out += b if w.ndim == 2 else b[:, None, :]
    return out


def _linear_vjp_w(xp, g, o, x, w, b=None):
    if w.ndim == 3:  # stacked: one (out, n) @ (n, in) per micro-batch
        return xp.matmul(xp.mT(g), x)
    # (out, batch) @ (batch, in): the weight's gradient comes out contiguous, like the weight.
    g2 = g if g.ndim == 2 else xp.reshape(g, shape=(-1, g.shape[-1]))
    x2 = x if x.ndim == 2 else xp.reshape(x, shape=(-1, x.shape[-1]))
    return xp.matmul(xp.mT(g2), x2)


defop(
    "linear",
    _linear,
    lambda xp, g, o, x, w, b=None: xp.matmul(g, w),
    _linear_vjp_w,
    # stacked: sum over each micro-batch's own rows (sum_to would align the wrong axes)
    lambda xp, g, o, x, w, b=None: xp.sum(g, dim=(1,)) if w.ndim == 3 else g,
    saves=("1", "0", ""),
)
defop("mT", lambda a: np.swapaxes(a, -1, -2), lambda xp, g, o, a: xp.mT(g), saves=("",))
defop("clone", np.copy, lambda xp, g, o, a: g, saves=("",))
defop(
    "bce_with_logits",
    lambda x, y: np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))),
    lambda xp, g, o, x, y: g * (xp.sigmoid(x) - y),
    lambda xp, g, o, x, y: -g * x,
    saves=("01", "0"),
)
defop(
    "cast",
    lambda a, dtype: a.astype(dtype),
    lambda xp, g, o, a, dtype: xp.cast(g, dtype=a.dtype),
    saves=("",),
)
defop(
    "unsqueeze",
    lambda a, dim: np.expand_dims(a, dim),
    lambda xp, g, o, a, dim: xp.reshape(g, shape=a.shape),
    saves=("",),
)

# Convolution pieces: windows as a strided view, and its adjoint.
defop(
    "unfold2d",
    _unfold2d,
    lambda xp, g, o, a, kernel, stride: xp.fold2d(g, size=a.shape[2:], stride=stride),
    saves=("",),
)
defop(
    "fold2d",
    _fold2d,
    lambda xp, g, o, a, size, stride: xp.unfold2d(g, kernel=a.shape[4:], stride=stride),
    saves=("",),
)

# Fused, numerically stable softmax family (max subtracted).
defop(
    "softmax",
    _softmax,
    lambda xp, g, o, a, dim: o * (g - xp.sum(g * o, dim=dim, keepdim=True)),
    saves=("o",),
)
defop(
    "log_softmax",
    _log_softmax,
    lambda xp, g, o, a, dim: g - xp.exp(o) * xp.sum(g, dim=dim, keepdim=True),
    saves=("o",),
)
defop(
    "cross_entropy_sum",
    lambda logits, target: _cross_entropy_sum(logits, target),
    lambda xp, g, o, a, target: (
        (g if g.ndim == 0 else xp.reshape(g, shape=g.shape + (1, 1)))
        * (xp.softmax(a, dim=-1) - _onehot(target, xp.raw(a)))
    ),
    saves=("0",),
)


def _raw(x):
    return x


NP = _Namespace({name: op.forward for name, op in OPS.items()} | {"raw": _raw})
