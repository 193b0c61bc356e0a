"""Weights and gradients through shared memory, for workers on the coordinator's host.

A worker that reaches the coordinator over ipc:// shares its host (and /dev/shm), so the
round's weights need not travel through the socket to it: the coordinator writes them once
per round into one shared segment, and the TASK carries only its name and layout
(`{"shm": name, "shm_layout": [[dtype, shape, offset], ...]}`), a few hundred bytes instead
of a copy of the model per worker. The worker copies them into its parameters at once.

Why this is safe without locks: the segment changes only when a round ends (after the step,
before the next TASKs go out), and a TASK is only worth anything while its round runs. A
worker that reads the segment late, while the next round's weights go in, computes a result
for a finished round, which the coordinator drops as late whatever it holds.

The other way, a worker computes each block sum straight into a slot of a small ring in
its own segment (the canonical tree's last addition writes there: no copy), and the GRADS
carries the segment's name, the layout and a sequence number
(`{"shm", "shm_layout", "seq"}`). The coordinator copies the sum out when it takes the
message, and every TASK it sends that worker says how far it has read (`grads_ack`: the
newest seq it has taken or dropped). A slot is written again only after that: every
hand-off between the two processes goes through a socket, so there is no race and no
memory-ordering subtlety. With no free slot, a block sum goes as frames, as it does to an
aggregator (which sends no `grads_ack`).

Nothing a peer says is trusted: the name must be one this module makes, and every array
must fit inside the segment with an allowed dtype, or the message is a ProtocolError.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from . import wire

_NAME = re.compile(r"^sg_[0-9a-f]{16}$")
_MADE_HERE: set[str] = set()  # segments this process created (and will unlink)


def usable(address: str) -> bool:
    """Whether a worker at `address` shares the coordinator's host: ipc:// only."""
    return address.startswith("ipc://")


class WeightsBoard:
    """The coordinator's side: one segment, rewritten each round."""

    def __init__(self):
        self.seg: shared_memory.SharedMemory | None = None
        self.layout: list = []
        self.views: list = []  # where each array of the layout goes
        self.version = None

    def publish(self, arrays: list[np.ndarray], version) -> dict:
        """Write `arrays` (unless `version` is already there); the TASK fields that say
        where they are."""
        if self.seg is not None and version == self.version:  # every TASK after the first
            return {"shm": self.seg.name, "shm_layout": self.layout}
        layout, size = _layout(arrays)
        if self.seg is None or self.seg.size < size or layout != self.layout:
            self.close()
            self.seg, self.layout, self.version = _create(size), layout, None
            self.views = _views(np.frombuffer(self.seg.buf, np.uint8), layout)
        if version != self.version:
            for view, a in zip(self.views, arrays, strict=True):
                np.copyto(view, a)
            self.version = version
        return {"shm": self.seg.name, "shm_layout": layout}

    def close(self):
        if self.seg is not None:
            self.views = []
            _close(self.seg)
            self.seg.unlink()
            self.seg = None


def _layout(arrays) -> tuple[list, int]:
    """[[dtype, shape, offset], ...] with each array cache-line aligned, and the bytes."""
    return _layout_of([(a.shape, a.dtype) for a in arrays])


def _layout_of(shapes) -> tuple[list, int]:
    """_layout of arrays of these (shape, dtype)s. (Once per round on each side: math.prod
    and a cached dtype name, as np.prod and dtype.name cost microseconds each.)"""
    layout, offset = [], 0
    for shape, dtype in shapes:
        dtype = np.dtype(dtype)
        layout.append([_dtype_name(dtype), list(shape), offset])
        offset += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    return layout, offset


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    return dtype.name


def _views(whole: np.ndarray, layout, base: int = 0) -> list[np.ndarray]:
    """Arrays at [dtype, shape, offset] entries of `whole`, a segment as uint8 taken through
    a buffer export (np.frombuffer). Not np.ndarray(buffer=seg.buf): numpy ties those to
    the mmap itself, which SharedMemory.close() then unmaps under a live view; an export
    refuses the close instead (see _close)."""
    out = []
    for dtype, shape, off in layout:
        dtype = np.dtype(dtype)
        start = base + off
        out.append(
            whole[start : start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        )
    return out


def _close(seg: shared_memory.SharedMemory) -> None:
    """Close `seg`. If a view of it still lives (views come from a buffer export,
    np.frombuffer, which refuses the close), its mapping is left to the views: it goes when
    the last one does, never under one; the rest (the file descriptor) is closed now."""
    try:
        seg.close()
    except BufferError:
        seg._buf = seg._mmap = None  # (SharedMemory's own fields: the views hold the map)
        seg.close()


def _create(size):
    seg = shared_memory.SharedMemory(
        name=f"sg_{secrets.token_hex(8)}", create=True, size=max(size, 1)
    )
    _MADE_HERE.add(seg.name)
    return seg


class Attached:
    """Segments another process made, attached by name (once each) and read with a layout
    from a message, every size checked against the segment."""

    def __init__(self, limits: wire.Limits = wire.DEFAULT_LIMITS):
        self.limits = limits
        self.segs: dict[str, shared_memory.SharedMemory] = {}
        self.bytes: dict[str, np.ndarray] = {}  # name -> the segment as uint8 (see views)

    def attach(self, name) -> shared_memory.SharedMemory:
        if not isinstance(name, str) or not _NAME.match(name):
            raise wire.ProtocolError(f"shared memory {str(name)[:40]!r}: not a name of ours")
        seg = self.segs.get(name)
        if seg is None:
            try:
                seg = shared_memory.SharedMemory(name=name)
            except (OSError, ValueError) as e:  # (ValueError: an empty segment)
                raise wire.ProtocolError(f"shared memory {name}: {e}") from None
            # Attaching registers it with this process's resource tracker, which would
            # unlink the owner's segment when we exit (Python < 3.13): we do not own it.
            if name not in _MADE_HERE:
                resource_tracker.unregister(seg._name, "shared_memory")
            self.segs[name] = seg
            self.bytes[name] = np.frombuffer(seg.buf, np.uint8)
        return seg

    def views(self, msg: wire.Message) -> list[np.ndarray]:
        """Read-only views of the arrays `msg` points at. ProtocolError if the name or the
        layout is not one a peer of ours could send."""
        name = wire.field_of(msg, "shm", str)
        seg = self.attach(name)
        layout = wire.field_of(msg, "shm_layout", list)
        for i, entry in enumerate(layout):
            if not (isinstance(entry, list) and len(entry) == 3 and type(entry[2]) is int):
                raise wire.ProtocolError(f"shm_layout[{i}] must be [dtype, shape, offset]")
        # dtypes, shapes and counts: the checks of a message's own array frames
        specs = wire.array_specs([[str(i), d, s] for i, (d, s, _) in enumerate(layout)],
                                 self.limits)  # fmt: skip
        entries = []
        for (_, dtype, shape), (_, _, off) in zip(specs, layout, strict=True):
            if off < 0 or off + dtype.itemsize * math.prod(shape) > seg.size:
                raise wire.ProtocolError(f"shm_layout entry at {off} runs past the segment's end")
            entries.append((dtype, shape, off))
        out = _views(self.bytes[name], entries)
        for arr in out:
            arr.flags.writeable = False
        return out

    def close(self, name=None):
        for n in [name] if name is not None else list(self.segs):
            seg = self.segs.pop(n, None)
            self.bytes.pop(n, None)
            if seg is not None:
                _close(seg)


class WeightsReader(Attached):
    """The worker's side of the weights: only the newest segment is kept attached."""

    def arrays(self, msg: wire.Message) -> list[np.ndarray]:
        """Views of the weights a TASK points at (copy them before the round ends)."""
        name = msg.get("shm")
        if name not in self.segs:
            self.close()  # the coordinator's previous segment, if any, is gone for good
        return self.views(msg)


RING_SLOTS = 4  # at least; a lease of several reads peers' slots in place: worker/peers.py


class GradsRing:
    """The worker's side of the gradients: `slots` slots in its own segment (by default
    RING_SLOTS to 16, as many as fit 64 MiB: workers ahead on a lease hear how far we read
    only every few rounds)."""

    def __init__(self, slots: int | None = None, max_bytes: int = 256 << 20):
        self.fixed, self.max_bytes = slots, max_bytes
        self.slots = slots or RING_SLOTS
        self.seg, self.layout, self.size = None, None, 0
        self.shapes, self.laid_out = None, None  # the last shapes asked for, and their layout
        self.seq = self.acked = 0
        # Puts past this one no coordinator reads (a lease it follows): their slots are free
        # once our peers are through with them, which the lease's lockstep sees to.
        self.peers_from: int | None = None
        self.bytes = None  # the segment as uint8: what every slot view is a view of
        self.views: dict = {}  # slot index -> its arrays' views
        self.retired: list = []  # segments left for their readers (retire)

    def ack(self, seq) -> None:
        if type(seq) is int:
            self.acked = max(self.acked, min(seq, self.seq))

    def peers_only(self) -> None:
        """What we put from now on (until the next segment) only a lease's peers read."""
        self.peers_from = self.seq

    def slot(self, shapes) -> list[np.ndarray] | None:
        """Views of the slot the next `put` fills, for arrays of these (shape, dtype)s, or
        None (no slot free, or too big a model for the ring). A sum computed straight into
        them is not copied again by `put`."""
        if shapes != self.shapes:  # (each round asks twice, as it computes and as it puts)
            self.shapes, self.laid_out = list(shapes), _layout_of(shapes)
        layout, size = self.laid_out
        if layout != self.layout:
            slots = self.fixed or max(RING_SLOTS, min(16, (64 << 20) // max(size, 1)))
            if size * slots > self.max_bytes:
                return None
            self.retire()  # another job's layout (or a new segment after retire)
            self.seg, self.layout, self.size = _create(size * slots), layout, size
            self.slots = slots
            self.bytes = np.frombuffer(self.seg.buf, np.uint8)
            self.acked = self.seq  # nothing in the new segment is waiting to be read
        seq = self.seq + 1
        last = seq - self.slots  # that slot's last sum: may it be unread yet?
        if last > self.acked and (self.peers_from is None or last <= self.peers_from):
            return None
        index = seq % self.slots
        if index not in self.views:
            self.views[index] = _views(self.bytes, layout, index * self.size)
        return self.views[index]

    def put(self, arrays: list[np.ndarray]) -> dict | None:
        """Write a block sum into a free slot: the GRADS fields that point at it, or None
        (no slot free, or too big a model for the ring: send frames)."""
        views = self.slot([(a.shape, a.dtype) for a in arrays])
        if views is None:
            return None
        for view, a in zip(views, arrays, strict=True):
            if not np.may_share_memory(view, a):  # (computed there: nothing to copy)
                np.copyto(view, a)
        self.seq += 1
        base = (self.seq % self.slots) * self.size
        shifted = [[d, shape, base + off] for d, shape, off in self.layout]
        return {"shm": self.seg.name, "shm_layout": shifted, "seq": self.seq}

    def retire(self, keep: int = 2):
        """Write the next sums into a new segment, and leave this one as it is to whoever
        may still read it (a peer of a lease that ended; the coordinator, a GRADS still in
        flight). The `keep` newest retired segments stay; older ones go."""
        if self.seg is not None:
            self.retired.append(self.seg)
            self.seg, self.bytes, self.views, self.layout = None, None, {}, None
            self.peers_from = None
        while len(self.retired) > keep:
            self._drop(self.retired.pop(0))

    def close(self):
        self.retire(keep=0)

    @staticmethod
    def _drop(seg):
        # (a sum computed into a slot may still be referenced: a lease's open accumulation;
        # _close leaves the mapping to it)
        _close(seg)
        seg.unlink()


class GradsReader(Attached):
    """The coordinator's side of the gradients: each worker's segment, and how far it has
    read each worker's GRADS (sent back as `grads_ack`; a worker writes a slot again only
    once it is acked).

    With `hold`, sums are read in place: a GRADS's slot counts as read only at `release()`,
    which its reader calls when nothing it read is in use any more (the coordinator: as a
    round starts, the last one done with). Without, each sum is copied out as it comes."""

    def __init__(self, limits: wire.Limits = wire.DEFAULT_LIMITS, hold: bool = False):
        super().__init__(limits)
        self.hold = hold
        self.read: dict[str, int] = {}  # worker -> the newest seq it may write over
        self.seen: dict[str, int] = {}  # (hold) worker -> the newest seq taken, not released
        self.names: dict[str, str] = {}  # worker -> its segment's name

    def taken(self, wid: str, msg: wire.Message) -> None:
        """GRADS `msg` from `wid` is dealt with (read, or dropped unread): its slot is free,
        or (hold) will be at `release()`."""
        seq, book = msg.get("seq"), self.seen if self.hold else self.read
        if type(seq) is int and seq > book.get(wid, 0):
            book[wid] = seq

    def release(self) -> None:
        """(hold) Nothing read so far is in use any more: every slot taken may be written."""
        for wid, seq in self.seen.items():
            self.read[wid] = max(seq, self.read.get(wid, 0))
        self.seen.clear()

    def load(self, wid: str, msg: wire.Message, copy: bool | None = None) -> None:
        """Put the arrays a GRADS points at into msg.arrays (names as on the wire): views of
        the slot with `hold` (unless `copy`), else copies."""
        name = msg.get("shm")
        old = self.names.get(wid)
        if old is not None and old != name:
            self.close(old)  # the worker made a new ring (another job; views stay valid)
        views = self.views(msg)
        self.names[wid] = name
        names = wire.sum_names(len(views))
        if copy if copy is not None else not self.hold:
            views = [np.array(v, copy=True) for v in views]
        msg.arrays = dict(zip(names, views, strict=True))

    def forget(self, wid: str) -> None:
        """`wid` left or died: let its segment go (views of it stay valid)."""
        self.read.pop(wid, None)
        self.seen.pop(wid, None)
        name = self.names.pop(wid, None)
        if name is not None:
            self.close(name)


class HostPeers:
    """The serving side of the path, for the workers on its host: the coordinator's, and
    each aggregator's for its own workers. One weights board, every local ring read."""

    def __init__(self, limits: wire.Limits = wire.DEFAULT_LIMITS, hold: bool = False):
        self.board, self.grads = WeightsBoard(), GradsReader(limits, hold)

    def task_fields(self, wid: str, weights: list[np.ndarray], version) -> dict:
        """What a TASK to local worker `wid` carries instead of weight frames."""
        return {**self.board.publish(weights, version), **self.acked(wid)}

    def acked(self, wid: str) -> dict:
        """How far we have read `wid`'s ring, for any message to it (a TASK, a STEPPED)."""
        return {"grads_ack": self.grads.read.get(wid, 0)}

    def taken(self, wid: str, msg: wire.Message) -> None:
        """Call on every message from `wid`: a GRADS frees its ring slot, read or not."""
        if msg.type == wire.GRADS:
            self.grads.taken(wid, msg)

    def load(self, wid: str, msg: wire.Message, copy: bool | None = None) -> None:
        """A GRADS about to be used: its sum out of the ring into msg.arrays (GradsReader)."""
        if "shm" in msg:
            self.grads.load(wid, msg, copy)

    def release(self) -> None:
        self.grads.release()

    def forget(self, wid: str) -> None:
        self.grads.forget(wid)

    def close(self) -> None:
        self.board.close()
        self.grads.close()
