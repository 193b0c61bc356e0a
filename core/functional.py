"""The functional API (PyTorch's `torch.*` / `torch.nn.functional` names) and the Tensor
methods built from it. Composite functions are written in terms of the primitive ops, so
they differentiate to any order without rules of their own."""

import math
from collections import namedtuple

import numpy as np

from .ops import OPS
from .tensor import Tensor, apply, matmul, reduce_dims

_values_indices = namedtuple("return_types", ["values", "indices"])


def _t(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def _unary(name):
    op = OPS[name]
    fn = lambda x: apply(op, x)
    fn.__name__ = name
    return fn


exp, log, sqrt, abs, sin, cos, tanh, sigmoid, relu, erf = (
    _unary(n) for n in ("exp", "log", "sqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "erf")
)
square = lambda x: x * x


def pow(x, exponent):
    return apply(OPS["pow"], x, exponent)


def clamp(x, min=None, max=None):
    return apply(OPS["clamp"], x, min=min, max=max)


def maximum(a, b):
    return apply(OPS["maximum"], a, b)


def minimum(a, b):
    return apply(OPS["minimum"], a, b)


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else np.asarray(cond)
    return apply(OPS["where"], a, b, cond=cond.astype(bool))


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1 + erf(x * (1 / math.sqrt(2))))


# ---- reductions ---------------------------------------------------------------------------


def sum(x, dim=None, keepdim=False):
    return apply(OPS["sum"], x, dim=reduce_dims(dim, x.ndim), keepdim=keepdim)


def _count(x, dim):
    return x.data.size if dim is None else math.prod(x.shape[d] for d in reduce_dims(dim, x.ndim))


def mean(x, dim=None, keepdim=False):
    if x.dtype.kind not in "fc":
        raise RuntimeError(f"mean(): could not infer output dtype; input dtype is {x.dtype}")
    return sum(x, dim, keepdim) * (1.0 / _count(x, dim))


def var(x, dim=None, unbiased=True, keepdim=False, correction=None):
    correction = (1 if unbiased else 0) if correction is None else correction
    d = x - mean(x, dim, keepdim=True)
    dof = _count(x, dim) - correction
    return sum(d * d, dim, keepdim) * (1.0 / dof if dof > 0 else float("nan"))  # torch: nan


def std(x, dim=None, unbiased=True, keepdim=False, correction=None):
    return sqrt(var(x, dim, unbiased, keepdim, correction))


def amax(x, dim=None, keepdim=False):
    return apply(OPS["amax"], x, dim=reduce_dims(dim, x.ndim), keepdim=keepdim)


def amin(x, dim=None, keepdim=False):
    return apply(OPS["amin"], x, dim=reduce_dims(dim, x.ndim), keepdim=keepdim)


def _select(x, dim, keepdim, arg):
    index = arg(x.data, axis=dim, keepdims=True)
    values = apply(OPS["take_along"], x, indices=index, dim=dim)
    if not keepdim:
        values, index = squeeze(values, dim), np.squeeze(index, axis=dim)
    return _values_indices(values, Tensor._wrap(index))


def max(x, dim=None, keepdim=False):
    """max(x) -> the largest value; max(x, dim) -> (values, indices), as in PyTorch."""
    if isinstance(dim, Tensor):
        return maximum(x, dim)
    return amax(x) if dim is None else _select(x, dim, keepdim, np.argmax)


def min(x, dim=None, keepdim=False):
    if isinstance(dim, Tensor):
        return minimum(x, dim)
    return amin(x) if dim is None else _select(x, dim, keepdim, np.argmin)


def argmax(x, dim=None, keepdim=False):
    return Tensor._wrap(np.asarray(np.argmax(x.data, axis=dim, keepdims=keepdim)))


def argmin(x, dim=None, keepdim=False):
    return Tensor._wrap(np.asarray(np.argmin(x.data, axis=dim, keepdims=keepdim)))


def logsumexp(x, dim, keepdim=False):
    m = amax(x, dim, keepdim=True).detach()  # the stabiliser: a constant shift
    out = log(sum(exp(x - m), dim, keepdim=True)) + m
    return out if keepdim else squeeze(out, dim)


def softmax(x, dim):
    return apply(OPS["softmax"], x, dim=dim)


def log_softmax(x, dim):
    return apply(OPS["log_softmax"], x, dim=dim)


# ---- shapes -------------------------------------------------------------------------------


def _shape_arg(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape


def reshape(x, *shape):
    shape = _shape_arg(shape)
    try:
        np.empty(x.shape, dtype=np.bool_).reshape(shape)  # validate without touching data
    except ValueError:
        raise ValueError(
            f"reshape: shape {tuple(shape)} is invalid for input of shape {tuple(x.shape)} "
            f"({x.data.size} elements)"
        ) from None
    return apply(OPS["reshape"], x, shape=tuple(shape))


view = reshape


def flatten(x, start_dim=0, end_dim=-1):
    if x.ndim == 0:
        return reshape(x, 1)
    s, e = start_dim % x.ndim, end_dim % x.ndim
    return reshape(x, x.shape[:s] + (-1,) + x.shape[e + 1 :])


def permute(x, *dims):
    dims = tuple(d % x.ndim for d in _shape_arg(dims))
    return apply(OPS["permute"], x, axes=dims)


def transpose(x, dim0, dim1):
    axes = list(range(x.ndim))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return apply(OPS["permute"], x, axes=tuple(axes))


def squeeze(x, dim=None):
    if dim is None:
        shape = tuple(n for n in x.shape if n != 1)
    else:
        dims = reduce_dims(dim, x.ndim)
        shape = tuple(n for i, n in enumerate(x.shape) if not (i in dims and n == 1))
    return apply(OPS["reshape"], x, shape=shape)


def unsqueeze(x, dim):
    return apply(OPS["unsqueeze"], x, dim=dim % (x.ndim + 1))


def expand(x, *sizes):
    sizes = _shape_arg(sizes)
    lead = len(sizes) - x.ndim
    shape = tuple(x.shape[i - lead] if n == -1 else n for i, n in enumerate(sizes))
    return apply(OPS["expand"], x, shape=shape)


def cat(tensors, dim=0):
    return apply(OPS["cat"], *tensors, dim=dim)


def stack(tensors, dim=0):
    return apply(OPS["stack"], *tensors, dim=dim)


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}  # torch: numpy


def pad(x, pad, mode="constant", value=0.0):
    if mode == "constant":
        return apply(OPS["pad"], x, pad=tuple(pad), value=value)
    if mode not in _PAD_MODES:
        raise ValueError(
            f"pad: mode must be 'constant', 'reflect', 'replicate' or 'circular', got {mode!r}"
        )
    pad = tuple(pad)
    if len(pad) % 2 or len(pad) // 2 > x.ndim or any(type(p) is not int or p < 0 for p in pad):
        raise ValueError(
            f"pad: expected pairs of integers >= 0 for at most {x.ndim} dims, got {pad}"
        )
    # One gather per padded dim (numpy's pad of the index range gives torch's indices); its
    # backward is the scatter-add of getitem, so edge gradients are summed as in torch.
    for k in range(len(pad) // 2):
        dim, (lo, hi) = x.ndim - 1 - k, pad[2 * k : 2 * k + 2]
        n = x.shape[dim]
        if (mode == "reflect" and (lo >= n or hi >= n)) or (
            mode == "circular" and (lo > n or hi > n)
        ):
            raise ValueError(
                f"pad: {mode} padding ({lo}, {hi}) must be smaller than dimension {dim} "
                f"of size {n}" + (" (or equal, for circular)" if mode == "circular" else "")
            )
        if lo or hi:
            idx = np.pad(np.arange(n), (lo, hi), mode=_PAD_MODES[mode])
            x = x[(slice(None),) * dim + (idx,)]
    return x


def clone(x):
    return apply(OPS["clone"], x)


def to(x, dtype):
    dtype = np.dtype(dtype)
    return x if x.dtype == dtype else apply(OPS["cast"], x, dtype=dtype)


# ---- neural-network functions -------------------------------------------------------------


def linear(x, weight, bias=None):
    """PyTorch's linear; a stacked weight (k, out, in) (and bias (k, out)) takes input
    (k, ..., in): k micro-batches, each with its own copy of the parameters."""
    if x.shape[-1:] != weight.shape[-1:] or (weight.ndim == 3 and x.shape[:1] != weight.shape[:1]):
        raise ValueError(
            f"linear: input of shape {tuple(x.shape)} does not fit weight of shape "
            f"{tuple(weight.shape)} (last sizes must match; a stacked weight (k, out, in) "
            "takes input (k, ..., in))"
        )
    if weight.ndim == 3 and x.ndim != 3:  # one (n, in) matrix per micro-batch
        lead = x.shape[:-1]
        return reshape(linear(reshape(x, lead[0], -1, x.shape[-1]), weight, bias), *lead, -1)
    args = (x, weight) if bias is None else (x, weight, bias)
    return apply(OPS["linear"], *args)


def _pair(v):
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def _windows(x, kernel, stride, padding, name):
    if x.ndim != 4:
        raise ValueError(f"{name}: expected input of shape (N, C, H, W), got {tuple(x.shape)}")
    ph, pw = _pair(padding)
    if ph or pw:
        x = pad(x, (pw, pw, ph, ph))
    kernel, stride = _pair(kernel), _pair(stride)
    if x.shape[2] < kernel[0] or x.shape[3] < kernel[1]:
        raise ValueError(
            f"{name}: kernel {kernel} is larger than the (padded) input {tuple(x.shape[2:])}"
        )
    return apply(OPS["unfold2d"], x, kernel=kernel, stride=stride)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """Convolution as windows (a strided view) times the flattened kernel: one matmul.
    A stacked weight (k, out, C, kh, kw) (and bias (k, out)) takes input (k, N, C, H, W):
    k micro-batches, one batched matmul."""
    if weight.ndim == 5 and x.ndim == 5 and x.shape[:3:2] == weight.shape[:3:2]:  # k and C
        return _conv2d_stacked(x, weight, bias, stride, padding)
    if weight.ndim != 4 or x.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"conv2d: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit: "
            "expected input (N, C, H, W) and weight (out, C, kh, kw) with the same C"
        )
    o, c, kh, kw = weight.shape
    w = _windows(x, (kh, kw), stride, padding, "conv2d")  # (N, C, OH, OW, kh, kw)
    n, _, oh, ow = w.shape[:4]
    cols = reshape(permute(w, 0, 2, 3, 1, 4, 5), n * oh * ow, c * kh * kw)
    out = matmul(cols, reshape(weight, o, c * kh * kw).mT)
    if bias is not None:
        out = out + bias
    return permute(reshape(out, n, oh, ow, o), 0, 3, 1, 2)


def _conv2d_stacked(x, weight, bias, stride, padding):
    k, o, c, kh, kw = weight.shape
    # The windows of all k*N images at once: pure data movement, so no bits depend on k.
    w = _windows(reshape(x, -1, *x.shape[2:]), (kh, kw), stride, padding, "conv2d")
    n, oh, ow = x.shape[1], w.shape[2], w.shape[3]
    cols = reshape(permute(w, 0, 2, 3, 1, 4, 5), k, n * oh * ow, c * kh * kw)
    out = matmul(cols, reshape(weight, k, o, c * kh * kw).mT)  # (k, N*OH*OW, out)
    if bias is not None:
        out = out + unsqueeze(bias, 1)
    return permute(reshape(out, k, n, oh, ow, o), 0, 1, 4, 2, 3)


def _check_pool_padding(kernel_size, padding, name):
    (kh, kw), (ph, pw) = _pair(kernel_size), _pair(padding)
    if ph > kh // 2 or pw > kw // 2 or ph < 0 or pw < 0:
        raise ValueError(f"{name}: padding {padding} must be >= 0 and at most half the kernel")
    return ph, pw


def max_pool2d(x, kernel_size, stride=None, padding=0):
    ph, pw = _check_pool_padding(kernel_size, padding, "max_pool2d")
    if ph or pw:  # -inf never wins a window (torch's rule keeps a real value in each)
        if x.ndim != 4:
            raise ValueError(f"max_pool2d: expected input of shape (N, C, H, W), got {x.shape}")
        x = pad(x, (pw, pw, ph, ph), value=float("-inf"))
    w = _windows(x, kernel_size, stride or kernel_size, 0, "max_pool2d")
    return max(reshape(w, *w.shape[:4], -1), dim=-1).values


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    _check_pool_padding(kernel_size, padding, "avg_pool2d")
    w = _windows(x, kernel_size, stride or kernel_size, padding, "avg_pool2d")
    return mean(w, dim=(-2, -1))


def dropout(x, p=0.5, training=True, generator=None):
    if not training or p == 0:
        return x
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    rng = generator if generator is not None else np.random.default_rng()
    return x * dropout_mask(rng, x.shape, p, x.dtype)


def dropout_mask(rng, shape, p, dtype):
    """The multiplier dropout applies: kept entries scaled by 1 / (1 - p), the rest 0."""
    keep = rng.random(shape) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p)) if p < 1 else keep.astype(dtype)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"layer_norm: input of shape {tuple(x.shape)} does not end in the normalized "
            f"shape {shape}"
        )
    dims = tuple(range(-len(shape), 0))
    d = x - mean(x, dims, keepdim=True)
    out = d / sqrt(mean(d * d, dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def _bn_axes(x):
    return (0, *range(2, x.ndim)), (1, x.shape[1]) + (1,) * (x.ndim - 2)


def batch_norm_train(x, weight=None, bias=None, eps=1e-5):
    """Training-mode batch norm: (output, batch mean, unbiased batch variance); the two
    statistics as float64 arrays (C,), what torch's CPU kernel updates running stats with."""
    dims, shape = _bn_axes(x)
    n = x.data.size // x.shape[1]
    if n < 2:
        raise ValueError(
            f"batch_norm: expected more than 1 value per channel when training, got input "
            f"of shape {tuple(x.shape)} (use a micro_batch > 1)"
        )
    d = x - sum(x, dims, keepdim=True) * (1.0 / n)
    var = sum(d * d, dims, keepdim=True) * (1.0 / n)  # biased: what normalises
    out = d / sqrt(var + eps)
    if weight is not None:
        out = out * reshape(weight, shape)
    if bias is not None:
        out = out + reshape(bias, shape)
    mean64 = x.data.mean(axis=dims, dtype=np.float64)
    dev = x.data - mean64.reshape(shape)
    return out, mean64, (dev * dev).sum(axis=dims) / (n - 1)


def batch_norm(
    x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """torch.nn.functional.batch_norm: in training the running statistics (if given) are
    updated in place with `momentum`; otherwise they normalise."""
    if training:
        out, mean, var = batch_norm_train(x, weight, bias, eps)
        if running_mean is not None:
            running_mean[...] = momentum * mean + (1 - momentum) * running_mean.astype(np.float64)
            running_var[...] = momentum * var + (1 - momentum) * running_var.astype(np.float64)
        return out
    _, shape = _bn_axes(x)
    rm = Tensor._wrap(np.asarray(running_mean, x.dtype).reshape(shape))
    rv = Tensor._wrap(np.asarray(running_var, x.dtype).reshape(shape))
    out = (x - rm) / sqrt(rv + eps)
    if weight is not None:
        out = out * reshape(weight, shape)
    return out if bias is None else out + reshape(bias, shape)


def embedding(indices, weight):
    return weight[embedding_indices(indices, weight.shape[0])]


def embedding_indices(indices, num):
    """The indices as an array, checked against a table of `num` embeddings."""
    idx = indices.data if isinstance(indices, Tensor) else np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"embedding: indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        raise ValueError(f"embedding: index {int(idx.max())} out of range for {num} embeddings")
    return idx


# ---- losses -------------------------------------------------------------------------------


def _reduce(loss, reduction):
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def mse_loss(input, target, reduction="mean"):
    if input.shape != _t(target).shape:
        raise ValueError(
            f"mse_loss: input shape {tuple(input.shape)} and target shape "
            f"{tuple(_t(target).shape)} differ"
        )
    d = input - target
    return _reduce(d * d, reduction)


def _targets(logits, target, name):
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if logits.ndim != 2:
        raise ValueError(f"{name}: expected input (N, classes), got shape {tuple(logits.shape)}")
    if t.dtype.kind not in "iu" or t.shape != logits.shape[:1]:
        raise ValueError(
            f"{name}: target must be class indices of shape ({logits.shape[0]},) with an "
            f"integer dtype, got shape {tuple(t.shape)} dtype {t.dtype}"
        )
    if t.size and (t.min() < 0 or t.max() >= logits.shape[1]):
        raise ValueError(
            f"{name}: target {int(t.max())} is out of range for {logits.shape[1]} classes"
        )
    return t


def cross_entropy(input, target, reduction="mean"):
    t = _targets(input, target, "cross_entropy")
    if reduction == "none":
        return -take_rows(log_softmax(input, -1), t)
    total = apply(OPS["cross_entropy_sum"], input, target=t)
    return total if reduction == "sum" else total * (1.0 / len(t))


def take_rows(x, t):
    return x[np.arange(len(t)), t]


def nll_loss(input, target, reduction="mean"):
    return _reduce(-take_rows(input, _targets(input, target, "nll_loss")), reduction)


def binary_cross_entropy_with_logits(input, target, reduction="mean"):
    return _reduce(apply(OPS["bce_with_logits"], input, target), reduction)


def _slice_sums(x):
    """(k, ...) -> (k,): each micro-batch's sum, over its elements flattened (a per-row
    reduction, the same for any k)."""
    return sum(reshape(x, x.shape[0], -1), dim=1)


def _stacked_targets(input, target, name):
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if input.ndim != 3 or t.shape != input.shape[:2]:
        raise ValueError(
            f"{name}: expected input (N, classes) and targets (N,) per micro-batch, got "
            f"{tuple(input.shape[1:])} and {tuple(t.shape[1:])}"
        )
    # the unstacked checks (dtype, class range) on all k micro-batches in one go
    _targets(Tensor._wrap(input.data.reshape(-1, input.shape[-1])), t.reshape(-1), name)
    return t


def _stacked_cross_entropy(input, target):
    t = _stacked_targets(input, target, "cross_entropy")
    return apply(OPS["cross_entropy_sum"], input, target=t) * (1.0 / t.shape[1])


def _stacked_nll(input, target):
    t = _stacked_targets(input, target, "nll_loss")
    picked = apply(OPS["take_along"], input, indices=t[..., None], dim=-1)
    return _slice_sums(-picked) * (1.0 / t.shape[1])


def _stacked_mse(input, target):
    if input.shape != _t(target).shape:
        raise ValueError(
            f"mse_loss: input shape {tuple(input.shape[1:])} and target shape "
            f"{tuple(_t(target).shape[1:])} differ"
        )
    d = input - target
    return _slice_sums(d * d) * (1.0 / (d.data.size // d.shape[0]))


def _stacked_bce(input, target):
    # Per micro-batch, input and target broadcast as in the unstacked loss: on the right.
    target = _t(target)
    gap = input.ndim - target.ndim
    if gap > 0:
        target = reshape(target, target.shape[0], *(1,) * gap, *target.shape[1:])
    elif gap < 0:
        input = reshape(input, input.shape[0], *(1,) * -gap, *input.shape[1:])
    loss = apply(OPS["bce_with_logits"], input, target)
    return _slice_sums(loss) * (1.0 / (loss.data.size // loss.shape[0]))


_STACKED_LOSSES = {
    cross_entropy: _stacked_cross_entropy,
    nll_loss: _stacked_nll,
    mse_loss: _stacked_mse,
    binary_cross_entropy_with_logits: _stacked_bce,
}


def has_stacked_loss(loss_fn):
    return loss_fn in _STACKED_LOSSES


def stacked_loss(loss_fn, input, target):
    """k micro-batches' losses at once: input (k, m, ...) and target (k, m, ...) give the
    (k,) tensor whose entry i is loss_fn(input[i], target[i], reduction="mean"), each
    reduced over its own micro-batch only."""
    if loss_fn not in _STACKED_LOSSES:
        name = getattr(loss_fn, "__name__", loss_fn)
        raise ValueError(f"stacked_loss: {name} has no stacked form; call it per micro-batch")
    return _STACKED_LOSSES[loss_fn](input, target)


def tensor(data, requires_grad=False, dtype=None):
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# ---- Tensor methods: the same functions, bound --------------------------------------------
for _name in (
    "exp log sqrt abs sin cos tanh sigmoid relu pow clamp sum mean var std amax amin max min "
    "argmax argmin logsumexp softmax log_softmax reshape view flatten permute transpose "
    "squeeze unsqueeze expand clone to"
).split():
    setattr(Tensor, _name, globals()[_name])
Tensor.float = lambda self: to(self, np.float32)
Tensor.double = lambda self: to(self, np.float64)
Tensor.matmul = matmul
Tensor.contiguous = lambda self: self
