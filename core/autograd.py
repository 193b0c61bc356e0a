"""The backward walk, shared by `Tensor.backward` and `grad`.

Reverse topological order from the outputs; at each node, the rule of every input that
needs a gradient (ops.py) turns the output's gradient into that input's. On the fast path
gradients are ndarrays and rules get `xp = NP`; with `create_graph=True` they are Tensors,
rules get `xp = T`, and the walk itself is recorded, so it can be differentiated again.
"""

import numpy as np

from .ops import NP, sum_to
from .tensor import OPS, T, Tensor, _changes, apply, enable_grad, no_grad

_FREED = (
    "Trying to backward through the graph a second time (or directly access saved tensors "
    "after they have already been freed). Saved intermediate values of the graph are freed "
    "when you call .backward() or autograd.grad(). Specify retain_graph=True if you need to "
    "backward through the graph a second time or if you need to access saved tensors after "
    "calling backward."
)


def _key(t, fn):
    """A vertex of the graph: a tensor's history at the time it was used (its grad_fn
    then), or the leaf tensor itself (both hash by identity)."""
    return fn if fn is not None else t


def _topological(roots):
    """(tensor, grad_fn, key) vertices that need a gradient, each after all computed from
    it. A depth-first walk whose stack holds edges (index, tensor, grad_fn, key), the
    nodes' own tuples, to visit, and vertices (tensor, grad_fn, key), whose inputs are all
    visited, to emit: no tuple is built per edge."""
    order, seen = [], set()
    stack = [(None, r, r.grad_fn, _key(r, r.grad_fn)) for r in roots]
    pop, push, emit = stack.pop, stack.append, order.append
    while stack:
        entry = pop()
        if len(entry) == 3:
            emit(entry)
            continue
        _, t, fn, key = entry
        if key in seen:
            continue
        seen.add(key)
        if fn is None:  # a leaf: emitted at once, as if pushed and popped
            emit((t, None, key))
            continue
        push((t, fn, key))
        for edge in fn.edges:
            if edge[3] not in seen:
                push(edge)
    order.reverse()
    return order


def _check_saved(node):
    """Every value a rule of an input that needs grad will read must be unchanged since
    the forward (PyTorch's saved-tensor check; tensor.py `_changes` says how we know)."""
    if node.freed:
        raise RuntimeError(_FREED)
    op, inputs = node.op, node.inputs
    for i, *_ in node.edges:
        for j in op.saves[0 if op.variadic else i]:
            if j < 0:
                counter = node.out_version
            elif j < len(inputs) and isinstance(inputs[j], Tensor):
                counter = inputs[j]._version
            else:
                continue
            if counter[1] > node.changes:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified "
                    f"by an inplace operation: the input of {node.name()} is at version "
                    f"{counter[0]}, changed after the forward saved it. Hint: do the in-place "
                    "change after backward, or use an out-of-place op (x = x + 1, not x += 1)."
                )


def _seed(root, grad, create_graph):
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(
                f"grad can be implicitly created only for scalar outputs (got shape "
                f"{tuple(root.shape)}); pass gradient= with the output's shape"
            )
        g = np.ones_like(root.data)
    else:
        g = grad.data if isinstance(grad, Tensor) else np.asarray(grad, dtype=root.dtype)
        if g.shape != root.shape:
            raise RuntimeError(
                f"Mismatch in shape: grad_output has a shape of {tuple(g.shape)} and output "
                f"has a shape of {tuple(root.shape)}"
            )
    if create_graph:
        return grad if isinstance(grad, Tensor) else Tensor._wrap(g)
    return g


def _vjps(node, g, create_graph, pending):
    """Add the gradient of every input of `node` that needs one to `pending` (by key)."""
    op, params = node.op, node.params
    if create_graph:
        xp, args = T, node.inputs
        out = apply(op, *args, **params) if op.uses_out else None  # recomputed: on graph
    else:
        xp, out, args = NP, node.out, node.datas
    for i, a, _, key in node.edges:
        if op.variadic:
            ga = op.vjps[0](i, xp, g, out, *args, **params)
        elif params:
            ga = op.vjps[i](xp, g, out, *args, **params)
        else:  # (no empty dict to unpack: the cheap common case)
            ga = op.vjps[i](xp, g, out, *args)
        ad = a.data
        if ga.shape != ad.shape:
            ga = apply(OPS["sum_to"], ga, shape=ad.shape) if create_graph else sum_to(ga, ad.shape)
        elif not create_graph and type(ga) is not np.ndarray:
            ga = np.asarray(ga)  # NumPy returns scalars from 0-d arithmetic
        if ga.dtype is not ad.dtype and ga.dtype != ad.dtype:  # `is`: the cheap common case
            ga = ga.astype(ad.dtype) if not create_graph else apply(_CAST, ga, dtype=ad.dtype)
        prev = pending.get(key)
        pending[key] = ga if prev is None else prev + ga


def _hooked(t, g, create_graph):
    for hook in t._hooks:
        r = hook(g if create_graph else Tensor._wrap(g))
        if r is not None:
            g = r if create_graph else r.data
    return g


def _owned(g, handed):
    """A gradient stored in .grad must be the caller's own writable array, not a view or an
    array also stored elsewhere (add hands the same array to both inputs)."""
    if type(g) is not np.ndarray:
        g = np.array(g)  # a NumPy scalar from 0-d arithmetic: .grad holds arrays
    elif g.base is not None or not g.flags.writeable or id(g) in handed:
        g = g.copy()
    handed.add(id(g))
    return g


def _store(t, g, create_graph, handed):
    if create_graph:
        t.grad = g if t.grad is None else t.grad + g
    elif t.grad is None:
        t.grad = Tensor._wrap(_owned(g, handed))
    elif t.grad.data.flags.writeable and t.grad.shape == g.shape:
        np.add(t.grad.data, g, out=t.grad.data)  # accumulate in place, as PyTorch does
    else:
        t.grad = Tensor._wrap(np.asarray(t.grad.data + g))


def run_backward(roots, grads, retain_graph=None, create_graph=False, inputs=None, capture=None):
    """Backpropagate from `roots`. Leaf gradients accumulate into `.grad`; if `capture` is
    a dict, gradients of the tensors keyed there are stored in it instead."""
    if retain_graph is None:
        retain_graph = create_graph
    for r in roots:
        if not r.requires_grad:
            raise RuntimeError(
                "element 0 of tensors does not require grad and does not have a grad_fn"
            )
    only = None if inputs is None else {id(t) for t in inputs}
    pending: dict[int, object] = {}
    for r, g in zip(roots, grads, strict=True):
        g, key = _seed(r, g, create_graph), _key(r, r.grad_fn)
        pending[key] = g if key not in pending else pending[key] + g
    order, handed = _topological(roots), set()
    free = not retain_graph
    ctx = enable_grad() if create_graph else no_grad()
    with ctx:
        for t, node, key in order:
            g = pending.pop(key, None)
            if g is None:  # (no gradient reached it)
                if free and node is not None and node.op.saves_any:
                    node.freed, node.out, node.datas = True, None, None
                continue
            current = t.grad_fn is node  # not an older version of an in-place-modified tensor
            if t._hooks and current:
                g = _hooked(t, g, create_graph)
            if capture is not None and id(t) in capture and current:
                capture[id(t)] = g
            if node is None:
                if capture is None and (only is None or id(t) in only):
                    _store(t, g, create_graph, handed)
                continue
            if t._retains_grad and capture is None and current:
                t.grad = g if create_graph else Tensor._wrap(_owned(g, handed))
            if node.freed or node.changes != _changes[0]:  # (an in-place change since)
                _check_saved(node)
            _vjps(node, g, create_graph, pending)
            if free and node.op.saves_any:  # (as PyTorch: as soon as its rules have run)
                node.freed, node.out, node.datas = True, None, None


def grad(
    outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False
):
    """Gradients of `outputs` with respect to `inputs`, returned rather than stored in .grad."""
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    single = isinstance(inputs, Tensor)
    inputs = [inputs] if single else list(inputs)
    if grad_outputs is None or isinstance(grad_outputs, Tensor):
        grad_outputs = [grad_outputs] * len(outputs)
    capture = {id(t): None for t in inputs}
    run_backward(outputs, list(grad_outputs), retain_graph, create_graph, capture=capture)
    result = []
    for i, t in enumerate(inputs):
        g = capture[id(t)]
        if g is None and not allow_unused:
            raise RuntimeError(
                f"One of the differentiated Tensors (input {i}) appears to not have been used "
                "in the graph. Set allow_unused=True if this is the desired behavior."
            )
        result.append(None if g is None else (g if create_graph else Tensor._wrap(g.copy())))
    return tuple(result)


_CAST = OPS.get("cast")
