"""Modules (PyTorch's `torch.nn` names) and `build`, which makes a model from a declarative
layer list so that a job spec never ships code."""

import math
from collections import OrderedDict

import numpy as np

from . import functional as F
from .tensor import Tensor


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

    def named_parameters(self, prefix=""):
        for name, p in self._parameters.items():
            yield prefix + name, p
        for mname, m in self._modules.items():
            yield from m.named_parameters(prefix + mname + ".")

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def children(self):
        return iter(self._modules.values())

    def modules(self):
        yield self
        for m in self._modules.values():
            yield from m.modules()

    def state_dict(self):
        return OrderedDict((n, p.detach()) for n, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        own = dict(self.named_parameters())
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
            p.data[...] = value
            p._version[0] += 1

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


class _Function(Module):
    fn = None

    def forward(self, x):
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


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride)


class AvgPool2d(MaxPool2d):
    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride)


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


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape, self.eps = tuple(shape), eps
        self.weight = Parameter(np.ones(shape, np.float32)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(shape, np.float32)) if elementwise_affine else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Embedding(Module):
    def __init__(self, num_embeddings, embedding_dim, generator=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        w = _rng(generator).standard_normal((num_embeddings, embedding_dim))
        self.weight = Parameter(w.astype(np.float32))

    def forward(self, idx):
        return F.embedding(idx, self.weight)


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
# Each entry: (allowed keys with defaults, required keys, maker(shape, args, rng) -> (module,
# output shape)). Only these names exist: a spec cannot reach anything else.


def _linear(shape, a, rng):
    if len(shape) != 1:
        raise ValueError(f"expects a flat input (features,), got shape {shape}; add a flatten")
    return Linear(shape[0], a["out"], a["bias"], rng), (a["out"],)


def _conv(shape, a, rng):
    if len(shape) != 3:
        raise ValueError(f"expects input (channels, height, width), got shape {shape}")
    k, s, p = a["kernel"], a["stride"], a["padding"]
    oh, ow = ((n + 2 * p - k) // s + 1 for n in shape[1:])
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel {k} does not fit input {shape} with padding {p}")
    return Conv2d(shape[0], a["out"], k, s, p, a["bias"], rng), (a["out"], oh, ow)


def _pool(cls):
    def make(shape, a, rng):
        if len(shape) != 3:
            raise ValueError(f"expects input (channels, height, width), got shape {shape}")
        k, s = a["kernel"], a["stride"] or a["kernel"]
        out = (shape[0],) + tuple((n - k) // s + 1 for n in shape[1:])
        if min(out) < 1:
            raise ValueError(f"kernel {k} does not fit input {shape}")
        return cls(k, s), out

    return make


def _same(cls, *keys):
    return lambda shape, a, rng: (cls(*(a[k] for k in keys)), shape)


LAYERS = {
    "linear": ({"out": None, "bias": True}, ("out",), _linear),
    "conv2d": (
        {"out": None, "kernel": None, "stride": 1, "padding": 0, "bias": True},
        ("out", "kernel"),
        _conv,
    ),
    "maxpool2d": ({"kernel": None, "stride": None}, ("kernel",), _pool(MaxPool2d)),
    "avgpool2d": ({"kernel": None, "stride": None}, ("kernel",), _pool(AvgPool2d)),
    "flatten": ({}, (), lambda shape, a, rng: (Flatten(), (math.prod(shape),))),
    "relu": ({}, (), _same(ReLU)),
    "tanh": ({}, (), _same(Tanh)),
    "sigmoid": ({}, (), _same(Sigmoid)),
    "gelu": ({}, (), _same(GELU)),
    "dropout": ({"p": 0.5}, (), _same(Dropout, "p")),
    "layernorm": ({"eps": 1e-5}, (), lambda shape, a, rng: (LayerNorm(shape[-1], a["eps"]), shape)),
    "embedding": (
        {"num": None, "dim": None},
        ("num", "dim"),
        lambda shape, a, rng: (Embedding(a["num"], a["dim"], rng), shape + (a["dim"],)),
    ),
}
_INT_KEYS = {"out", "kernel", "stride", "padding", "num", "dim"}


def _layer_args(i, layer):
    if not isinstance(layer, dict) or not isinstance(layer.get("type"), str):
        raise ValueError(f"layer {i}: expected a table with a 'type' key, got {layer!r}")
    kind = layer["type"]
    if kind not in LAYERS:
        raise ValueError(f"layer {i}: unknown layer type {kind!r}; known: {', '.join(LAYERS)}")
    defaults, required, _ = LAYERS[kind]
    extra = sorted(set(layer) - set(defaults) - {"type"})
    if extra:
        raise ValueError(f"layer {i} ({kind}): unknown key(s) {extra}; allowed: {list(defaults)}")
    missing = [k for k in required if k not in layer]
    if missing:
        raise ValueError(f"layer {i} ({kind}): missing key(s) {missing}")
    args = {**defaults, **{k: v for k, v in layer.items() if k != "type"}}
    for k, v in args.items():
        if (
            k in _INT_KEYS
            and v is not None
            and (type(v) is not int or v < (0 if k == "padding" else 1))
        ):
            raise ValueError(f"layer {i} ({kind}): '{k}' must be a positive integer, got {v!r}")
    if kind == "dropout" and not (isinstance(args["p"], int | float) and 0 <= args["p"] < 1):
        raise ValueError(f"layer {i} (dropout): 'p' must be a number in [0, 1), got {args['p']!r}")
    return kind, args


def build(spec, input_shape, seed=0, max_parameters=None):
    """A Sequential from a list of layer dicts, input shape (per sample) and an init seed."""
    if not isinstance(spec, list | tuple) or not spec:
        raise ValueError("model: expected a non-empty list of layers")
    shape = tuple(input_shape)
    if not shape or any(type(n) is not int or n < 1 for n in shape):
        raise ValueError(f"input_shape must be a list of positive integers, got {input_shape!r}")
    rng, layers, count = np.random.default_rng(seed), [], 0
    for i, layer in enumerate(spec):
        kind, args = _layer_args(i, layer)
        try:
            module, shape = LAYERS[kind][2](shape, args, rng)
        except ValueError as e:
            raise ValueError(f"layer {i} ({kind}): {e}") from None
        count += sum(p.data.size for p in module.parameters())
        if max_parameters is not None and count > max_parameters:
            raise ValueError(
                f"layer {i} ({kind}): the model has more than {max_parameters} parameters"
            )
        layers.append(module)
    model = Sequential(*layers)
    model.output_shape = shape
    return model
