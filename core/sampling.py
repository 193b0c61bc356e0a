"""The determinism contract in code: data order, micro-batches, RNG, the reduction tree.

Everything here is a pure function of (seed, epoch, step, index): two processes that call
it with the same arguments get bitwise the same answer. See docs/architecture.md.
"""

from collections.abc import Callable, Sequence

import numpy as np

_PERM_STREAM, _MB_STREAM, _SPLIT_STREAM = 1, 2, 3


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n training samples."""
    return np.random.default_rng([seed, _PERM_STREAM, epoch]).permutation(n)


def split_indices(seed: int, n: int, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train / held-out split of n samples (train, held_out), both sorted."""
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    n_hold = int(round(n * holdout))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def micro_batch_rng(seed: int, epoch: int, step: int, index: int) -> np.random.Generator:
    """The random stream of one micro-batch (dropout, ...), independent of who computes it."""
    return np.random.default_rng([seed, _MB_STREAM, epoch, step, index])


def micro_batch_slice(step: int, index: int, global_batch: int, micro_batch: int) -> slice:
    """Positions in the epoch permutation of micro-batch `index` of step `step`."""
    start = step * global_batch + index * micro_batch
    return slice(start, start + micro_batch)


def tree_split(lo: int, hi: int) -> int:
    """Where node [lo, hi) of the canonical pairwise tree splits: at the largest power of
    two strictly below its size, so every aligned power-of-two block is a node."""
    return lo + (1 << ((hi - lo - 1).bit_length() - 1))


def tree_sum(
    leaf: Callable[[int], Sequence[np.ndarray]], lo: int, hi: int, known=None, out=None,
    scratch=False,
):  # fmt: skip
    """Sum node [lo, hi) of the canonical tree; `known` maps already-summed nodes (lo, hi)
    to their value (the coordinator's delivered blocks), `leaf(i)` gives micro-batch i.
    `out`: arrays to write the node's sum into (a worker's ring slot; the same bits).
    `scratch`: the leaves are ours to overwrite, so each node below this one is summed into
    its left child (the same bits, without a fresh array per addition: about half the
    time); this node still goes to `out` or a fresh array, so what is returned keeps none
    of the leaves' memory alive."""
    if known is not None and (lo, hi) in known:
        return known[(lo, hi)]
    if hi - lo == 1:
        return leaf(lo) if out is None or out is _LEFT else copy_arrays(leaf(lo), out)
    assert not (scratch and known), "scratch sums never write into delivered blocks"
    mid = tree_split(lo, hi)
    below = _LEFT if scratch else None
    left = tree_sum(leaf, lo, mid, known, below, scratch)
    right = tree_sum(leaf, mid, hi, known, below, scratch)
    return add_arrays(left, right, left if out is _LEFT else out)


_LEFT = object()  # tree_sum's `out` below a scratch sum: into the left child


def tiles(n: int, blocks) -> bool:
    """`blocks` cover [0, n) exactly once: the whole round, which a lease needs to step."""
    edges = sorted(blocks)
    starts = [lo for lo, _ in edges]
    return bool(edges) and starts[0] == 0 and [hi for _, hi in edges] == starts[1:] + [n]


def add_arrays(left: Sequence[np.ndarray], right: Sequence[np.ndarray], out=None) -> list:
    if out is None:
        return [np.add(a, b) for a, b in zip(left, right, strict=True)]
    return [np.add(a, b, out=o) for a, b, o in zip(left, right, out, strict=True)]


def copy_arrays(arrays: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> list:
    for a, o in zip(arrays, out, strict=True):
        np.copyto(o, a)
    return list(out)


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    """No NaN/Inf in any array (workers check before sending, the coordinator on receipt).

    x·x is NaN or Inf when any x is (squares are never negative, so no Inf cancels), and a
    read-only BLAS pass costs less than np.isfinite's mask; values so large that their
    squares' sum overflows fall back to the exact test."""
    with np.errstate(over="ignore", invalid="ignore"):  # (a huge square: the test decides)
        for a in arrays:
            v = a.reshape(-1)
            if a.dtype in _BLAS_FLOATS and np.isfinite(np.dot(v, v)):
                continue
            if not np.isfinite(a).all():
                return False
    return True


_BLAS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def aligned_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """The aligned blocks of size `block` (a power of two) covering [0, n)."""
    return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


def block_size_for(n: int, workers: int, per_worker: int = 2) -> int:
    """The largest power-of-two block size that still gives every worker `per_worker`
    blocks to share (finer blocks balance load and make reassignment cheap)."""
    target = max(1, workers * per_worker)
    size = 1 << max(0, (n - 1).bit_length())
    while size > 1 and -(-n // size) < target:
        size //= 2
    return size


def assign_blocks(
    n: int, workers: Sequence[str], per_worker: int = 2, capacity: dict | None = None
) -> dict[str, list]:
    """Deal the aligned blocks of [0, n) out to `workers` as contiguous runs, in the
    order given (callers sort it so assignment does not depend on arrival order), each run
    merged into the fewest tree nodes (so a worker with a whole subtree sends one sum).
    `capacity` (default 1 each) weighs the deal: an aggregator with 4 workers behind it
    gets the share of 4, as one contiguous run, so its subtree comes back as one sum."""
    total = sum(capacity.get(w, 1) if capacity else 1 for w in workers)
    blocks = aligned_blocks(n, block_size_for(n, total, per_worker))
    return {w: coalesce(run, n) for w, run in deal(blocks, workers, capacity).items()}


def deal(blocks: Sequence, workers: Sequence[str], capacity: dict | None = None) -> dict:
    """Contiguous runs of `blocks`, one per worker in order, sized by capacity (default 1)."""
    cap = [capacity.get(w, 1) if capacity else 1 for w in workers]
    total, bounds = sum(cap), np.cumsum(cap)  # worker j's share ends at bounds[j]
    out: dict[str, list] = {w: [] for w in workers}
    for i, blk in enumerate(blocks):
        j = int(np.searchsorted(bounds, i * total // len(blocks), side="right"))
        out[workers[j]].append(blk)
    return out


def split_blocks(
    blocks: Sequence[tuple[int, int]],
    n: int,
    workers: Sequence[str],
    per_worker: int = 2,
    capacity: dict | None = None,
) -> dict[str, list]:
    """An aggregator's share of its `blocks` (nodes of the tree of [0, n)) among its local
    `workers`: every block cut into aligned sub-blocks of one power-of-two size, small enough
    that each worker gets `per_worker`, dealt out as contiguous runs (weighed by `capacity`,
    as in assign_blocks: a member may be an aggregator itself) and merged back into the
    fewest nodes without crossing a block (the aggregator sends each block's sum)."""
    blocks = sorted(blocks)
    total = sum(capacity.get(w, 1) if capacity else 1 for w in workers)
    target = max(1, total * per_worker)
    size = 1 << max(0, (max(hi - lo for lo, hi in blocks) - 1).bit_length())

    def pieces(s):
        return [(a, min(a + s, hi)) for lo, hi in blocks for a in range(lo, hi, s)]

    while size > 1 and len(pieces(size)) < target:
        size //= 2
    fine = pieces(size)
    out = deal(fine, workers, capacity)
    owner = {b: next(p for p in blocks if p[0] <= b[0] < p[1]) for b in fine}
    return {
        w: [m for p in blocks for m in coalesce([b for b in run if owner[b] == p], n)]
        for w, run in out.items()
    }


def coalesce(run: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Merge sibling nodes of a contiguous run into their parent, repeatedly: the left child
    [a, a+t) (t a power of two, a a multiple of 2t) and the right child [a+t, min(a+2t, n))
    make node [a, min(a+2t, n)), which the canonical tree splits at a+t."""
    out: list[tuple[int, int]] = []
    for blk in run:
        out.append(blk)
        while len(out) >= 2:
            (a, mid), (mid2, hi) = out[-2], out[-1]
            t = mid - a
            if mid2 != mid or t & (t - 1) or a % (2 * t) or hi != min(a + 2 * t, n):
                break
            out[-2:] = [(a, hi)]
    return out
