"""The canonical tree's blocks: assignment merges each worker's run into tree nodes, and
summing those nodes gives the very bits of the whole tree."""

import numpy as np
import pytest

from shardgrad.core.sampling import assign_blocks, coalesce, tree_split, tree_sum


def is_node(lo, hi, n, node=None):
    node = node or (0, n)
    if node == (lo, hi):
        return True
    a, b = node
    if b - a == 1 or not (a <= lo and hi <= b):
        return False
    mid = tree_split(a, b)
    return is_node(lo, hi, n, (a, mid)) or is_node(lo, hi, n, (mid, b))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 16, 33])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
def test_assignment_is_tree_nodes_covering_everything_once(n, workers):
    ids = [f"w{i}" for i in range(workers)]
    got = assign_blocks(n, ids, 2)
    blocks = sorted(b for run in got.values() for b in run)
    assert [lo for lo, _ in blocks] == [0] + [hi for _, hi in blocks[:-1]]
    assert blocks[-1][1] == n
    assert all(is_node(lo, hi, n) for lo, hi in blocks)
    for run in got.values():  # nothing left to merge
        assert coalesce(run, n) == run
    rng = np.random.default_rng(n * 10 + workers)
    leaves = [[rng.normal(size=3).astype(np.float32)] for _ in range(n)]
    known = {b: tree_sum(lambda i: leaves[i], *b) for b in blocks}
    whole = tree_sum(lambda i: leaves[i], 0, n)
    assert tree_sum(lambda i: 1 / 0, 0, n, known=known)[0].tobytes() == whole[0].tobytes()


def test_a_single_worker_gets_the_whole_tree_and_two_get_halves():
    assert assign_blocks(8, ["a"], 2) == {"a": [(0, 8)]}
    assert assign_blocks(8, ["a", "b"], 2) == {"a": [(0, 4)], "b": [(4, 8)]}
    assert assign_blocks(12, ["a"], 2) == {"a": [(0, 12)]}
