"""Data sources: `builtin:digits`, `builtin:synthetic`, `file:PATH.npz`.

Every worker loads the same full arrays (bitwise: nothing here depends on BLAS or thread
count) and reads only the indices it is assigned. Files are untrusted: the path is confined
to a data root, .npz members are checked (dtype, size) from their headers before any data
is read, and nothing is ever unpickled. The only exception raised is DataError.

Returned arrays are read-only, because they are shared through a per-process cache:
X is float32 (integer X, e.g. token ids for an embedding, is kept as int64); y is int64
for integer / bool labels and float32 for real targets.
"""

from __future__ import annotations

import functools
import os
import struct
import zipfile

import numpy as np

from .registry import BINARY_LOSSES, LABEL_LOSSES

MAX_FILE_ELEMENTS = 1 << 28  # per array in an .npz; checked before the data is read
SYNTHETIC_DEFAULTS = {
    "task": "classification",
    "n_samples": 1000,
    "n_features": 20,
    "n_classes": 2,
    "noise": 0.1,
    "seed": 0,
}


class DataError(ValueError):
    """A data source that cannot be used, with the reason and the fix."""


def load_dataset(
    data_spec: dict,
    data_root: str | None = None,
    *,
    max_elements: int = MAX_FILE_ELEMENTS,
    verify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) for a spec's `data` table. Relative `file:` paths resolve against data_root
    (or the working directory when None) and may never leave it.

    An uncompressed .npz (np.savez) is memory-mapped, so a process reads only the samples
    it indexes. `verify=False` skips the scan of X for NaN/Inf (the coordinator verifies
    at submit; workers then touch only their own samples)."""
    if not isinstance(data_spec, dict) or not isinstance(data_spec.get("source"), str):
        raise DataError("data spec must be a table with a string 'source'")
    source = data_spec["source"]
    if source == "builtin:digits":
        return _digits()
    if source == "builtin:synthetic":
        params = {**SYNTHETIC_DEFAULTS, **data_spec}
        key = tuple(params[k] for k in SYNTHETIC_DEFAULTS)
        if not all(isinstance(v, (int, float, str)) for v in key):
            raise DataError(f"synthetic data parameters must be numbers or strings: {key}")
        return _synthetic(*key)
    if source.startswith("file:"):
        path = resolve_data_path(source[len("file:") :], data_root)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read data file '{source[5:]}': {exc.strerror}") from None
        # mtime and size in the key: a rewritten file is reloaded, not served stale.
        return _npz(path, st.st_mtime_ns, st.st_size, max_elements, verify)
    raise DataError(
        f"unknown data source {source!r}: use 'builtin:digits', 'builtin:synthetic' "
        "or 'file:PATH.npz'"
    )


def resolve_data_path(path: str, data_root: str | None) -> str:
    """The real path of `path`, which must stay inside data_root (no '..' component, no
    absolute path elsewhere, no symlink pointing out)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise DataError(f"invalid data path {path!r}")
    root = os.path.realpath(data_root if data_root is not None else os.getcwd())
    if ".." in path.replace("\\", "/").split("/"):
        raise DataError(f"data path '{path}' contains '..'; give a path inside the data root")
    real = os.path.realpath(os.path.join(root, path))  # join keeps an absolute path as is
    if os.path.commonpath([real, root]) != root:
        raise DataError(
            f"data path '{path}' is outside the data root '{root}' (absolute paths and "
            "symlinks must stay inside it; copy the file under the data root)"
        )
    return real


# --- sources (cached per process; arrays made read-only so the cache cannot be mutated) ----


def _frozen(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for a in (X, y):
        if a.flags.writeable:
            a.setflags(write=False)
    return X, y


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "builtin:digits needs scikit-learn: pip install 'shardgrad[data]'"
        ) from None
    digits = load_digits()
    X = (digits.data.astype(np.float32) / np.float32(16.0)).astype(np.float32)
    return _frozen(X, digits.target.astype(np.int64))


@functools.lru_cache(maxsize=8)
def _synthetic(task, n_samples, n_features, n_classes, noise, seed):
    # Elementwise operations only (no matmul): bitwise identical on every machine.
    if task not in ("classification", "regression"):
        raise DataError(f"synthetic task must be 'classification' or 'regression', not {task!r}")
    ints = {"n_samples": n_samples, "n_features": n_features, "n_classes": n_classes}
    for name, value in {**ints, "seed": seed}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"synthetic {name} must be a non-negative integer, not {value!r}")
    if n_samples < 1 or n_features < 1 or (task == "classification" and n_classes < 2):
        raise DataError("synthetic data needs n_samples >= 1, n_features >= 1, n_classes >= 2")
    if n_samples * n_features > MAX_FILE_ELEMENTS:
        raise DataError(f"synthetic data of {n_samples} x {n_features} is too large")
    if not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
        raise DataError(f"synthetic noise must be a number >= 0, not {noise!r}")
    rng = np.random.default_rng(seed)
    if task == "classification":
        centers = rng.normal(0.0, 1.0, size=(n_classes, n_features))
        y = rng.integers(0, n_classes, size=n_samples)
        X = centers[y] + noise * rng.normal(0.0, 1.0, size=(n_samples, n_features))
        return _frozen(X.astype(np.float32), y.astype(np.int64))
    w = rng.normal(0.0, 1.0, size=n_features)
    X = rng.normal(0.0, 1.0, size=(n_samples, n_features))
    y = np.zeros(n_samples)
    for j in range(n_features):  # a fixed summation order, unlike X @ w
        y += X[:, j] * w[j]
    y += noise * rng.normal(0.0, 1.0, size=n_samples)
    return _frozen(X.astype(np.float32), y.astype(np.float32).reshape(-1, 1))


def _member(zf: zipfile.ZipFile, path: str, name: str, shown: str, max_elements: int):
    """Check an .npy member's dtype and size from its header, before reading its data; a
    read-only memmap of it when it is stored uncompressed in C order, else None."""
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DataError(f"array '{name[:-4]}' in '{shown}' uses unsupported .npy {version}")
        header_len = f.tell()
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(
            f"array '{name[:-4]}' in '{shown}' has dtype {dtype}; only plain numeric arrays "
            "are allowed (object / pickled arrays are never loaded)"
        )
    if int(np.prod(shape, dtype=object)) > max_elements:
        raise DataError(f"array '{name[:-4]}' in '{shown}' has shape {shape}: too large")
    info = zf.getinfo(name)
    if info.file_size != header_len + dtype.itemsize * int(np.prod(shape, dtype=object)):
        raise DataError(
            f"cannot read '{shown}' as an .npz with arrays X and y: array '{name[:-4]}' "
            f"declares shape {shape} {dtype} but its data is {info.file_size - header_len} bytes"
        )
    if info.compress_type != zipfile.ZIP_STORED or fortran or not all(shape):
        return None
    with open(path, "rb") as raw:  # the local header's own name/extra lengths
        raw.seek(info.header_offset)
        local = raw.read(30)
    n_name, n_extra = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + n_name + n_extra + header_len
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


@functools.lru_cache(maxsize=8)
def _npz(path: str, _mtime: int, _size: int, max_elements: int, verify: bool = True):
    shown = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            arrays = {}
            for key in ("X", "y"):
                if f"{key}.npy" not in names:
                    raise DataError(f"'{shown}' has no array '{key}' (it needs arrays X and y)")
                arrays[key] = _member(zf, path, f"{key}.npy", shown, max_elements)
        if any(a is None for a in arrays.values()):
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] if a is None else a for k, a in arrays.items()}
    except DataError:
        raise
    except Exception as exc:  # BadZipFile, truncated data, bad headers, ...
        raise DataError(f"cannot read '{shown}' as an .npz with arrays X and y: {exc}") from None
    return _frozen(*_normalise(arrays["X"], arrays["y"], shown, verify))


def _normalise(X, y, shown: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    if X.ndim < 2:
        raise DataError(f"X in '{shown}' has shape {X.shape}; it needs (samples, features...)")
    if y.ndim not in (1, 2):
        raise DataError(f"y in '{shown}' has shape {y.shape}; it needs (samples,) or (samples, k)")
    if len(X) != len(y):
        raise DataError(f"'{shown}' has {len(X)} samples in X but {len(y)} in y")
    # copy=False keeps a memmap of float32 / int64 data a memmap (nothing read yet)
    X = X.astype(np.float32 if X.dtype.kind == "f" else np.int64, copy=False)
    y = np.array(y, dtype=np.float32 if y.dtype.kind == "f" else np.int64)
    for name, arr in (("X", X), ("y", y)) if verify else (("y", y),):
        if arr.dtype.kind == "f" and not _all_finite(arr):
            raise DataError(f"{name} in '{shown}' contains NaN or infinity")
    return X, y


def _all_finite(arr: np.ndarray, chunk: int = 1 << 16) -> bool:
    """np.isfinite(arr).all() in slices: bounded memory, even for a memmap larger than RAM."""
    return all(np.isfinite(arr[i : i + chunk]).all() for i in range(0, len(arr), chunk))


def check_against_model(
    X: np.ndarray, y: np.ndarray, input_shape, loss: str, n_outputs: int | None = None
) -> None:
    """Refuse data that does not fit the model, before the job starts."""
    if tuple(X.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"X has per-sample shape {tuple(X.shape[1:])} but the model's input_shape is "
            f"{list(input_shape)}"
        )
    if len(X) != len(y):
        raise DataError(f"X has {len(X)} samples but y has {len(y)}")
    if loss in LABEL_LOSSES:
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise DataError(
                f"loss '{loss}' needs y as integer class labels of shape (n,), "
                f"got {y.dtype} {y.shape}"
            )
        if y.size and y.min() < 0:
            raise DataError(f"loss '{loss}' needs class labels >= 0, y has {y.min()}")
        if n_outputs is not None and y.size and y.max() >= n_outputs:
            raise DataError(
                f"y has class label {y.max()} but the model has only {n_outputs} outputs"
            )
    elif loss in BINARY_LOSSES:
        bad = y[(y != 0) & (y != 1)] if y.size else y
        if bad.size:
            raise DataError(f"loss '{loss}' needs targets 0 or 1, y has {bad.flat[0]}")
        if n_outputs is not None and n_outputs != 1:
            raise DataError(
                f"loss '{loss}' needs a model with 1 output (a logit), this one has {n_outputs}"
            )
    elif loss == "mse":
        if y.dtype.kind != "f":
            raise DataError(f"loss 'mse' needs real-valued targets y, got {y.dtype}")
    else:
        raise DataError(f"unknown loss {loss!r}")
