"""Weights through shared memory, for workers on the coordinator's host.

A worker that reaches the coordinator over ipc:// shares its host (and /dev/shm), so the
round's weights need not travel through the socket to it: the coordinator writes them once
per round into one shared segment, and the TASK carries only its name and layout
(`{"shm": name, "shm_layout": [[dtype, shape, offset], ...]}`), a few hundred bytes instead
of a copy of the model per worker. The worker copies them into its parameters at once.

Why this is safe without locks: the segment changes only when a round ends (after the step,
before the next TASKs go out), and a TASK is only worth anything while its round runs. A
worker that reads the segment late, while the next round's weights go in, computes a result
for a finished round, which the coordinator drops as late whatever it holds.

Nothing a peer says is trusted: the name must be one this module makes, and every array
must fit inside the segment with an allowed dtype, or the TASK is a ProtocolError.
"""

from __future__ import annotations

import math
import re
import secrets
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from . import wire

_NAME = re.compile(r"^sg_[0-9a-f]{16}$")


def usable(address: str) -> bool:
    """Whether a worker at `address` shares the coordinator's host: ipc:// only."""
    return address.startswith("ipc://")


class WeightsBoard:
    """The coordinator's side: one segment, rewritten each round."""

    def __init__(self):
        self.seg: shared_memory.SharedMemory | None = None
        self.layout: list = []
        self.version = None

    def publish(self, arrays: list[np.ndarray], version) -> dict:
        """Write `arrays` (unless `version` is already there); the TASK fields that say
        where they are."""
        layout, offset = [], 0
        for a in arrays:
            layout.append([a.dtype.name, list(a.shape), offset])
            offset += -(-a.nbytes // 64) * 64  # each array cache-line aligned
        if self.seg is None or self.seg.size < offset or layout != self.layout:
            self.close()
            self.seg = shared_memory.SharedMemory(
                name=f"sg_{secrets.token_hex(8)}", create=True, size=max(offset, 1)
            )
            self.layout, self.version = layout, None
        if version != self.version:
            for a, (_, _, off) in zip(arrays, layout, strict=True):
                view = np.ndarray(a.shape, a.dtype, buffer=self.seg.buf, offset=off)
                np.copyto(view, a)
            self.version = version
        return {"shm": self.seg.name, "shm_layout": layout}

    def close(self):
        if self.seg is not None:
            self.seg.close()
            self.seg.unlink()
            self.seg = None


class WeightsReader:
    """The worker's side: segments attached by name (once each), arrays read out."""

    def __init__(self, limits: wire.Limits = wire.DEFAULT_LIMITS):
        self.limits = limits
        self.segs: dict[str, shared_memory.SharedMemory] = {}

    def arrays(self, msg: wire.Message) -> list[np.ndarray]:
        """Read-only views of the weights a TASK points at (copy them before the round
        ends). ProtocolError if the name or layout is not one the coordinator could send."""
        name = wire.field_of(msg, "shm", str)
        layout = wire.field_of(msg, "shm_layout", list)
        if not _NAME.match(name):
            raise wire.ProtocolError(f"TASK names shared memory {name[:40]!r}: not ours")
        seg = self.segs.get(name)
        if seg is None:
            try:
                seg = shared_memory.SharedMemory(name=name)
            except OSError as e:
                raise wire.ProtocolError(f"shared memory {name}: {e}") from None
            # Attaching registers it with this process's resource tracker, which would
            # unlink the coordinator's segment when we exit (Python < 3.13): we do not own it.
            resource_tracker.unregister(seg._name, "shared_memory")
            self.drop()  # the coordinator's previous segment, if any, is gone for good
            self.segs[name] = seg
        out = []
        for i, entry in enumerate(layout):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise wire.ProtocolError(f"shm_layout[{i}] must be [dtype, shape, offset]")
            dtype, shape, off = entry
            if dtype not in self.limits.allowed_dtypes or not isinstance(shape, list):
                raise wire.ProtocolError(f"shm_layout[{i}]: bad dtype or shape")
            if not all(type(d) is int and d >= 0 for d in shape) or type(off) is not int:
                raise wire.ProtocolError(f"shm_layout[{i}]: shape and offset must be ints")
            nbytes = np.dtype(dtype).itemsize * math.prod(shape)
            if off < 0 or off + nbytes > seg.size:
                raise wire.ProtocolError(f"shm_layout[{i}] runs past the segment's end")
            arr = np.ndarray(tuple(shape), np.dtype(dtype), buffer=seg.buf, offset=off)
            arr.flags.writeable = False
            out.append(arr)
        return out

    def drop(self):
        for seg in self.segs.values():
            try:
                seg.close()
            except BufferError:  # a view of it is still alive: the mapping goes with it
                pass
        self.segs.clear()
