"""Modules (PyTorch's `torch.nn` names) and `build`, which makes a model from a declarative
layer list so that a job spec never ships code."""

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import functional as F
from .tensor import Tensor, bump_version


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True):
        super().__init__(data.data if isinstance(data, Tensor) else data)
        self.requires_grad = requires_grad

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


def _uniform(rng, shape, bound):
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _rng(generator):
    return generator if generator is not None else np.random.default_rng()


class Stack:
    """k micro-batches in one forward/backward pass (`Module.stacked`). Each parameter is
    seen as its own leaf with a leading k axis, a broadcast view of it (no copy), so its
    gradient comes out per micro-batch, shape (k, *p.shape). `generators[i]` is micro-batch
    i's random stream (dropout)."""

    def __init__(self, k, generators=None):
        self.k, self.generators, self.leaves = k, generators, {}

    def __call__(self, p):
        """Parameter p as seen by the k micro-batches (None stays None)."""
        if p is None:
            return None
        leaf = self.leaves.get(id(p))
        if leaf is None:
            leaf = Tensor._wrap(np.broadcast_to(p.data, (self.k, *p.shape)))
            leaf.requires_grad = True
            self.leaves[id(p)] = leaf
        return leaf

    def grad(self, p):
        """The (k, *p.shape) gradient of p after backward (zeros if p was not used)."""
        leaf = self.leaves.get(id(p))
        if leaf is None or leaf.grad is None:
            return np.zeros((self.k, *p.shape), p.dtype)
        return leaf.grad.data


def stackable(model):
    """Whether every layer of `model` can run stacked micro-batches (`Module.stacked`)."""
    return all(_stacks(m) for m in model.modules())


def _stacks(m):
    # stacked() is the k-micro-batch twin of one forward(): a forward replaced on the
    # instance, or overridden below the class that wrote stacked(), has no known twin.
    if "forward" in vars(m):
        return False
    mro = type(m).__mro__
    fwd = next(c for c in mro if "forward" in vars(c))
    stk = next(c for c in mro if "stacked" in vars(c))
    return stk is not Module and issubclass(stk, fwd)


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def stacked(self, x, stack):
        """forward() of k micro-batches at once: x is (k, m, ...), slice i micro-batch i,
        parameters taken through `stack` (a Stack). A micro-batch's result must not depend
        on k or on its place in the stack. Layers that cannot do this leave it undefined
        and the trainer runs micro-batches one by one."""
        raise NotImplementedError(f"{type(self).__name__} cannot run stacked micro-batches")

    def named_parameters(self, prefix=""):
        for name, p in self._parameters.items():
            yield prefix + name, p
        for mname, m in self._modules.items():
            yield from m.named_parameters(prefix + mname + ".")

    def parameters(self):
        return (p for _, p in self.named_parameters())

    _buffer_names: tuple = ()  # non-trainable state a subclass keeps as arrays (BatchNorm)

    def named_buffers(self, prefix=""):
        for name in self._buffer_names:
            yield prefix + name, getattr(self, name)
        for mname, m in self._modules.items():
            yield from m.named_buffers(prefix + mname + ".")

    def _named_state(self, prefix=""):
        """Parameters and buffers in torch's state_dict order: a module's own parameters,
        then its own buffers, then each child's."""
        for name, p in self._parameters.items():
            yield prefix + name, p
        for name in self._buffer_names:
            yield prefix + name, getattr(self, name)
        for mname, m in self._modules.items():
            yield from m._named_state(prefix + mname + ".")

    def children(self):
        return iter(self._modules.values())

    def modules(self):
        yield self
        for m in self._modules.values():
            yield from m.modules()

    def state_dict(self):
        return OrderedDict(
            (n, v.detach() if isinstance(v, Tensor) else Tensor._wrap(v))
            for n, v in self._named_state()
        )

    def load_state_dict(self, state, strict=True):
        own = dict(self._named_state())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"Error(s) in loading state_dict: missing keys {missing}, unexpected {unexpected}"
            )
        for name, p in own.items():
            if name not in state:
                continue
            value = state[name]
            value = value.data if isinstance(value, Tensor) else np.asarray(value)
            if value.shape != p.shape:
                raise ValueError(
                    f"size mismatch for {name}: copying a param with shape {tuple(value.shape)}, "
                    f"the shape in the current model is {tuple(p.shape)}"
                )
            if isinstance(p, Tensor):
                p.data[...] = value
                bump_version(p)
            else:  # a buffer
                p[...] = value

    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def extra_repr(self):
        return ""

    def __repr__(self):
        inner = "".join(f"\n  ({n}): {m!r}".replace("\n", "\n  ") for n, m in self._modules.items())
        return f"{type(self).__name__}({self.extra_repr()}{inner}{chr(10) if inner else ''})"


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True, generator=None, dtype=np.float32):
        super().__init__()
        rng, bound = _rng(generator), 1 / math.sqrt(in_features) if in_features else 0
        self.in_features, self.out_features = in_features, out_features
        # kaiming_uniform(a=sqrt(5)) as in PyTorch reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        self.weight = Parameter(_uniform(rng, (out_features, in_features), bound).astype(dtype))
        self.bias = Parameter(_uniform(rng, (out_features,), bound).astype(dtype)) if bias else None

    def forward(self, x):
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"linear: expected input with {self.in_features} features, "
                f"got {x.shape[-1] if x.ndim else 'a scalar'} (input shape {tuple(x.shape)})"
            )
        return F.linear(x, self.weight, self.bias)

    def stacked(self, x, stack):
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"linear: expected input with {self.in_features} features, "
                f"got {x.shape[-1]} (input shape {tuple(x.shape[1:])})"
            )
        return F.linear(x, stack(self.weight), stack(self.bias))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Conv2d(Module):
    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, generator=None
    ):
        super().__init__()
        kh, kw = F._pair(kernel_size)
        rng, bound = _rng(generator), 1 / math.sqrt(in_channels * kh * kw)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.weight = Parameter(_uniform(rng, (out_channels, in_channels, kh, kw), bound))
        self.bias = Parameter(_uniform(rng, (out_channels,), bound)) if bias else None

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"conv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def stacked(self, x, stack):
        if x.ndim != 5 or x.shape[2] != self.in_channels:
            raise ValueError(
                f"conv2d: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape[1:])}"
            )
        w, b = stack(self.weight), stack(self.bias)
        return F.conv2d(x, w, b, self.stride, self.padding)


class _Function(Module):
    fn = None

    def forward(self, x):
        return type(self).fn(x)

    def stacked(self, x, stack):  # elementwise: nothing mixes micro-batches
        return type(self).fn(x)


class ReLU(_Function):
    fn = staticmethod(F.relu)


class Tanh(_Function):
    fn = staticmethod(F.tanh)


class Sigmoid(_Function):
    fn = staticmethod(F.sigmoid)


class GELU(_Function):
    fn = staticmethod(F.gelu)


class Flatten(Module):
    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return F.flatten(x, self.start_dim, self.end_dim)

    def stacked(self, x, stack):  # the dims of one micro-batch are one further right
        s, e = self.start_dim, self.end_dim
        return F.flatten(x, s + 1 if s >= 0 else s, e + 1 if e >= 0 else e)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def stacked(self, x, stack):  # windows never cross images: pool all k*m images at once
        out = self.forward(F.reshape(x, -1, *x.shape[2:]))
        return F.reshape(out, *x.shape[:2], *out.shape[1:])


class AvgPool2d(MaxPool2d):
    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)

    stacked = MaxPool2d.stacked  # it pools through self.forward


class Dropout(Module):
    """Dropout whose mask comes from `self.generator` (set per micro-batch by the trainer, so
    a distributed run draws the same masks as a local one)."""

    def __init__(self, p=0.5, generator=None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout: p must be in [0, 1), got {p}")
        self.p, self.generator = p, generator

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.generator)

    def stacked(self, x, stack):
        if not self.training or self.p == 0:
            return x
        # micro-batch i's mask from its own stream, drawn as the unstacked layer draws it
        gens = stack.generators or [self.generator] * stack.k
        masks = [F.dropout_mask(_rng(g), x.shape[1:], self.p, x.dtype) for g in gens]
        return x * np.stack(masks)


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape, self.eps = tuple(shape), eps
        self.weight = Parameter(np.ones(shape, np.float32)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(shape, np.float32)) if elementwise_affine else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def stacked(self, x, stack):
        out = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.weight is None:
            return out
        # (k, *shape) -> (k, 1, ..., 1, *shape): each micro-batch's own affine parameters
        lead = (stack.k,) + (1,) * (x.ndim - 1 - len(self.normalized_shape))
        w = F.reshape(stack(self.weight), *lead, *self.normalized_shape)
        return out * w + F.reshape(stack(self.bias), *lead, *self.normalized_shape)


class _BatchNorm(Module):
    """BatchNorm with torch's semantics: in training, normalise with the batch's mean and
    biased variance and update running_mean / running_var (unbiased) with `momentum`; in
    eval, normalise with the running statistics.

    `defer_running_stats = True` (set by the job runtime) leaves the running statistics
    alone and only records the batch's (mean, unbiased var) in `batch_stats`: the round
    engine combines those of all micro-batches and calls `update_running_stats` once."""

    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")
    _ndims: tuple = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, np.float32)) if affine else None
        self.bias = Parameter(np.zeros(num_features, np.float32)) if affine else None
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)
        self.num_batches_tracked = np.zeros((), np.int64)
        self.defer_running_stats = False
        self.batch_stats = None

    def forward(self, x):
        name = type(self).__name__.lower()
        if x.ndim not in self._ndims or x.shape[1] != self.num_features:
            want = " or ".join(f"{n}-d" for n in self._ndims)
            raise ValueError(
                f"{name}: expected {want} input with {self.num_features} channels in dim 1, "
                f"got shape {tuple(x.shape)}"
            )
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )  # fmt: skip
        out, mean, var = F.batch_norm_train(x, self.weight, self.bias, self.eps)
        self.batch_stats = (mean, var)
        if not self.defer_running_stats:
            self.update_running_stats(mean, var)
        return out

    def update_running_stats(self, mean, var):
        """running = momentum * batch + (1 - momentum) * running, in float64 as torch's CPU
        kernel computes it; `var` is the unbiased batch variance."""
        m = self.momentum
        rm, rv = self.running_mean, self.running_var
        rm[...] = m * mean + (1 - m) * rm.astype(np.float64)
        rv[...] = m * var + (1 - m) * rv.astype(np.float64)
        self.num_batches_tracked += 1

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    _ndims = (4,)


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, generator=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        w = _rng(generator).standard_normal((num_embeddings, embedding_dim))
        self.weight = Parameter(w.astype(np.float32))

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def stacked(self, idx, stack):
        idx = F.embedding_indices(idx, self.num_embeddings)
        k = stack.k
        which = np.arange(k).reshape((k,) + (1,) * (idx.ndim - 1))
        return stack(self.weight)[which, idx]  # row idx[i, ...] of micro-batch i's copy


class Sequential(Module):
    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def forward(self, x):
        for i, layer in enumerate(self._modules.values()):
            try:
                x = layer(x)
            except ValueError as e:  # name the layer, as the spec's author counts them
                raise ValueError(f"layer {i} ({type(layer).__name__.lower()}): {e}") from None
        return x

    def stacked(self, x, stack):
        for i, layer in enumerate(self._modules.values()):
            try:
                x = layer.stacked(x, stack)
            except ValueError as e:
                raise ValueError(f"layer {i} ({type(layer).__name__.lower()}): {e}") from None
        return x


class _Loss(Module):
    fn = None

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input, target):
        return type(self).fn(input, target, reduction=self.reduction)


class MSELoss(_Loss):
    fn = staticmethod(F.mse_loss)


class CrossEntropyLoss(_Loss):
    fn = staticmethod(F.cross_entropy)


class NLLLoss(_Loss):
    fn = staticmethod(F.nll_loss)


class BCEWithLogitsLoss(_Loss):
    fn = staticmethod(F.binary_cross_entropy_with_logits)


# ---- build: declarative layer list -> Sequential -----------------------------------------
# The one registry of layer types (the job-spec validator reads it too). Per type: its keys
# and their kinds, the defaults of the optional ones, `shape(in_shape, args) -> (out_shape,
# parameter count)` (no allocation), and `make(in_shape, args, rng) -> Module`. Only these
# names exist: a spec cannot reach anything else.
POS, NONNEG, BOOL, PROB, EPS = "pos", "nonneg", "bool", "prob", "eps"


@dataclass(frozen=True)
class LayerType:
    keys: dict
    defaults: dict
    shape: Callable
    make: Callable

    @property
    def required(self):
        return tuple(k for k in self.keys if k not in self.defaults)


def _flat(shape):
    if len(shape) != 1:
        raise ValueError(f"expects a flat input (features,), got shape {shape}; add a flatten")


def _image(shape):
    if len(shape) != 3:
        raise ValueError(f"expects input (channels, height, width), got shape {shape}")


def _linear_shape(shape, a):
    _flat(shape)
    return (a["out"],), shape[0] * a["out"] + a["out"] * a["bias"]


def _conv_shape(shape, a):
    _image(shape)
    k, s, p = a["kernel"], a["stride"], a["padding"]
    oh, ow = ((n + 2 * p - k) // s + 1 for n in shape[1:])
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {k} does not fit input {shape} with padding {p}")
    return (a["out"], oh, ow), a["out"] * shape[0] * k * k + a["out"] * a["bias"]


def _pool_shape(shape, a):
    _image(shape)
    k, s, p = a["kernel"], a["stride"] or a["kernel"], a["padding"]
    if p > k // 2:
        raise ValueError(f"padding {p} must be at most half the kernel {k} (as in torch)")
    out = (shape[0],) + tuple((n + 2 * p - k) // s + 1 for n in shape[1:])
    if min(out) < 1:
        raise ValueError(f"kernel {k} does not fit input {shape}")
    return out, 0


def _same_shape(shape, a):
    return shape, 0


def _plain(cls, *keys):
    return LayerType({}, {}, _same_shape, lambda shape, a, rng: cls(*(a[k] for k in keys)))


_POOL_KEYS = {"kernel": POS, "stride": POS, "padding": NONNEG}
_BN_KEYS, _BN_DEFAULTS = {"eps": EPS, "momentum": PROB}, {"eps": 1e-5, "momentum": 0.1}


def _bn_shape(shape, ndims, what):
    if len(shape) not in ndims:
        raise ValueError(f"expects input {what}, got shape {shape}")
    return shape, 2 * shape[0]


LAYERS = {
    "linear": LayerType(
        {"out": POS, "bias": BOOL},
        {"bias": True},
        _linear_shape,
        lambda shape, a, rng: Linear(shape[0], a["out"], a["bias"], rng),
    ),
    "conv2d": LayerType(
        {"out": POS, "kernel": POS, "stride": POS, "padding": NONNEG, "bias": BOOL},
        {"stride": 1, "padding": 0, "bias": True},
        _conv_shape,
        lambda shape, a, rng: Conv2d(
            shape[0], a["out"], a["kernel"], a["stride"], a["padding"], a["bias"], rng
        ),
    ),
    "maxpool2d": LayerType(
        _POOL_KEYS,
        {"stride": None, "padding": 0},
        _pool_shape,
        lambda shape, a, rng: MaxPool2d(a["kernel"], a["stride"] or a["kernel"], a["padding"]),
    ),
    "avgpool2d": LayerType(
        _POOL_KEYS,
        {"stride": None, "padding": 0},
        _pool_shape,
        lambda shape, a, rng: AvgPool2d(a["kernel"], a["stride"] or a["kernel"], a["padding"]),
    ),
    "flatten": LayerType(
        {}, {}, lambda shape, a: ((math.prod(shape),), 0), lambda shape, a, rng: Flatten()
    ),
    "relu": _plain(ReLU),
    "tanh": _plain(Tanh),
    "sigmoid": _plain(Sigmoid),
    "gelu": _plain(GELU),
    "dropout": LayerType(
        {"p": PROB}, {"p": 0.5}, _same_shape, lambda shape, a, rng: Dropout(a["p"])
    ),
    "layernorm": LayerType(
        {"eps": EPS},
        {"eps": 1e-5},
        lambda shape, a: (shape, 2 * shape[-1]),
        lambda shape, a, rng: LayerNorm(shape[-1], a["eps"]),
    ),
    "batchnorm1d": LayerType(
        _BN_KEYS,
        _BN_DEFAULTS,
        lambda shape, a: _bn_shape(shape, (1, 2), "(channels,) or (channels, length)"),
        lambda shape, a, rng: BatchNorm1d(shape[0], a["eps"], a["momentum"]),
    ),
    "batchnorm2d": LayerType(
        _BN_KEYS,
        _BN_DEFAULTS,
        lambda shape, a: _bn_shape(shape, (3,), "(channels, height, width)"),
        lambda shape, a, rng: BatchNorm2d(shape[0], a["eps"], a["momentum"]),
    ),
    "embedding": LayerType(
        {"num": POS, "dim": POS},
        {},
        lambda shape, a: (shape + (a["dim"],), a["num"] * a["dim"]),
        lambda shape, a, rng: Embedding(a["num"], a["dim"], rng),
    ),
}


def _kind_problem(kind, v):
    """What is wrong with value `v` for a key of this kind (None if nothing)."""
    number = isinstance(v, int | float) and not isinstance(v, bool)
    if kind in (POS, NONNEG) and not (type(v) is int and v >= (1 if kind == POS else 0)):
        return "a positive integer" if kind == POS else "an integer >= 0"
    if kind == BOOL and not isinstance(v, bool):
        return "true or false"
    if kind == PROB and not (number and 0 <= v < 1):
        return "a number in [0, 1)"
    if kind == EPS and not (number and v > 0):
        return "a number > 0"
    return None


def _layer_args(i, layer):
    if not isinstance(layer, dict) or not isinstance(layer.get("type"), str):
        raise ValueError(f"layer {i}: expected a table with a 'type' key, got {layer!r}")
    kind = layer["type"]
    if kind not in LAYERS:
        raise ValueError(f"layer {i}: unknown layer type {kind!r}; known: {', '.join(LAYERS)}")
    lt = LAYERS[kind]
    extra = sorted(set(layer) - set(lt.keys) - {"type"})
    if extra:
        raise ValueError(f"layer {i} ({kind}): unknown key(s) {extra}; allowed: {list(lt.keys)}")
    missing = [k for k in lt.required if k not in layer]
    if missing:
        raise ValueError(f"layer {i} ({kind}): missing key(s) {missing}")
    for k, v in layer.items():
        problem = k != "type" and _kind_problem(lt.keys[k], v)
        if problem:
            raise ValueError(f"layer {i} ({kind}): '{k}' must be {problem}, got {v!r}")
    return kind, {**lt.defaults, **{k: v for k, v in layer.items() if k != "type"}}


def plan(spec, input_shape):
    """Check a layer list and walk its shapes without allocating anything: the steps
    [(type, args, input shape)], the output shape and the parameter count."""
    if not isinstance(spec, list | tuple) or not spec:
        raise ValueError("model: expected a non-empty list of layers")
    shape = tuple(input_shape)
    if not shape or any(type(n) is not int or n < 1 for n in shape):
        raise ValueError(f"input_shape must be a list of positive integers, got {input_shape!r}")
    steps, count = [], 0
    for i, layer in enumerate(spec):
        kind, args = _layer_args(i, layer)
        try:
            out, n = LAYERS[kind].shape(shape, args)
        except ValueError as e:
            raise ValueError(f"layer {i} ({kind}): {e}") from None
        steps.append((kind, args, shape))
        shape, count = out, count + n
    return steps, shape, count


def build(spec, input_shape, seed=0, max_parameters=None):
    """A Sequential from a list of layer dicts, input shape (per sample) and an init seed.
    An over-large model is refused before anything is allocated."""
    steps, out_shape, count = plan(spec, input_shape)
    if max_parameters is not None and count > max_parameters:
        raise ValueError(f"the model has {count} parameters, more than {max_parameters}")
    rng = np.random.default_rng(seed)
    model = Sequential(*(LAYERS[kind].make(shape, args, rng) for kind, args, shape in steps))
    model.output_shape = out_shape
    return model
