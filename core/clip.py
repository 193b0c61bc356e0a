"""`clip_grad_norm_` with `torch.nn.utils.clip_grad_norm_`'s semantics (norm_type 2)."""

import numpy as np


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)), where total_norm is
    the 2-norm of the per-parameter 2-norms (as torch: a norm of norms, in the gradients'
    dtype). Returns total_norm before clipping, as a float."""
    grads = [p.grad.data for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    dtype = grads[0].dtype
    # np.sum is pairwise and never threaded: the same bits in every process
    norms = np.array([np.sqrt(np.sum(np.square(g), dtype=dtype)) for g in grads], dtype)
    total = np.sqrt(np.sum(np.square(norms), dtype=dtype))
    # torch: clip_coef = max_norm / (total + 1e-6) is reciprocal(total + 1e-6) * max_norm
    coef = np.reciprocal(total + dtype.type(1e-6)) * dtype.type(max_norm)
    coef = min(coef, dtype.type(1.0))
    for g in grads:
        g *= coef  # torch multiplies even when the coefficient is clamped to 1
    return float(total)
