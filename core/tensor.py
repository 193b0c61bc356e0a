"""Tensor: an ndarray plus the graph node that made it. PyTorch's semantics, NumPy's speed.

The graph is recorded only when grad mode is on and some input requires grad; an op is
`apply(OPS[name], *tensors, **params)`, which runs the NumPy forward and, if needed, hangs a
`Node` on the result. The backward walk lives in autograd.py; the derivative rules in ops.py.
"""

import threading

import numpy as np

from .ops import OPS, _axes, _Namespace

float32, float64, int64, int32, bool_ = np.float32, np.float64, np.int64, np.int32, np.bool_
_DEFAULT_FLOAT = np.dtype(np.float32)


class _GradMode(threading.local):
    enabled = True


_mode = _GradMode()


def is_grad_enabled() -> bool:
    return _mode.enabled


class _SetGrad:
    def __init__(self, enabled):
        self.enabled = enabled

    def __enter__(self):
        self.prev, _mode.enabled = _mode.enabled, self.enabled

    def __exit__(self, *exc):
        _mode.enabled = self.prev

    def __call__(self, fn):  # usable as a decorator, like torch.no_grad()
        def wrapped(*args, **kwargs):
            with type(self)():
                return fn(*args, **kwargs)

        return wrapped


class no_grad(_SetGrad):
    def __init__(self):
        super().__init__(False)


class enable_grad(_SetGrad):
    def __init__(self):
        super().__init__(True)


class Node:
    """What backward needs of one op application: its inputs (Tensors or constants) and
    their arrays then (`datas`), its parameters, its output array and the output's version
    counter. `edges` lists the inputs that needed a gradient then: (index, tensor, the
    history it had then, the key of that vertex of the graph). `changes`: the count of
    in-place changes when it was made."""

    __slots__ = ("op", "inputs", "datas", "edges", "params", "out", "out_version", "freed")
    __slots__ += ("changes",)
    # Made by apply field by field: no __init__ call on every op's hot path. Edges point at
    # the history an input had when it was used, so an in-place op on that input later
    # (which gives it a new grad_fn) cannot reroute this gradient.

    def name(self):
        return f"{self.op.name.capitalize()}Backward"

    def __repr__(self):
        return f"<{self.name()}>"


# PyTorch's saved-tensor check without saving versions: every in-place change counts in
# `_changes`, and a tensor's version counter is [version, the count at its last change].
# A value a node saved was changed since iff its counter's count is above the node's
# `changes`; a node made after the last change anywhere needs no check at all.
_changes = [0]


def bump_version(t):
    _changes[0] += 1
    t._version[:] = t._version[0] + 1, _changes[0]


def apply(op, *inputs, **params):
    """Run `op` forward on NumPy data and record it if the result needs a gradient."""
    datas, edges = [], []
    for a in inputs:  # one pass: the hot path of every op
        if isinstance(a, Tensor):
            if a.requires_grad:  # the backward walk's edge, its vertex key precomputed
                fn = a.grad_fn
                edges.append((len(datas), a, fn, fn if fn is not None else a))
            datas.append(a.data)
        else:
            datas.append(a)
    try:
        out = op.forward(*datas, **params)
    except (ValueError, IndexError) as e:
        shapes = ", ".join(
            str(tuple(a.shape)) for a in inputs if isinstance(a, Tensor | np.ndarray)
        )
        raise ValueError(f"{op.name}: cannot apply to shapes {shapes}: {e}") from None
    if type(out) is not _ndarray:
        out = np.asarray(out)
    t = _new(Tensor)
    t.data, t.grad, t._hooks, t._retains_grad = out, None, None, False
    t._version = version = [0, 0]
    if edges and _mode.enabled:
        t.requires_grad = True
        t.grad_fn = n = _new_node(Node)
        n.op, n.inputs, n.datas, n.edges, n.params = op, inputs, datas, edges, params
        n.out, n.out_version, n.freed, n.changes = out, version, False, _changes[0]
    else:
        t.requires_grad = False
        t.grad_fn = None
    return t


def _operator(name, reflected=False):
    """The Tensor method `self <op> o` (`o <op> self` if reflected). An integer tensor
    meeting a Python float becomes float32 first (PyTorch promotes to its default float
    dtype; NumPy would pick float64). A function per operator rather than one shared
    helper: the hot path of every arithmetic op is a call shorter."""
    op, cast = OPS[name], OPS["cast"]

    def method(self, o):
        if type(o) is float and self.data.dtype.kind in "biu":
            self = apply(cast, self, dtype=_DEFAULT_FLOAT)
        return apply(op, o, self) if reflected else apply(op, self, o)

    method.__name__ = f"__{'r' if reflected else ''}{name}__"
    return method


def _as_array(data, dtype=None):
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        return np.array(data, dtype=dtype)
    arr = np.array(data)
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"tensor(): data must be numbers or booleans, got {arr.dtype} "
            f"(e.g. {str(arr.flat[0])[:20]!r})"
            if arr.size
            else "tensor(): bad data"
        )
    if arr.dtype == np.float64 and not isinstance(data, np.ndarray | np.generic):
        arr = arr.astype(_DEFAULT_FLOAT)  # Python floats become float32, as in PyTorch
    elif arr.dtype.kind in "iu" and not isinstance(data, np.ndarray | np.generic):
        arr = arr.astype(np.int64)
    return arr


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "grad_fn", "_version", "_hooks")
    __slots__ += ("_retains_grad", "__weakref__")
    __array_ufunc__ = None  # ndarray <op> Tensor defers to Tensor's reflected operator
    __hash__ = object.__hash__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = self.grad_fn = self._hooks = None
        self._version = [0, 0]
        self._retains_grad = False
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # ---- attributes ---------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    is_leaf = property(lambda self: self.grad_fn is None)
    T = property(lambda self: self.permute(*reversed(range(self.ndim))))
    mT = property(lambda self: apply(OPS["mT"], self))

    def size(self, dim=None):
        return self.data.shape if dim is None else self.data.shape[dim]

    def dim(self):
        return self.data.ndim

    def numel(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def item(self):
        return self.data.item()

    def numpy(self):
        if self.requires_grad:
            raise RuntimeError(
                "Can't call numpy() on Tensor that requires grad. "
                "Use tensor.detach().numpy() instead."
            )
        return self.data

    def tolist(self):
        return self.data.tolist()

    def __repr__(self):
        extra = f", grad_fn={self.grad_fn!r}" if self.grad_fn else ""
        extra += ", requires_grad=True" if self.requires_grad and not self.grad_fn else ""
        return f"tensor({np.array2string(self.data, separator=', ')}{extra})"

    def __bool__(self):
        return bool(self.data)

    def __float__(self):
        return float(self.data)

    def __int__(self):
        return int(self.data)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # ---- autograd -------------------------------------------------------------------------
    def requires_grad_(self, requires_grad=True):
        if requires_grad and self.data.dtype.kind not in "fc":
            raise RuntimeError(
                f"only Tensors of floating point dtype can require gradients, got {self.dtype}"
            )
        if not self.is_leaf and not requires_grad:
            raise RuntimeError("you can only change requires_grad flags of leaf variables.")
        self.requires_grad = requires_grad
        return self

    def detach(self):
        return Tensor._wrap(self.data, self._version)

    def retain_grad(self):
        if not self.requires_grad:
            raise RuntimeError("can't retain_grad on Tensor that has requires_grad=False")
        if self.grad_fn is not None:
            self._retains_grad = True

    @property
    def retains_grad(self):
        return self._retains_grad

    def register_hook(self, hook):
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
        self._hooks = (self._hooks or []) + [hook]
        return hook

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        from .autograd import run_backward

        run_backward([self], [gradient], retain_graph, create_graph, inputs=inputs)

    @staticmethod
    def _wrap(data, version=None):
        t = Tensor.__new__(Tensor)
        t.data, t.grad, t.grad_fn, t._hooks = data, None, None, None
        t._version = version if version is not None else [0, 0]
        t.requires_grad = t._retains_grad = False
        return t

    # ---- in-place ops: write into .data, bump the version counter -------------------------
    def _inplace(self, name, *others, **params):
        if self.requires_grad and _mode.enabled:
            if self.is_leaf:
                raise RuntimeError(
                    "a leaf Variable that requires grad is being used in an in-place operation."
                )
            # Rebase: the old value becomes the input of the op that now produces self.
            old = Tensor._wrap(self.data, self._version)
            old.requires_grad, old.grad_fn = True, self.grad_fn
            result = apply(OPS[name], old, *others, **params)
            self.data[...] = result.data
            bump_version(self)
            node = self.grad_fn = result.grad_fn
            node.out, node.out_version = self.data, self._version
            # Its output is self as changed now; the old value it read is gone: a rule
            # that reads it can no longer run.
            gone = any(0 in node.op.saves[i] for i, *_ in node.edges)
            node.changes = -1 if gone else _changes[0]
            return self
        other_data = [o.data if isinstance(o, Tensor) else o for o in others]
        result = OPS[name].forward(self.data, *other_data, **params)
        if self.data.shape != np.shape(result):
            raise ValueError(
                f"{name}_: result of shape {np.shape(result)} does not fit in-place into "
                f"a tensor of shape {self.shape}"
            )
        self.data[...] = result
        bump_version(self)
        if any(isinstance(o, Tensor) and o.requires_grad for o in others) and _mode.enabled:
            raise RuntimeError(
                "in-place op with a tensor that requires grad on a tensor that doesn't"
            )
        return self

    def add_(self, other, alpha=1):
        return self._inplace("add", other if alpha == 1 else other * alpha)

    def sub_(self, other, alpha=1):
        return self._inplace("sub", other if alpha == 1 else other * alpha)

    def mul_(self, other):
        return self._inplace("mul", other)

    def div_(self, other):
        return self._inplace("div", other)

    def clamp_(self, min=None, max=None):
        return self._inplace("clamp", min=min, max=max)

    def copy_(self, src):
        with no_grad():
            self.data[...] = src.data if isinstance(src, Tensor) else src
        bump_version(self)
        return self

    def fill_(self, value):
        self.data.fill(value)
        bump_version(self)
        return self

    def zero_(self):
        return self.fill_(0)

    __iadd__ = add_
    __isub__ = sub_
    __imul__ = mul_
    __itruediv__ = div_

    # ---- operators ------------------------------------------------------------------------
    __add__, __radd__ = _operator("add"), _operator("add", reflected=True)
    __sub__, __rsub__ = _operator("sub"), _operator("sub", reflected=True)
    __mul__, __rmul__ = _operator("mul"), _operator("mul", reflected=True)
    __truediv__, __rtruediv__ = _operator("div"), _operator("div", reflected=True)
    __pow__, __rpow__ = _operator("pow"), _operator("pow", reflected=True)

    def __neg__(self):
        return apply(OPS["neg"], self)

    def __matmul__(self, o):
        return matmul(self, o)

    def __rmatmul__(self, o):
        return matmul(o, self)

    def __getitem__(self, index):
        return apply(OPS["getitem"], self, index=_index(index))

    def __setitem__(self, index, value):
        if self.requires_grad and _mode.enabled:
            raise RuntimeError("in-place assignment into a tensor that requires grad")
        self.data[_index(index)] = value.data if isinstance(value, Tensor) else value
        bump_version(self)

    def _compare(self, o, fn):
        return Tensor._wrap(fn(self.data, o.data if isinstance(o, Tensor) else o))

    def __lt__(self, o):
        return self._compare(o, np.less)

    def __le__(self, o):
        return self._compare(o, np.less_equal)

    def __gt__(self, o):
        return self._compare(o, np.greater)

    def __ge__(self, o):
        return self._compare(o, np.greater_equal)

    def __eq__(self, o):
        return self._compare(o, np.equal)

    def __ne__(self, o):
        return self._compare(o, np.not_equal)


_new, _new_node, _ndarray = Tensor.__new__, Node.__new__, np.ndarray


def _index(index):
    """Tensors inside an index become their arrays (advanced indexing)."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    if isinstance(index, list):
        return np.asarray(index)
    return index


def matmul(a, b):
    sa, sb = (
        np.shape(a.data if isinstance(a, Tensor) else a),
        np.shape(b.data if isinstance(b, Tensor) else b),
    )
    ka, kb = sa[-1] if sa else None, (sb[-2] if len(sb) > 1 else sb[0]) if sb else None
    if not sa or not sb or ka != kb:
        raise ValueError(
            f"matmul: shapes {tuple(sa)} and {tuple(sb)} are not aligned "
            f"(inner sizes {ka} and {kb} must match)"
        )
    return apply(OPS["matmul"], a, b)


# The `xp` namespace for rules under create_graph: the same names as ops.NP, as Tensor ops.
def _op_fn(op):
    return lambda *inputs, **params: apply(op, *inputs, **params)


T = _Namespace(
    {name: _op_fn(op) for name, op in OPS.items()}
    | {"raw": lambda x: x.data if isinstance(x, Tensor) else x}
)


def reduce_dims(dim, ndim):
    """PyTorch's dim argument (int, tuple or None) as NumPy's axis tuple."""
    return None if dim is None else _axes(dim, ndim)
