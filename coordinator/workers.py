"""Checks on what workers send: a GRADS's arrays against the model, READY's self-report."""

import numpy as np

from .. import wire


def check_grads(msg, params) -> list[np.ndarray]:
    """The GRADS arrays in parameter order (loss last), each checked against the model's
    shape and dtype; ProtocolError naming the first that does not fit."""
    want = [(p.shape, p.dtype) for p in params] + [((1,), np.dtype(np.float64))]
    names = [str(i) for i in range(len(params))] + ["loss"]
    arrays = []
    for name, (shape, dtype) in zip(names, want, strict=True):
        a = msg.arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
            raise wire.ProtocolError(
                f"GRADS array '{name}': expected {dtype}{list(shape)}, got {got}"
            )
        arrays.append(a)
    return arrays


def worker_info(msg) -> dict:
    """What a READY may say about its worker, for `status`: host and pid, nothing else."""
    info = msg.get("info")
    info = info if isinstance(info, dict) else {}
    out = {}
    if isinstance(info.get("host"), str):
        out["host"] = info["host"][:100]
    if type(info.get("pid")) is int:
        out["pid"] = info["pid"]
    return out
