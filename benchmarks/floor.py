"""The determinism contract's floor: a hand-written NumPy MLP step that keeps the contract.

k micro-batches of m = B/k samples; forward and backward by hand over the stacked (k, m, ...)
arrays; each micro-batch's weight gradient from one batched (3-D) np.matmul; the k gradients
summed by the canonical tree; SGD. Nothing a runtime could remove: what any implementation of
the contract costs at best on one core. floor(k) / floor(1) is the contract's tax.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/floor.py
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from shardgrad.core.sampling import tree_sum  # noqa: E402


def make_mlp(hidden, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [784, *hidden, 10]
    return [
        (
            rng.uniform(-1, 1, (o, i)).astype(np.float32) / np.sqrt(i),
            rng.uniform(-1, 1, o).astype(np.float32) / np.sqrt(i),
        )
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def floor_step(params, X, y, k, lr=0.01):
    """One SGD step over X (B, 784), y (B,) as k micro-batches."""
    B = len(X)
    m = B // k
    h = X.reshape(k, m, -1)
    acts = [h]
    for i, (W, b) in enumerate(params):
        z = np.matmul(h, W.T) + b
        h = z if i == len(params) - 1 else np.maximum(z, 0)
        acts.append(h)
    z = acts[-1]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # loss = mean over the micro-batch * m, so d loss / d logits = softmax - onehot
    p[np.arange(k)[:, None], np.arange(m)[None, :], y.reshape(k, m)] -= 1
    g = p
    grads = []
    for i in range(len(params) - 1, -1, -1):
        W, _ = params[i]
        a = acts[i]
        grads.append((np.matmul(g.transpose(0, 2, 1), a), g.sum(1)))  # (k, out, in), (k, out)
        if i:
            g = np.matmul(g, W) * (a > 0)
    grads.reverse()
    leaves = lambda j: [t for gw, gb in grads for t in (gw[j], gb[j])]  # noqa: E731
    total = tree_sum(leaves, 0, k)
    for (W, b), gw, gb in zip(params, total[::2], total[1::2], strict=True):
        W -= lr * (gw / B)
        b -= lr * (gb / B)


def floor_step_seconds(hidden, batch, k, reps=20, warmup=3):
    params = make_mlp(hidden)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(batch, 784)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    times = []
    for i in range(reps + warmup):
        t0 = time.perf_counter()
        floor_step(params, X, y, k)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    print("| model | k | floor ms | tax (floor k / floor 1) |")
    print("|---|---|---|---|")
    for hidden, batch in (((512, 512), 1024), ((256, 256), 256)):
        one = floor_step_seconds(hidden, batch, 1)
        for k in (1, 2, 4, 8):
            t = floor_step_seconds(hidden, batch, k)
            name = f"784-{hidden[0]}-{hidden[1]}-10 B={batch}"
            print(f"| {name} | {k} | {t * 1e3:.2f} | {t / one:.2f}x |")
