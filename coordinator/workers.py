"""Checks on what workers send: a GRADS's arrays against the model, READY's self-report."""

import numpy as np

from .. import wire


def check_grads(msg, layout) -> list[np.ndarray]:
    """The GRADS arrays (gradients in parameter order, BatchNorm statistics, loss last),
    each checked against `layout` = JobRuntime.sum_layout(): [(shape, dtype)]; ProtocolError
    naming the first that does not fit."""
    want = list(layout)
    names = [str(i) for i in range(len(want) - 1)] + ["loss"]
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
