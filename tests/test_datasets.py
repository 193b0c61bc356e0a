"""Data sources: builtin digits / synthetic, confined .npz files, checks against the model."""

import mmap
import os
import zipfile

import numpy as np
import pytest

from shardgrad.datasets import DataError, check_against_model, load_dataset, resolve_data_path


def write_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def good_arrays(n=20):
    rng = np.random.default_rng(1)
    return {"X": rng.random((n, 4)), "y": rng.integers(0, 3, n)}


def test_digits():
    X, y = load_dataset({"source": "builtin:digits"}, None)
    assert X.shape == (1797, 64) and X.dtype == np.float32 and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0 and set(np.unique(y)) == set(range(10))
    assert not X.flags.writeable  # shared through the cache: read-only
    assert load_dataset({"source": "builtin:digits"}, None)[0] is X


def test_synthetic_classification_is_seeded():
    spec = {"source": "builtin:synthetic", "n_samples": 50, "n_features": 3, "n_classes": 4}
    X, y = load_dataset(spec, None)
    assert X.shape == (50, 3) and X.dtype == np.float32 and y.dtype == np.int64
    assert y.min() >= 0 and y.max() < 4
    X2, y2 = load_dataset({**spec, "seed": 0}, None)
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    X3, _ = load_dataset({**spec, "seed": 1}, None)
    assert not np.array_equal(X, X3)


def test_synthetic_regression():
    spec = {"source": "builtin:synthetic", "task": "regression", "n_samples": 30, "noise": 0.0}
    X, y = load_dataset(spec, None)
    assert X.shape == (30, 20) and y.shape == (30, 1) and y.dtype == np.float32
    check_against_model(X, y, [20], "mse")


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"source": "builtin:synthetic", "task": "x"}, "task must be"),
        ({"source": "builtin:synthetic", "n_samples": -1}, "n_samples must be"),
        ({"source": "builtin:synthetic", "n_classes": 1}, "n_classes >= 2"),
        ({"source": "builtin:synthetic", "noise": float("nan")}, "noise must be"),
        ({"source": "builtin:synthetic", "n_samples": 10**6, "n_features": 10**6}, "too large"),
        ({"source": "builtin:synthetic", "seed": [1]}, "numbers or strings"),
        ({"source": "s3://bucket/x.npz"}, "unknown data source"),
        ({"sauce": "builtin:digits"}, "string 'source'"),
        ("builtin:digits", "string 'source'"),
    ],
)
def test_bad_data_specs(spec, match):
    with pytest.raises(DataError, match=match):
        load_dataset(spec, None)


def test_file_in_root(tmp_path):
    write_npz(tmp_path / "sub" / "d.npz", **good_arrays())
    X, y = load_dataset({"source": "file:sub/d.npz"}, str(tmp_path))
    assert X.shape == (20, 4) and X.dtype == np.float32 and y.dtype == np.int64
    # An absolute path inside the root is fine too.
    X2, _ = load_dataset({"source": f"file:{tmp_path}/sub/d.npz"}, str(tmp_path))
    assert np.array_equal(X, X2)


def test_rewritten_file_is_reloaded(tmp_path):
    path = write_npz(tmp_path / "d.npz", **good_arrays(10))
    assert len(load_dataset({"source": "file:d.npz"}, str(tmp_path))[0]) == 10
    write_npz(path, **good_arrays(12))
    os.utime(path, ns=(1, 1))  # make sure the mtime differs on coarse clocks
    assert len(load_dataset({"source": "file:d.npz"}, str(tmp_path))[0]) == 12


def test_relative_to_cwd_when_no_root(tmp_path, monkeypatch):
    write_npz(tmp_path / "d.npz", **good_arrays())
    monkeypatch.chdir(tmp_path)
    assert len(load_dataset({"source": "file:d.npz"}, None)[0]) == 20
    with pytest.raises(DataError, match="contains '..'"):
        load_dataset({"source": "file:../d.npz"}, None)


@pytest.mark.parametrize(
    "path, match",
    [
        ("../outside.npz", "contains '..'"),
        ("sub/../../outside.npz", "contains '..'"),
        ("sub/..\\..\\outside.npz", "contains '..'"),
        ("/etc/passwd.npz", "is outside the data root"),
        ("", "invalid data path"),
        ("a\x00b.npz", "invalid data path"),
    ],
)
def test_path_escapes(tmp_path, path, match):
    root = tmp_path / "root"
    root.mkdir()
    write_npz(tmp_path / "outside.npz", **good_arrays())
    with pytest.raises(DataError, match=match):
        load_dataset({"source": f"file:{path}"}, str(root))


def test_absolute_path_outside_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = write_npz(tmp_path / "outside.npz", **good_arrays())
    with pytest.raises(DataError, match="outside the data root"):
        load_dataset({"source": f"file:{outside}"}, str(root))


def test_symlink_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = write_npz(tmp_path / "secret" / "x.npz", **good_arrays())
    (root / "link.npz").symlink_to(outside)
    (root / "dir").symlink_to(outside.parent, target_is_directory=True)
    for path in ("link.npz", "dir/x.npz"):
        with pytest.raises(DataError, match="outside the data root"):
            load_dataset({"source": f"file:{path}"}, str(root))
    # A symlink that stays inside the root is fine.
    write_npz(root / "real.npz", **good_arrays())
    (root / "inner.npz").symlink_to(root / "real.npz")
    assert resolve_data_path("inner.npz", str(root)) == os.path.realpath(root / "real.npz")


def test_pickled_npz_is_refused(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, "evil"]
    write_npz(tmp_path / "p.npz", X=np.zeros((2, 3)), y=obj)
    with pytest.raises(DataError, match="dtype object.*never loaded"):
        load_dataset({"source": "file:p.npz"}, str(tmp_path))


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"X": np.zeros((3, 2))}, "has no array 'y'"),
        ({"y": np.zeros(3)}, "has no array 'X'"),
        ({"X": np.zeros(3), "y": np.zeros(3)}, "X in 'd.npz' has shape"),
        ({"X": np.zeros((3, 2)), "y": np.zeros((3, 1, 1))}, "y in 'd.npz' has shape"),
        ({"X": np.zeros((3, 2)), "y": np.zeros(4)}, "3 samples in X but 4 in y"),
        ({"X": np.full((3, 2), np.nan), "y": np.zeros(3)}, "NaN or infinity"),
        ({"X": np.zeros((3, 2), "U3"), "y": np.zeros(3)}, "dtype <U3"),
        ({"X": np.zeros((3, 2), "complex64"), "y": np.zeros(3)}, "dtype complex64"),
        ({"X": np.zeros((3, 2), [("a", "f4")]), "y": np.zeros(3)}, "only plain numeric"),
    ],
)
def test_bad_file_contents(tmp_path, arrays, match):
    write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset({"source": "file:d.npz"}, str(tmp_path))


def test_missing_garbage_and_oversize_files(tmp_path):
    with pytest.raises(DataError, match="cannot read data file 'nope.npz'"):
        load_dataset({"source": "file:nope.npz"}, str(tmp_path))
    (tmp_path / "g.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="cannot read 'g.npz' as an .npz"):
        load_dataset({"source": "file:g.npz"}, str(tmp_path))
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(DataError):
        load_dataset({"source": "file:dir.npz"}, str(tmp_path))
    write_npz(tmp_path / "big.npz", X=np.zeros((100, 10)), y=np.zeros(100))
    with pytest.raises(DataError, match="too large"):
        load_dataset({"source": "file:big.npz"}, str(tmp_path), max_elements=500)


def test_truncated_member(tmp_path):
    path = write_npz(tmp_path / "d.npz", **good_arrays())
    data = zipfile.ZipFile(path).read("X.npy")
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf:
        zf.writestr("X.npy", data[:-16])
        zf.writestr("y.npy", zipfile.ZipFile(path).read("y.npy"))
    with pytest.raises(DataError, match="cannot read 't.npz'"):
        load_dataset({"source": "file:t.npz"}, str(tmp_path))


def test_check_against_model():
    X, y = np.zeros((5, 8, 8), np.float32), np.zeros(5, np.int64)
    with pytest.raises(
        DataError,
        match=r"X has per-sample shape \(8, 8\) but the model's "
        r"input_shape is \[64\]",
    ):
        check_against_model(X, y, [64], "cross_entropy")
    check_against_model(X, y, (8, 8), "cross_entropy")
    check_against_model(X, y + 1, [8, 8], "nll", n_outputs=2)
    with pytest.raises(DataError, match="class label 2 but the model has only 2 outputs"):
        check_against_model(X, y + 2, [8, 8], "nll", n_outputs=2)
    with pytest.raises(DataError, match="integer class labels"):
        check_against_model(X, y.astype(np.float32), [8, 8], "cross_entropy")
    with pytest.raises(DataError, match="labels >= 0"):
        check_against_model(X, y - 1, [8, 8], "cross_entropy")
    with pytest.raises(DataError, match="real-valued targets"):
        check_against_model(X, y, [8, 8], "mse")
    with pytest.raises(DataError, match="targets 0 or 1"):
        check_against_model(X, y + 2, [8, 8], "bce_with_logits")
    with pytest.raises(DataError, match="5 samples but y has 4"):
        check_against_model(X, y[:4], [8, 8], "mse")
    with pytest.raises(DataError, match="unknown loss"):
        check_against_model(X, y, [8, 8], "hinge")


def test_uncompressed_npz_is_memory_mapped_and_equal(tmp_path):
    """np.savez (stored) members are mapped, so a worker reads only the rows it indexes;
    the values equal the compressed path's bit for bit."""
    arrays = good_arrays()
    arrays["X"] = arrays["X"].astype(np.float32)  # already the training dtype: no copy
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    Xp, yp = load_dataset({"source": "file:plain.npz"}, str(tmp_path), verify=False)
    Xc, yc = load_dataset({"source": "file:packed.npz"}, str(tmp_path))
    assert isinstance(Xp.base, mmap.mmap)  # backed by the file, not read into memory
    assert not isinstance(Xc, np.memmap)
    assert np.array_equal(Xp, Xc) and np.array_equal(yp, yc)
    assert not Xp.flags.writeable
