"""Shared helpers for the core tests: run the same function on shardgrad.core and on
PyTorch, compare forward values and input gradients; hypothesis strategies for shapes.

torch is imported lazily, so the torch-free tests can import this module too.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shardgrad.core as sg
from shardgrad.core import functional as sgF
from shardgrad.core import nn as sgnn

FLOAT_DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]
# float64: torch.testing.assert_close defaults (rtol=1e-7, atol=1e-7).
# float32: looser than torch's own float32 defaults, since accumulation order differs.
TOL32 = {"rtol": 2e-4, "atol": 5e-5}


def hsettings(n: int = 25, **kw):
    """Modest hypothesis settings: no deadline, few examples (the suite must stay fast)."""
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        **kw,
    )


def tol(dtype, rtol=None, atol=None) -> dict:
    if rtol is not None or atol is not None:
        return {"rtol": rtol, "atol": atol}
    if np.dtype(dtype) == np.float32:
        return dict(TOL32)
    return {"rtol": None, "atol": None}


# ---------------------------------------------------------------- a uniform namespace


class Lib:
    """One namespace over shardgrad.core or torch: ``m.exp``, ``m.F.relu``, ``m.const``."""

    def __init__(self, name: str):
        self.name = name
        if name == "sg":
            self.mod, self.F, self.nn = sg, sgF, sgnn
        else:
            import torch
            import torch.nn.functional as F

            self.mod, self.F, self.nn = torch, F, torch.nn

    def __getattr__(self, attr):
        return getattr(self.mod, attr)

    def const(self, arr):
        """A tensor that does not require grad, with the ndarray's dtype (ints, bools too)."""
        arr = np.asarray(arr)
        if self.name == "sg":
            return sg.tensor(arr.copy(), dtype=arr.dtype)
        import torch

        return torch.tensor(arr.copy())

    def leaf(self, arr, requires_grad=True):
        arr = np.asarray(arr)
        if self.name == "sg":
            return sg.tensor(arr.copy(), requires_grad=requires_grad, dtype=arr.dtype)
        import torch

        return torch.tensor(arr.copy(), requires_grad=requires_grad)

    def __repr__(self):
        return f"Lib({self.name})"


SG = Lib("sg")
_TORCH_LIB = None


def torch_lib() -> Lib:
    global _TORCH_LIB
    if _TORCH_LIB is None:
        _TORCH_LIB = Lib("torch")
    return _TORCH_LIB


# ---------------------------------------------------------------- conversions


def is_torch(t) -> bool:
    return type(t).__module__.split(".")[0] == "torch"


def to_numpy(t):
    """ndarray of an sg Tensor, a torch tensor, an ndarray or a scalar (None stays None)."""
    if t is None:
        return None
    if is_torch(t):
        return t.detach().cpu().numpy()
    if isinstance(t, np.ndarray | np.generic | int | float | bool):
        return np.asarray(t)
    return np.asarray(t.data)


def assert_close(actual, expected, rtol=None, atol=None, what="", check_dtype=True):
    """torch.testing.assert_close on (sg or numpy) ``actual`` vs (torch or numpy) ``expected``.

    Shapes and dtypes must match too (an sg float32 op must give float32 like torch)."""
    import torch

    a = torch.from_numpy(np.array(to_numpy(actual)))
    e = expected.detach() if is_torch(expected) else torch.from_numpy(np.array(expected))
    torch.testing.assert_close(
        a,
        e,
        rtol=rtol,
        atol=atol,
        check_dtype=check_dtype,
        equal_nan=True,
        msg=(lambda m: f"{what}: {m}") if what else None,
    )


def flat_outputs(out) -> list:
    if isinstance(out, tuple | list):
        return list(out)
    return [out]


def check(
    fn,
    inputs,
    dtype=np.float64,
    requires_grad=None,
    rtol=None,
    atol=None,
    seed=0,
    grads=True,
    oracle_dtype=None,
):
    """Run ``fn(m, *tensors)`` with m = sg and m = torch on the same ``inputs`` (ndarrays,
    cast to ``dtype``); compare every output, then backpropagate the same random upstream
    gradient through both and compare every input's ``.grad``.

    ``oracle_dtype``: run torch in this dtype instead (float64 for an op whose float32 torch
    kernel is itself less exact than the tolerance) and compare after casting to ``dtype``.

    ``requires_grad``: per-input flags (default all True). Returns (sg outputs, torch ones).
    """
    import torch

    T = torch_lib()
    dtype = np.dtype(dtype)
    tolerances = tol(dtype, rtol, atol)
    if requires_grad is None:
        requires_grad = [True] * len(inputs)
    arrays = [np.asarray(a, dtype=dtype) for a in inputs]
    sg_in = [SG.leaf(a, rg) for a, rg in zip(arrays, requires_grad, strict=True)]
    th_dtype = np.dtype(oracle_dtype or dtype)
    th_in = [T.leaf(a.astype(th_dtype), rg) for a, rg in zip(arrays, requires_grad, strict=True)]
    as_dtype = torch.from_numpy(np.zeros(0, dtype)).dtype

    def ref(t):  # the oracle's value in the dtype under test
        return t if oracle_dtype is None else t.detach().to(as_dtype)

    th_outs = flat_outputs(fn(T, *th_in))
    sg_outs = flat_outputs(fn(SG, *sg_in))
    assert len(sg_outs) == len(th_outs), f"{len(sg_outs)} outputs, torch gives {len(th_outs)}"
    for k, (s, t) in enumerate(zip(sg_outs, th_outs, strict=True)):
        assert_close(s, ref(t), **tolerances, what=f"forward output {k}")
        if not t.requires_grad:
            assert not getattr(s, "requires_grad", False), f"output {k} should not require grad"
        else:
            assert s.requires_grad, f"output {k} should require grad"
    if not grads:
        return sg_outs, th_outs
    diff = [(s, t) for s, t in zip(sg_outs, th_outs, strict=True) if t.requires_grad]
    if not diff:
        return sg_outs, th_outs
    rng = np.random.default_rng(seed + 12345)
    ups = [rng.standard_normal(t.shape).astype(dtype) for _, t in diff]
    torch.autograd.backward([t for _, t in diff], [torch.tensor(u.astype(th_dtype)) for u in ups])
    if len(diff) == 1:
        diff[0][0].backward(sg.tensor(ups[0], dtype=dtype))
    else:
        total = None
        for (s, _), u in zip(diff, ups, strict=True):
            term = (s * sg.tensor(u, dtype=dtype)).sum()
            total = term if total is None else total + term
        total.backward()
    for i, (s, t) in enumerate(zip(sg_in, th_in, strict=True)):
        if not requires_grad[i]:
            continue
        if t.grad is None:
            assert s.grad is None or not np.any(to_numpy(s.grad)), f"input {i}: grad should be None"
            continue
        assert s.grad is not None, f"input {i}: .grad is None, torch has a gradient"
        assert_close(s.grad, ref(t.grad), **tolerances, what=f"grad of input {i}")
    return sg_outs, th_outs


# ---------------------------------------------------------------- data


def make(rng: np.random.Generator, shape, kind: str = "normal") -> np.ndarray:
    """Random float64 data of a given kind: normal, positive, nonzero, unit (0..1)."""
    shape = tuple(shape)
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if kind == "nonzero":
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    if kind == "unit":
        return rng.uniform(0.0, 1.0, shape)
    raise ValueError(kind)


# ---------------------------------------------------------------- strategies

seeds = st.integers(0, 2**32 - 1)


def shapes(min_dims=0, max_dims=4, min_side=1, max_side=5):
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4):
    """Tuples of ``num_shapes`` shapes that broadcast together (sides of 1 included)."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side
    ).map(lambda bs: bs.input_shapes)


@st.composite
def matmul_shapes(draw):
    """(a_shape, b_shape) valid for matmul: vectors, matrices, broadcast batches."""
    n, k, m = (draw(st.integers(1, 5)) for _ in range(3))
    a_vec, b_vec = draw(st.booleans()), draw(st.booleans())
    a_vec = a_vec and draw(st.booleans())  # vectors a bit rarer
    b_vec = b_vec and draw(st.booleans())
    ba, bb = draw(broadcastable_shapes(2, min_dims=0, max_dims=2, max_side=3))
    a = (k,) if a_vec else tuple(ba) + (n, k)
    b = (k,) if b_vec else tuple(bb) + (k, m)
    return a, b


@st.composite
def shape_and_dim(draw, min_dims=1, max_dims=4, min_side=1, max_side=5):
    shape = draw(shapes(min_dims, max_dims, min_side, max_side))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, dim
