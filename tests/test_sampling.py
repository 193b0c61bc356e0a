"""The canonical tree's blocks: assignment merges each worker's run into tree nodes, and
summing those nodes gives the very bits of the whole tree. And the finiteness check every
block sum passes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgrad.core.sampling import all_finite, assign_blocks, coalesce, tree_split, tree_sum


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


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("lo", [0, 3])
def test_summing_scratch_leaves_in_place_gives_the_same_bits(n, lo):
    rng = np.random.default_rng(n)
    stacked = [rng.normal(size=(n, 4, 3)).astype(np.float32), rng.normal(size=(n, 1))]
    want = tree_sum(lambda i: [s[i - lo] for s in stacked], lo, lo + n)
    scratch = [s.copy() for s in stacked]
    got = tree_sum(lambda i: [s[i - lo] for s in scratch], lo, lo + n, scratch=True)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
    if n > 1:  # a fresh array: the sum keeps none of the k leaves' memory alive
        assert not any(np.shares_memory(g, s) for g, s in zip(got, scratch, strict=True))
    out = [np.empty_like(s[0]) for s in stacked]
    into = tree_sum(lambda i: [s[i - lo] for s in stacked], lo, lo + n, out=out, scratch=True)
    assert all(a is b for a, b in zip(into, out, strict=True))
    assert [g.tobytes() for g in out] == [w.tobytes() for w in want]


def test_a_single_worker_gets_the_whole_tree_and_two_get_halves():
    assert assign_blocks(8, ["a"], 2) == {"a": [(0, 8)]}
    assert assign_blocks(8, ["a", "b"], 2) == {"a": [(0, 4)], "b": [(4, 8)]}
    assert assign_blocks(12, ["a"], 2) == {"a": [(0, 12)]}


_BAD = [np.nan, np.inf, -np.inf]


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, ">f4", np.int64]),
    shape=st.sampled_from([(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (300,), (4097,), (65, 63)]),
    scale=st.sampled_from([1.0, 1e-30, 1e18, 1e20, 1e150, 1e160, 3e38]),
    bad=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(_BAD)), max_size=3),
    seed=st.integers(0, 2**32 - 1),
    strided=st.booleans(),
    shift=st.integers(0, 7),
)
def test_all_finite_agrees_with_isfinite(dtype, shape, scale, bad, seed, strided, shift):
    """The x·x shortcut says what np.isfinite says: for NaN and Inf anywhere, of either
    sign together (no cancelling), for values whose squares overflow, for every dtype."""
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"):  # (the cast of huge values to float16 or int)
        a = (rng.standard_normal(shape) * scale).astype(dtype)
    if a.dtype.kind == "f" and a.size:
        for i, v in bad:
            a.reshape(-1)[i % a.size] = v
    if strided and a.ndim:
        a = np.repeat(a, 2, axis=-1)[..., ::2]  # the same values in a non-contiguous view
    elif shift:  # the same values at any byte offset, as a sum read from shared memory
        raw = np.zeros(a.nbytes + 8, np.uint8)
        raw[shift : shift + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        a = np.frombuffer(raw, a.dtype, a.size, shift).reshape(a.shape)
    want = bool(np.isfinite(a).all())
    assert all_finite([a]) is want
    assert all_finite([np.ones(3, np.float32), a]) is want


_SNAN = [(np.float32, 0x7F800001), (np.float64, 0x7FF0000000000001)]


@pytest.mark.parametrize("dtype, bits", _SNAN)
def test_all_finite_sees_a_signalling_nan(dtype, bits):
    """The bit pattern a lying worker could send that no arithmetic produces."""
    a = np.ones(1000, dtype)
    a.view(np.uint32 if dtype == np.float32 else np.uint64)[517] = bits
    assert not all_finite([a])
