"""A running job's state as a checkpoint and back: weights, optimizer state, the next
round, any partial gradient accumulation, and the metrics so far. That is everything a
resumed run needs to continue bit for bit: the data order and dropout masks are functions
of (seed, epoch, step, micro-batch), so they are never stored."""

import numpy as np


def pack(job) -> tuple[dict, dict]:
    """(arrays, JSON meta) for store.atomic_save."""
    arrays = {f"w{i}": w for i, w in enumerate(job.rt.weights())}
    scalars = {}
    for i, st in job.opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, np.ndarray):
                arrays[f"opt{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    for i, a in enumerate(job.acc or []):
        arrays[f"acc{i}"] = a
    meta = {
        "round": job.next_round,
        "opt_scalars": scalars,
        "metrics": job.metrics,
        "round_times": job.round_times[-20:],
    }
    return arrays, meta


def restore(job, arrays: dict, meta: dict) -> None:
    """Put a packed state back into a freshly built job (same spec)."""
    job.rt.set_weights([arrays[f"w{i}"] for i in range(len(job.rt.params))])
    state: dict = {}
    for key, a in arrays.items():
        if key.startswith("opt"):
            i, k = key[3:].split(".", 1)
            state.setdefault(int(i), {})[k] = a
    for key, v in meta["opt_scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = job.opt.state_dict()["param_groups"]
    job.opt.load_state_dict({"state": state, "param_groups": groups})
    acc = [arrays[f"acc{i}"] for i in range(len(job.rt.params) + 1) if f"acc{i}" in arrays]
    job.acc = acc or None
    job.next_round, job.metrics = meta["round"], meta["metrics"]
    job.round_times = meta.get("round_times", [])
