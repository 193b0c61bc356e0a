"""What the determinism contract costs, and what our runtime adds on top.

For an MLP step over a global batch B cut into k micro-batches:

* floor: the step hand-written in NumPy the way the contract demands it: forward/backward of
  the k micro-batches stacked (k, m, ...), per-micro-batch weight gradients from one batched
  (3-D) np.matmul, summed by the canonical tree, then SGD. Nothing can do the contract faster.
* tax: floor at k / floor at k = 1 (the price of keeping micro-batches apart).
* runtime: `JobRuntime.block_grad(round, 0, k)` + `apply_step` (SGD), what a one-worker
  round computes, data gathering included.

    OPENBLAS_NUM_THREADS=1 python benchmarks/contract_floor.py
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from shardgrad.core.ops import x_wT  # noqa: E402
from shardgrad.core.sampling import tree_sum  # noqa: E402
from shardgrad.jobspec import parse_spec  # noqa: E402
from shardgrad.malloc import keep_freed_memory  # noqa: E402
from shardgrad.training import JobRuntime  # noqa: E402

LR = 0.01
# floor_step trains one fixed batch over and over: at 0.01 the 256 model's logits overflow
# after ~57 steps (round.py times --rounds of them), and arithmetic on inf is no honest time.
# What a step costs does not depend on the rate.
FLOOR_LR = 0.001
# CPU time of this process (one BLAS thread): what our code costs, whatever else the shared
# machine runs; SHARDGRAD_BENCH_CLOCK=wall for wall-clock time.
WALL = os.environ.get("SHARDGRAD_BENCH_CLOCK") == "wall"
clock = time.perf_counter if WALL else time.process_time
CASES = (((784, 512, 512, 10), 1024), ((784, 256, 256, 10), 256))
KS = (1, 2, 8)


def floor_step(sizes, batch, k):
    rng = np.random.default_rng(0)
    shapes = list(zip(sizes[1:], sizes, strict=False))
    ws = [rng.uniform(-0.05, 0.05, shape).astype(np.float32) for shape in shapes]
    bs = [np.zeros(o, np.float32) for o in sizes[1:]]
    m = batch // k
    x = rng.standard_normal((k, m, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], (k, m))
    rows = np.arange(m)

    def step():
        acts, h = [x], x
        for j, (w, b) in enumerate(zip(ws, bs, strict=True)):
            # h @ w^T per micro-batch, in core linear's GEMM order (plain NumPy)
            h = x_wT(h, np.broadcast_to(w, (k, *w.shape))) + b
            if j < len(ws) - 1:
                h = np.maximum(h, 0)
            acts.append(h)
        z = h - h.max(-1, keepdims=True)
        e = np.exp(z)
        s = e.sum(-1, keepdims=True)
        losses = -(np.take_along_axis(z, y[..., None], -1)[..., 0] - np.log(s[..., 0])).sum(1)
        g = e / s
        g[:, rows, y] -= 1  # d(sum of the micro-batch's losses) / d logits
        grads = [None] * (2 * len(ws))
        for j in range(len(ws) - 1, -1, -1):
            grads[2 * j] = np.matmul(g.transpose(0, 2, 1), acts[j])  # (k, out, in): one GEMM
            grads[2 * j + 1] = g.sum(1)
            if j:
                g = np.matmul(g, np.broadcast_to(ws[j], (k, *ws[j].shape))) * (acts[j] > 0)
        parts = grads + [losses.astype(np.float64)[:, None]]
        total = tree_sum(lambda i: [p[i] for p in parts], 0, k, scratch=True)  # (fresh: ours)
        for j, (w, b) in enumerate(zip(ws, bs, strict=True)):
            w -= FLOOR_LR * (total[2 * j] / batch)
            b -= FLOOR_LR * (total[2 * j + 1] / batch)

    return step


def runtime_step(sizes, batch, k, tmp, per_micro_batch=False):
    rng = np.random.default_rng(0)
    path = os.path.join(tmp, f"mlp{sizes[1]}.npz")
    if not os.path.exists(path):
        X = rng.standard_normal((2 * batch, sizes[0])).astype(np.float32)
        np.savez(path, X=X, y=rng.integers(0, sizes[-1], 2 * batch))
    layers = []
    for out in sizes[1:-1]:
        layers += [{"type": "linear", "out": out}, {"type": "relu"}]
    spec = parse_spec(
        {
            "name": "bench",
            "model": layers + [{"type": "linear", "out": sizes[-1]}],
            "input_shape": [sizes[0]],
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": LR},
            "data": {"source": f"file:{os.path.basename(path)}"},
            "global_batch": batch,
            "micro_batch": batch // k,
            "rounds": 1,
        }
    )
    rt = JobRuntime(spec, data_root=tmp)
    opt = rt.make_optimizer()
    if per_micro_batch:  # the path before stacking: one forward/backward per micro-batch
        return lambda: rt.apply_step(opt, tree_sum(lambda i: rt.unstacked_grad(0, i), 0, k), batch)
    return lambda: rt.apply_step(opt, rt.block_grad(0, 0, k), batch)


def best_times(fns, repeat):
    """Best time of each of `fns`, run interleaved so that load spikes hit all alike."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(repeat):
        for fn, r in zip(fns, runs, strict=True):
            t0 = clock()
            fn()
            r.append(clock() - t0)
    return [min(r) for r in runs]


def main():
    keep_freed_memory()  # as every shardgrad process does (shardgrad/malloc.py)
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    print(f"SGD step, float32, 1 BLAS thread, best of {repeat}, {'wall' if WALL else 'CPU'} time\n")
    print(
        "| model | B | k | floor | tax (floor/floor k=1) | runtime (stacked) | runtime/floor "
        "| per-micro-batch path | its /floor |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for sizes, batch in CASES:
            base = None
            for k in KS:
                fns = [
                    floor_step(sizes, batch, k),
                    runtime_step(sizes, batch, k, tmp),
                    runtime_step(sizes, batch, k, tmp, per_micro_batch=True),
                ]
                tf, tr, to = best_times(fns, repeat)
                base = base or tf
                print(
                    f"| {'-'.join(map(str, sizes))} | {batch} | {k} | {tf * 1e3:.2f} ms | "
                    f"{tf / base:.2f}× | {tr * 1e3:.2f} ms | {tr / tf:.2f}× | "
                    f"{to * 1e3:.2f} ms | {to / tf:.2f}× |"
                )
    print("\ntarget: runtime/floor ≤ 1.15")


if __name__ == "__main__":
    main()
