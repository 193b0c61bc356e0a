"""Checks on what workers send: READY's self-report, who a message is from, the training
state a lease we follow sends (STATE). (A GRADS's arrays are checked against the model by
wire.check_grads: workers check their peers' too.)"""

import math

import numpy as np

from .. import wire
from ..core.sampling import all_finite


def worker_info(msg) -> dict:
    """What a READY may say about its worker, for `status`: host, pid and (an aggregator's)
    role and worker count, nothing else."""
    info = msg.get("info")
    info = info if isinstance(info, dict) else {}
    out = {}
    if isinstance(info.get("host"), str):
        out["host"] = info["host"][:100]
    if type(info.get("pid")) is int:
        out["pid"] = info["pid"]
    if info.get("shm") is True:  # on our host (ipc://): the weights via shared memory
        out["shm"] = True
    if info.get("lease") is True:  # it can run ahead on a lease (worker.Lease)
        out["lease"] = True
    if info.get("follow") is True:  # ... and send us its state in place of its sums
        out["follow"] = True
    peer = info.get("peer")  # where peers in a lease of several send it their sums
    if isinstance(peer, str) and peer.startswith("ipc://") and len(peer) <= 200:
        out["peer"] = peer
    # An aggregator (coordinator/aggregator.py) says so, and how many workers it has now.
    if info.get("role") == "aggregator" and type(info.get("workers")) is int:
        out["role"], out["workers"] = "aggregator", max(0, min(info["workers"], 100_000))
        # READY and heartbeats travel on two connections, unordered between them: the
        # count's sequence number lets the newer one win.
        out["seq"] = info["seq"] if type(info.get("seq")) is int else 0
        members = info.get("members")
        if isinstance(members, list):  # its own workers, for `status`: strings, bounded
            out["members"] = [
                {k: m[k][:200] for k in ("id", "state", "reason") if isinstance(m.get(k), str)}
                for m in members[:256]
                if isinstance(m, dict)
            ]
    return out


def sender_of(msg) -> str:
    """The worker a message is from. The id it claims must be the identity of the connection
    it speaks on (its heartbeat socket's is id + "#hb"): nobody can speak for another."""
    wid = wire.field_of(msg, "worker", str)
    expected = f"{wid}#hb" if msg.type == wire.HEARTBEAT else wid
    if not msg.envelope or msg.envelope[0] != expected.encode():
        raise wire.ProtocolError(f"{msg.type} claims worker {wid!r} from another connection")
    return wid


def state_of(msg, engine, since: int, until: int) -> tuple[dict, dict, list]:
    """(arrays, meta, rows) of a STATE that takes `engine` from round `since` to its
    "round" (at most `until`): every array named, shaped and typed as engine.pack's, finite;
    the optimizer's state per parameter ours, or (ours has not stepped yet) all its names,
    shaped as the parameter; the meta's every value of the type ours has; a metrics row of
    numbers per round in between, only the last of them an epoch's end (we evaluate there,
    on these weights). ProtocolError naming the first thing that does not fit."""
    rt = engine.rt
    rnd, rows, meta = wire.require(msg, "round", "rows", "state")
    if type(rnd) is not int or not since < rnd <= until:
        raise wire.ProtocolError(f"STATE of round {rnd!r}: we expect one in {since + 1}..{until}")
    ours, our_meta = engine.pack()
    arrays = {k[6:]: a for k, a in msg.arrays.items() if k.startswith("state.")}
    want = {k: (a.shape, a.dtype) for k, a in ours.items() if not k.startswith(("acc", "opt"))}
    if any(k.startswith("acc") for k in arrays):  # an open accumulation: all of it, or none
        want.update(
            {f"acc{i}": (tuple(s), np.dtype(d)) for i, (s, d) in enumerate(rt.sum_layout())}
        )
    scalars = meta.get("opt_scalars") if isinstance(meta, dict) else None
    if not isinstance(scalars, dict) or not all(type(k) is str for k in scalars):
        raise wire.ProtocolError("STATE meta: not the shape of the engine's")
    opt, counted = type(engine.opt), 0
    for i, p in enumerate(rt.params):  # (what an optimizer keeps is shaped as its parameter)
        mine = (_names(ours, f"opt{i}."), _names(our_meta["opt_scalars"], f"{i}."))
        got = (_names(arrays, f"opt{i}."), _names(scalars, f"{i}."))
        if not any(mine) and any(got):  # (ours has not stepped yet: all it keeps, or none)
            mine = (set(opt.state_arrays), set(opt.state_counts))
        if got != mine:
            raise wire.ProtocolError(f"STATE optimizer state of parameter {i}: {sorted(got[0])}, "
                                     f"{sorted(got[1])}")  # fmt: skip
        for name in got[1]:
            v = scalars[f"{i}.{name}"]
            if type(v) is not int or not 0 <= v < 2**53:
                raise wire.ProtocolError(f"STATE optimizer state {i}.{name}: not a count")
        counted += len(got[1])
        want.update({f"opt{i}.{name}": (p.shape, p.dtype) for name in got[0]})
    if counted != len(scalars):
        raise wire.ProtocolError(
            f"STATE optimizer scalars {sorted(scalars)[:4]}: no such parameter"
        )
    if len(arrays) != len(msg.arrays) or set(arrays) != set(want):
        raise wire.ProtocolError(f"STATE arrays {sorted(msg.arrays)[:8]}: not the model's state")
    for k, (shape, dtype) in want.items():
        if arrays[k].shape != shape or arrays[k].dtype != dtype:
            raise wire.ProtocolError(f"STATE array {k!r}: {arrays[k].dtype}{arrays[k].shape}, "
                                     f"the model's is {dtype}{shape}")  # fmt: skip
    if not all_finite(list(arrays.values())):
        raise wire.ProtocolError("STATE arrays have NaN/Inf")
    skip = ("metrics", "opt_scalars")
    if meta.get("round") != rnd or not _alike(
        {k: v for k, v in meta.items() if k not in skip},
        {k: v for k, v in our_meta.items() if k not in skip},
    ):
        raise wire.ProtocolError("STATE meta: not the shape of the engine's")
    if not isinstance(rows, list) or len(rows) != rnd - since:
        raise wire.ProtocolError(f"STATE rows: expected {rnd - since} rows")
    for i, row in enumerate(rows):
        r = since + i
        ok = isinstance(row, dict) and type(row.get("round")) is int and row["round"] == r
        if not (ok and len(row) <= 16) or not all(
            type(k) is str and len(k) <= 32 and type(v) in (int, float) and math.isfinite(v)
            for k, v in row.items()
        ):
            raise wire.ProtocolError(f"STATE row {i}: not a metrics row of round {r}")
        if r + 1 < rnd and rt.position(r + 1)[1] == 0:
            raise wire.ProtocolError(f"STATE rows: round {r} ends an epoch, so it comes first")
    return arrays, meta, rows


def _names(keys, prefix: str) -> set:
    """The names after `prefix` among `keys` (pack's "opt3.exp_avg", or "3.step" among its
    scalars: parameter 3's)."""
    return {k[len(prefix) :] for k in keys if k.startswith(prefix)}


def _alike(theirs, ours) -> bool:
    """Whether `theirs` has the structure of `ours`: the same keys, lengths and types all the
    way down (an int where ours has a float, too: JSON drops the difference)."""
    if isinstance(ours, dict):
        return (
            isinstance(theirs, dict)
            and theirs.keys() == ours.keys()
            and all(_alike(theirs[k], v) for k, v in ours.items())
        )
    if isinstance(ours, list | tuple):
        return (
            isinstance(theirs, list | tuple)
            and len(theirs) == len(ours)
            and all(map(_alike, theirs, ours))
        )
    if type(ours) is float:
        return type(theirs) in (int, float) and math.isfinite(theirs)
    return type(theirs) is type(ours)
