"""The round engine: one job's training state and what happens after a round's gradient is
summed, with no sockets. `train_local` and the coordinator both drive it, so the step, the
accounting, the metrics rows, evaluation and checkpoints are written once.

    engine.step(total)   accumulate round `next_round`'s summed gradient; at the end of an
                         accumulation group, mean it and step the optimizer; advance
    engine.record(row)   evaluate at epoch ends, keep the row (the coordinator calls it
                         after it has sent the next round out, so workers compute meanwhile)
    engine.pack()        everything a resumed run needs, as (arrays, JSON meta)
    engine.restore(...)  and back
"""

import hashlib
import time
from collections.abc import Callable

import numpy as np

from .core.sampling import add_arrays


class RoundEngine:
    def __init__(self, rt):  # a training.JobRuntime
        self.rt = rt
        self.opt = rt.make_optimizer()
        self.sched = rt.make_scheduler(self.opt)  # None without a `scheduler` in the spec
        self.next_round = 0
        self.acc: list | None = None  # summed gradients of the open accumulation group
        self.metrics: list[dict] = []

    @property
    def done(self) -> bool:
        return self.next_round >= self.rt.total_rounds

    def step(self, total: list[np.ndarray]) -> dict:
        """Account round `next_round` (its canonical gradient sum, loss last); the new row."""
        rt, r = self.rt, self.next_round
        self.acc = total if self.acc is None else add_arrays(self.acc, total)
        if rt.norms:
            rt.update_running_stats(total)  # BatchNorm: once per round, from its micro-batches
        row = {"round": r, "epoch": rt.position(r)[0]}
        row["round_loss"] = float(total[-1][0]) / rt.global_batch
        t0 = time.perf_counter()
        if rt.group_end(r):
            row["lr"] = self.opt.param_groups[0]["lr"]  # the one this step uses
            row["loss"] = rt.apply_step(self.opt, self.acc, rt.group_samples(r), row)
            if self.sched is not None:
                self.sched.step()  # once per optimizer step, after it (as in torch)
            self.acc = None
        row["step_s"] = time.perf_counter() - t0
        self.next_round = r + 1
        return row

    def record(self, row: dict) -> dict:
        """Evaluate on the held-out set if `row` ended an epoch (or the job); keep the row."""
        r = row["round"]
        if r + 1 == self.rt.total_rounds or self.rt.position(r + 1)[1] == 0:
            row.update(self.rt.evaluate())
        self.metrics.append(row)
        return row

    def result(self) -> dict:
        """The final summary a done job stores beside its weights."""
        last = self.metrics[-1] if self.metrics else {}
        return {
            "digest": weights_digest(self.rt.state_dict()),
            "metrics": self.metrics,
            "eval": {k: v for k, v in last.items() if k in ("accuracy", "mse")},
        }

    # ---- checkpoints ------------------------------------------------------------------------
    def pack(self, copy: bool = False) -> tuple[dict, dict]:
        """(arrays, JSON meta): weights, optimizer state, partial accumulation, next round and
        metrics. The data order and dropout masks are functions of (seed, epoch, step,
        micro-batch), so they are never stored. `copy` for a snapshot kept in memory."""
        own = (lambda a: np.array(a, copy=True)) if copy else (lambda a: a)
        arrays = {f"w{i}": own(w) for i, w in enumerate(self.rt.weights())}
        scalars = {}
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                if isinstance(v, np.ndarray):
                    arrays[f"opt{i}.{k}"] = own(v)
                else:
                    scalars[f"{i}.{k}"] = v
        for i, a in enumerate(self.acc or []):
            arrays[f"acc{i}"] = own(a)
        for name, b in self.rt.buffers.items():
            arrays[f"buf.{name}"] = np.array(b, copy=True)
        meta = {"round": self.next_round, "opt_scalars": scalars, "metrics": list(self.metrics)}
        if self.sched is not None:  # JSON floats round-trip exactly (repr)
            meta["sched"] = self.sched.state_dict()
            meta["lr"] = self.opt.param_groups[0]["lr"]
        return arrays, meta

    def restore(self, arrays: dict, meta: dict) -> None:
        """Put a packed state back (same spec)."""
        rt = self.rt
        rt.set_weights([arrays[f"w{i}"] for i in range(len(rt.params))])
        state: dict = {}
        for key, a in arrays.items():
            if key.startswith("opt"):
                i, k = key[3:].split(".", 1)
                state.setdefault(int(i), {})[k] = a  # (load_state_dict copies it)
        for key, v in meta["opt_scalars"].items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        groups = self.opt.state_dict()["param_groups"]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        if self.sched is not None:
            self.sched.load_state_dict(meta["sched"])
            self.opt.param_groups[0]["lr"] = meta["lr"]
        rt.set_buffers({name: arrays[f"buf.{name}"] for name in rt.buffers})
        n = len(rt.sum_layout())
        acc = [np.array(arrays[k]) for i in range(n) if (k := f"acc{i}") in arrays]
        self.acc = acc or None
        self.next_round = meta["round"]
        self.metrics = [row for row in meta["metrics"] if row["round"] < self.next_round]


def run_local(rt, on_round: Callable[[dict], None] | None = None) -> RoundEngine:
    """Every round of `rt`'s job in this process: the whole tree computed here."""
    engine = RoundEngine(rt)
    while not engine.done:
        t0 = time.perf_counter()
        row = engine.step(rt.block_grad(engine.next_round, 0, rt.n_micro))
        row["samples_per_s"] = rt.global_batch / max(time.perf_counter() - t0, 1e-9)
        engine.record(row)
        if on_round:
            on_round(row)
    return engine


def weights_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        a = np.ascontiguousarray(state[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def row_seconds(row: dict):
    """What a metrics row's round cost the job: its pace (step to step) where it has one (on
    workers; ahead on a lease a round's own span can be the coordinator's part alone), else
    its span (computed here, or `train --local`). A row's samples_per_s is the batch over it."""
    return row.get("pace_s", row.get("round_s"))
