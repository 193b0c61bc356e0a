"""GELU forward + backward: the vectorised erf (core/special.py) against the
np.vectorize(math.erf) it replaced. Prints ms per call and the speed-up per size.

    .venv/bin/python benchmarks/gelu.py
"""

import math
import time

import numpy as np

from shardgrad.core import functional as F
from shardgrad.core import ops
from shardgrad.core.tensor import Tensor

_old = np.vectorize(math.erf, otypes=[np.float64])
OLD = lambda x: _old(x).astype(x.dtype, copy=False)
NEW = ops.OPS["erf"].forward


def per_call(shape, erf, repeat):
    ops.OPS["erf"].forward = erf
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            xt = Tensor(x, requires_grad=True)
            F.gelu(xt).sum().backward()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


if __name__ == "__main__":
    print(f"{'shape':>14} {'old ms':>9} {'new ms':>9} {'speed-up':>9}")
    for shape, repeat in (((16, 64), 300), ((64, 256), 100), ((256, 1024), 10), ((1024, 4096), 2)):
        old, new = per_call(shape, OLD, repeat), per_call(shape, NEW, repeat)
        print(f"{str(shape):>14} {old * 1e3:9.3f} {new * 1e3:9.3f} {old / new:8.1f}x")
    ops.OPS["erf"].forward = NEW
