"""shardgrad.core: a NumPy autograd engine with PyTorch's semantics."""

import numpy as np

from . import autograd, functional, ops
from .functional import (
    abs,
    amax,
    amin,
    argmax,
    argmin,
    cat,
    clamp,
    clone,
    cos,
    exp,
    expand,
    flatten,
    gelu,
    log,
    log_softmax,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    permute,
    pow,
    relu,
    reshape,
    sigmoid,
    sin,
    softmax,
    sqrt,
    squeeze,
    stack,
    std,
    sum,
    tanh,
    tensor,
    transpose,
    unsqueeze,
    var,
    where,
)
from .tensor import (
    Tensor,
    bool_,
    enable_grad,
    float32,
    float64,
    int32,
    int64,
    is_grad_enabled,
    no_grad,
)

Generator = np.random.Generator
_default = [np.random.default_rng()]


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the default generator used when no `generator=` is given."""
    _default[0] = np.random.default_rng(seed)
    return _default[0]


def default_generator() -> np.random.Generator:
    return _default[0]


def _dtype(dtype):
    return np.dtype(dtype if dtype is not None else np.float32)


def _size(size):
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple | list) else size


def _make(data, requires_grad):
    t = Tensor._wrap(data)
    return t.requires_grad_() if requires_grad else t


def zeros(*size, dtype=None, requires_grad=False):
    return _make(np.zeros(_size(size), _dtype(dtype)), requires_grad)


def ones(*size, dtype=None, requires_grad=False):
    return _make(np.ones(_size(size), _dtype(dtype)), requires_grad)


def full(size, fill_value, dtype=None, requires_grad=False):
    return _make(np.full(_size((size,)), fill_value, _dtype(dtype)), requires_grad)


def empty(*size, dtype=None, requires_grad=False):
    return zeros(*size, dtype=dtype, requires_grad=requires_grad)


def randn(*size, generator=None, dtype=None, requires_grad=False):
    rng = generator or _default[0]
    return _make(rng.standard_normal(_size(size)).astype(_dtype(dtype)), requires_grad)


def rand(*size, generator=None, dtype=None, requires_grad=False):
    rng = generator or _default[0]
    return _make(rng.random(_size(size)).astype(_dtype(dtype)), requires_grad)


def randint(low, high, size, generator=None):
    return Tensor._wrap((generator or _default[0]).integers(low, high, size, dtype=np.int64))


def arange(start, end=None, step=1, dtype=None, requires_grad=False):
    start, end = (0, start) if end is None else (start, end)
    floats = any(isinstance(v, float) for v in (start, end, step))
    dt = dtype or (np.float32 if floats else np.int64)
    return _make(np.arange(start, end, step, dtype=dt), requires_grad)


def linspace(start, end, steps, dtype=None, requires_grad=False):
    return _make(np.linspace(start, end, steps, dtype=_dtype(dtype)), requires_grad)


def eye(n, m=None, dtype=None, requires_grad=False):
    return _make(np.eye(n, m, dtype=_dtype(dtype)), requires_grad)


def _like(fn):
    def like(t, dtype=None, requires_grad=False):
        return _make(fn(t.shape, dtype or t.dtype), requires_grad)

    return like


zeros_like, ones_like = _like(np.zeros), _like(np.ones)


def randn_like(t, generator=None, dtype=None, requires_grad=False):
    return randn(*t.shape, generator=generator, dtype=dtype or t.dtype, requires_grad=requires_grad)


def from_numpy(a: np.ndarray) -> Tensor:
    return Tensor._wrap(a)


from . import nn, optim  # noqa: E402  (they import the names above)
