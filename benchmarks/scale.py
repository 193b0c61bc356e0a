"""How the coordinator scales with the number of workers: bytes in and out of the coordinator
per round, and round time, for N = 1, 2, 4, ... worker processes on this machine. Prints
markdown (issue 13, part 3; the scale model built on it is docs/scaling.md).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py \
        [--workers 1,2,4,8,16,32] [--rounds 10] [--warmup 2] [--mode star,hierarchical]

Workload: an MLP 784-1250-10 (993,760 float32 parameters, S = 3.98 MB: every copy costs
milliseconds to move) on a small batch (global_batch 64, micro_batch 1: 64 micro-batches,
so every N up to 32 gets 2 blocks per worker and each worker's compute shrinks as 1/N),
builtin:synthetic data, SGD. A probe run with a tiny MLP 784-16-10 (51 kB) measures what a
message costs regardless of its size (--probe-hidden 0 skips it).
One LocalCluster (real coordinator and worker processes) grows from one N to the next;
each job has min_workers = N, so all N workers take part in every round.

Bytes per round, two independent ways:
  * computed: per round the star coordinator sends each worker that holds blocks one TASK
    (header with the spec + a full weight copy) and receives one GRADS per tree node it
    assigned (header + gradient-sized arrays + the 8-byte loss); the nodes are
    `sampling.assign_blocks(n_micro, N workers)`, the exact function the coordinator uses;
    each message's size is `len()` of the frames `shardgrad.wire.encode` makes for it (ZMTP
    adds 9 bytes of framing per frame, counted too). Valid for the star topology only, and
    blind to verification (spec `verify`, 5 % by default: random blocks also computed by a
    second worker, whose GRADS come on top).
  * measured: the worker port is a TCP port on 127.0.0.1 here (not ipc://), and the kernel
    counts every byte of every TCP connection: `ss -tinp` gives bytes_acked (out) and
    bytes_received (in) of each connection the coordinator process owns. The difference
    between a snapshot before the job is submitted and one after it is done, divided by the
    job's rounds, is the coordinator's traffic per round, whatever the topology: heartbeats
    (~100 B per worker per 0.5 s) and the JOB/STOP messages are included and negligible;
    verification's extra GRADS are included too. "n/a" when `ss` is missing.

Round time: the coordinator's own per-round metrics (`Client.metrics(job)` rows), median over
the rounds after the warm-up: `round_s` (first TASK sent -> step done), `compute_s` (the
slowest worker's compute), overhead = round_s - compute_s, and of that the coordinator's
`reduce_s` (summing the block sums) and `step_s`. All N workers and the coordinator share this
machine's cores, so at large N compute_s includes waiting for a core; subtracting it is what
makes the overhead comparable across N.

The fit and the model: least squares (non-negative) of the coordinator's overhead over all
runs gives c0 (per round), c_msg (per message) and bw (bytes per second through the
coordinator), and the reduction's rate; the star model is then checked against every
measured round, and extrapolated to 1-256 hosts on 10 GbE for the performance benchmark's
two MLPs (their per-micro-batch compute is measured here, with 256 micro-batches per round
so that 256 hosts each get one). docs/scaling.md explains the model.

Modes: `star` is every worker speaking to the coordinator. `hierarchical` (issue 13 part
2) puts aggregators in between (coordinator/aggregator.py): 4 host aggregators (as if 4
hosts; workers dealt round-robin) under one root aggregator, so the coordinator hears one
member and exchanges one weights copy and one sum per round whatever N. Its bytes are the
kernel's count (the "computed" column is the star's formula, n/a here); on this one machine
every extra hop is another process on the same 2 cores, so its round time measures the
cost of the hops, not what a network of hosts would see (the extrapolation models that).
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from shardgrad import wire  # noqa: E402
from shardgrad.cluster import LocalCluster  # noqa: E402
from shardgrad.core import nn  # noqa: E402
from shardgrad.core.sampling import assign_blocks  # noqa: E402
from shardgrad.jobspec import parse_spec  # noqa: E402
from shardgrad.training import JobRuntime  # noqa: E402

# mode -> LocalCluster arguments. Hierarchical: a root aggregator above 4 host aggregators
# (as if 4 hosts; workers dealt round-robin), so the coordinator hears one member.
MODES = {"star": {}, "hierarchical": {"aggregators": 4, "root_aggregator": True}}

HIDDEN = 1250
N_FEATURES = 784
GLOBAL_BATCH = 64
MICRO_BATCH = 1
ZMTP_FRAME = 9  # bytes of ZMTP framing per frame (long-frame header: flags + 8-byte size)


def make_spec(rounds, min_workers, hidden=HIDDEN):
    return {
        "name": f"scale-784-{hidden}-10-n{min_workers}",
        "model": [
            {"type": "linear", "out": hidden},
            {"type": "relu"},
            {"type": "linear", "out": 10},
        ],
        "input_shape": [N_FEATURES],
        "loss": "cross_entropy",
        "optimizer": {"type": "sgd", "lr": 0.01},
        "data": {
            "source": "builtin:synthetic",
            "task": "classification",
            "n_samples": 1024,
            "n_features": N_FEATURES,
            "n_classes": 10,
            "seed": 0,
        },
        "global_batch": GLOBAL_BATCH,
        "micro_batch": MICRO_BATCH,
        "rounds": rounds,
        "seed": 0,
        "min_workers": min_workers,
        "checkpoint_every": 10**6,  # measure rounds, not checkpoint writes
        "placement": "workers",  # the probe's model is small enough to run on the coordinator
        "eval": {"holdout": 0.1},
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def _size(frames) -> int:
    return sum(len(memoryview(f).cast("B")) + ZMTP_FRAME for f in frames)


def computed_bytes(spec, n_workers):
    """(out, in, messages out, messages in) of the star coordinator in one round."""
    params = [p.data for p in nn.build(spec["model"], spec["input_shape"], 0).parameters()]
    n_micro = spec["global_batch"] // spec["micro_batch"]
    ids = [f"worker-{i}" for i in range(n_workers)]
    blocks = assign_blocks(n_micro, ids, 2)
    job = "0123456789abcdef"  # a job id's length
    out = n_out = 0
    for wid in ids:
        if blocks[wid]:
            fields = {"job": job, "round": 1, "blocks": [list(b) for b in blocks[wid]]}
            fields["spec"] = spec
            frames = wire.encode(wire.TASK, fields, [(str(i), w) for i, w in enumerate(params)])
            out, n_out = out + _size([wid.encode(), *frames]), n_out + 1
    inn = n_in = 0
    for wid in ids:
        for lo, hi in blocks[wid]:
            fields = {"job": job, "round": 1, "block": [lo, hi], "compute_s": 0.0, "worker": wid}
            arrays = [(str(i), g) for i, g in enumerate(params)] + [("loss", np.zeros(1))]
            inn, n_in = (
                inn + _size([wid.encode(), *wire.encode(wire.GRADS, fields, arrays)]),
                n_in + 1,
            )
    return out, inn, n_out, n_in


_PID = re.compile(r"pid=(\d+)")
_SENT = re.compile(r"bytes_acked:(\d+)")
_RECV = re.compile(r"bytes_received:(\d+)")


def tcp_bytes(pid):
    """(bytes out, bytes in) so far over every TCP connection process `pid` owns; None
    without `ss`."""
    if shutil.which("ss") is None:
        return None
    text = subprocess.run(
        ["ss", "-tinpH"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    out = inn = 0
    mine = False
    for line in text.splitlines():
        if line and not line[0].isspace():  # a connection line; its info follows, indented
            mine = str(pid) in _PID.findall(line)
            continue
        if mine:
            s, r = _SENT.search(line), _RECV.search(line)
            out += int(s.group(1)) if s else 0
            inn += int(r.group(1)) if r else 0
            mine = False
    return out, inn


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_of(row):
    """The optimizer step's seconds in a metrics row: `step_s` where the coordinator reports
    it, else what its definitions leave (transfer_s = round - compute - (reduce + step))."""
    if "step_s" in row:
        return row["step_s"]
    return row["round_s"] - row["compute_s"] - row["transfer_s"] - row["reduce_s"]


def run_mode(mode, ns, rounds, warmup, log, hidden=HIDDEN):
    """{N: result} for one coordinator mode and model, one growing cluster."""
    results = {}
    cluster = LocalCluster(
        workers=ns[0], worker_bind=f"tcp://127.0.0.1:{free_port()}", **mode
    ).start()
    try:
        for n in ns:
            while len(cluster.workers) < n:
                cluster.add_worker()
            cluster.wait_workers(n, timeout=300)
            spec = make_spec(rounds + warmup, n, hidden)
            with cluster.client(timeout=60) as c:
                before = tcp_bytes(cluster.coordinator.pid)
                t0 = time.monotonic()
                job = c.submit(spec)
                status = c.wait(job, timeout=1800, poll=0.1)
                wall = time.monotonic() - t0
                after = tcp_bytes(cluster.coordinator.pid)
                assert status["state"] == "done", status
                all_rows = c.metrics(job)
            rows = all_rows[warmup:]
            measured = None
            if before and after:
                total = len(all_rows)
                measured = ((after[0] - before[0]) / total, (after[1] - before[1]) / total)
            res = {
                "round_s": median([r["round_s"] for r in rows]),
                "compute_s": median([r["compute_s"] for r in rows]),
                "overhead_s": median([r["round_s"] - r["compute_s"] for r in rows]),
                "reduce_s": median([r["reduce_s"] for r in rows]),
                "step_s": median([step_of(r) for r in rows]),
                "workers": sorted({r["workers"] for r in rows}),
                "measured": measured,
                "computed": computed_bytes(spec, n),
                "wall_s": wall,
            }
            results[n] = res
            log(
                f"hidden {hidden}, N={n}: round {res['round_s'] * 1e3:.0f} ms, compute "
                f"{res['compute_s'] * 1e3:.0f} ms, workers/round {res['workers']}, job {wall:.1f} s"
            )
    finally:
        cluster.stop(timeout=60)
        shutil.rmtree(cluster.tmp, ignore_errors=True)
    return results


def nnls(A, y):
    """Least squares with every coefficient >= 0 (a cost cannot be negative): the best of
    the plain fits over each subset of the columns whose coefficients all come out >= 0."""
    best, best_err = np.zeros(A.shape[1]), float(np.sum(y**2))
    for mask in range(1, 1 << A.shape[1]):
        cols = [i for i in range(A.shape[1]) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(A.shape[1])
        full[cols] = coef
        err = float(np.sum((A @ full - y) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


def fit(runs):
    """Least squares over every star run (both model sizes) of

        overhead - reduce - step = c0 + messages * c_msg + bytes / bw

    (messages and bytes in + out of the coordinator, computed), and of reduce = bytes of
    block sums added / add_rate. One model size alone cannot separate c_msg from bw: both
    terms grow with N in the same proportion; the small probe model makes messages cost
    almost nothing in bytes."""
    xs, ys, added, red = [], [], 0.0, 0.0
    for r in runs:
        out, inn, n_out, n_in = r["computed"]
        if r["measured"]:  # the kernel's count also has what the computed one cannot know
            out, inn = r["measured"]  # (verification's second copies of random blocks)
        xs.append([1.0, n_out + n_in, out + inn])
        ys.append(r["overhead_s"] - r["reduce_s"] - r["step_s"])
        added += max(n_in - 1, 1) * r["model_bytes"]
        red += r["reduce_s"]
    A, y = np.array(xs), np.array(ys)
    # Relative errors: the noise (other processes on the cores) grows with the value, and
    # the probe's few ms must count as much as the big model's hundreds.
    w = 1 / np.maximum(np.abs(y), 1e-3)
    c0, c_msg, inv_bw = nnls(A * w[:, None], y * w)
    return {
        "c0": c0,
        "c_msg": c_msg,
        "bw": 1 / inv_bw if inv_bw > 0 else float("inf"),
        "add_rate": added / max(red, 1e-12),
        "pred": A @ np.array([c0, c_msg, inv_bw]),
        "obs": y,
    }


# ---- the scale model (docs/scaling.md) -------------------------------------------------------
TARGETS = [  # the performance benchmark's MLPs (benchmarks/round.py)
    ("MLP 784-512-512-10, B=1024", (512, 512), 1024),
    ("MLP 784-256-256-10, B=256", (256, 256), 256),
]
LINK_10GBE = 1.17e9  # bytes/s of TCP payload on 10 GbE (10 Gb/s less Ethernet/IP/TCP headers)
HOSTS = (1, 8, 32, 256)
MICRO_256 = 256  # micro-batches per round, so that 256 hosts each get one


def n_blocks(n_micro, n):
    """GRADS messages per round: the tree nodes `assign_blocks` hands out (one sum each)."""
    return sum(len(b) for b in assign_blocks(n_micro, [str(i) for i in range(n)], 2).values())


def model_star(n, s_bytes, t_comp, k, link, t_step, n_micro):
    """Predicted star round: compute, then the coordinator's serial work per message and
    per byte (the link's direction that carries most, or the coordinator's own byte rate,
    whichever is slower), the reduction of the block sums, the step."""
    nb = n_blocks(n_micro, n)
    senders = min(n, nb)  # workers without a block get no TASK
    msgs = senders + nb
    move = max(nb * s_bytes / link, (senders + nb) * s_bytes / k["bw"])
    return t_comp + k["c0"] + msgs * k["c_msg"] + move + (nb - 1) * s_bytes / k["add_rate"] + t_step


FANS = (2, 4, 8, 16)  # fan-outs (members per aggregator) tried in the extrapolation


def model_tree(n, s_bytes, t_comp, k, link, t_step, f):
    """Predicted hierarchical round: a tree of aggregators of fan-out f over the hosts,
    ceil(log_f N) levels. At each level an aggregator sends f weight copies down and takes
    f sums up over its own link (store and forward), and adds f - 1 of them; the
    coordinator sends and receives one S."""
    levels = int(np.ceil(np.log(n) / np.log(f) - 1e-9)) if n > 1 else 0
    level = 2 * f * (s_bytes / link + k["c_msg"]) + (f - 1) * s_bytes / k["add_rate"]
    own = 2 * (s_bytes / k["bw"] + k["c_msg"])  # the root's exchange with the coordinator
    return t_comp + k["c0"] + own + levels * level + t_step


def micro_batch_compute(hidden, batch, micro, repeats=7):
    """Median seconds of one micro-batch's forward + backward for an MLP of the targets."""
    model = []
    for h in hidden:
        model += [{"type": "linear", "out": h}, {"type": "relu"}]
    model.append({"type": "linear", "out": 10})
    spec = make_spec(1, 1)
    spec.update(model=model, global_batch=batch, micro_batch=micro)
    spec["data"] = {**spec["data"], "n_samples": 4 * batch}
    rt = JobRuntime(parse_spec(spec))
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        rt.micro_batch_grad(0, i % rt.n_micro)
        times.append(time.perf_counter() - t0)
    n_params = sum(p.data.size for p in rt.params)
    return median(times[2:]), n_params


def mb(x):
    return f"{x / 1e6:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4,8,16,32", help="comma-separated N values")
    ap.add_argument("--rounds", type=int, default=10, help="measured rounds per N")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden width of 784-H-10")
    ap.add_argument(
        "--probe-hidden",
        type=int,
        default=16,
        help="a tiny model run too (star), to separate per-message cost from bandwidth; 0: skip",
    )
    ap.add_argument(
        "--mode", default="star,hierarchical", help="comma-separated: star, hierarchical"
    )
    ap.add_argument("--save", metavar="JSON", help="also write the raw measurements here")
    ap.add_argument("--load", metavar="JSON", help="analyse a --save file instead of running")
    a = ap.parse_args()
    ns = sorted({int(x) for x in a.workers.split(",")})
    modes = [m.strip() for m in a.mode.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; known: {sorted(MODES)}")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    results, probe, target_compute = {}, {}, {}
    if a.load:  # re-analyse a saved run (--save) without running anything
        with open(a.load) as fh:
            saved = json.load(fh)
        results = {m: {int(n): r for n, r in v.items()} for m, v in saved["results"].items()}
        probe = {int(n): r for n, r in saved["probe"].items()}
        target_compute = saved.get("target_compute", {})  # else measured now
        for key, value in saved.get("args", {}).items():
            setattr(a, key, value)  # the run's own settings, for the headers
        ns = sorted({n for v in results.values() for n in v} | set(probe))
    else:
        for mode in modes:
            if MODES[mode] is None:
                log(f"mode {mode}: not implemented in the coordinator yet, printed as n/a")
                results[mode] = {}
                continue
            log(f"mode {mode}: N = {ns}")
            results[mode] = run_mode(MODES[mode], ns, a.rounds, a.warmup, log, a.hidden)
        if a.probe_hidden and "star" in modes:
            log(f"probe: star, MLP 784-{a.probe_hidden}-10, N = {ns}")
            probe = run_mode(MODES["star"], ns, a.rounds, a.warmup, log, a.probe_hidden)
        log("one micro-batch of each target MLP (for the extrapolation)")
        for label, hidden, batch in TARGETS:
            target_compute[label] = micro_batch_compute(hidden, batch, max(1, batch // MICRO_256))
        if a.save:
            with open(a.save, "w") as fh:
                args = {k: getattr(a, k) for k in ("rounds", "warmup", "hidden", "probe_hidden")}
                saved = {"args": args, "results": results, "probe": probe}
                json.dump({**saved, "target_compute": target_compute}, fh, indent=1)
    spec = make_spec(1, 1, a.hidden)
    params = [p.data for p in nn.build(spec["model"], spec["input_shape"], 0).parameters()]
    n_params = sum(p.size for p in params)
    model_bytes = n_params * 4

    probe_bytes = 0
    if probe:
        pspec = make_spec(1, 1, a.probe_hidden)
        probe_bytes = 4 * sum(
            p.data.size for p in nn.build(pspec["model"], pspec["input_shape"], 0).parameters()
        )

    print(
        f"\nMachine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, pyzmq {zmq.__version__}. "
        f"Model MLP 784-{a.hidden}-10: {n_params:,} parameters, S = {mb(model_bytes)} MB; "
        f"global_batch {GLOBAL_BATCH}, micro_batch {MICRO_BATCH}; {a.rounds} measured rounds "
        f"after {a.warmup} warm-up; medians. Goal: coordinator bytes per round <= 2 S = "
        f"{mb(2 * model_bytes)} MB each way. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share the cores).\n"
    )

    def cell(mode, n, f):
        r = results.get(mode, {}).get(n)
        return f(r) if r else "n/a"

    def comp(mode, i):  # the computed count is the star's message pattern only
        return lambda r: mb(r["computed"][i]) if mode == "star" else "n/a"

    def meas(i):
        return lambda r: mb(r["measured"][i]) if r["measured"] else "n/a"

    def per_s(r):
        return f"{(r['measured'] or r['computed'])[1] / model_bytes:.1f}"

    def ms(*keys):
        return lambda r: f"{sum(r[k] for k in keys) * 1e3:.0f}"

    print("### Coordinator bytes per round (MB): computed from the wire format / measured (TCP)\n")
    head = "| N | GRADS / round |"
    for m in modes:
        head += f" {m} out | {m} in | {m} in / S |"
    print(head)
    print("|---" * (2 + 3 * len(modes)) + "|")
    for n in ns:
        line = f"| {n} | {computed_bytes(spec, n)[3]} |"
        for m in modes:
            line += f" {cell(m, n, comp(m, 0))} / {cell(m, n, meas(0))} |"
            line += f" {cell(m, n, comp(m, 1))} / {cell(m, n, meas(1))} |"
            line += f" {cell(m, n, per_s)} |"
        print(line)

    print("\n### Round time (ms, medians)\n")
    head = "| N |"
    for m in modes:
        head += f" {m} round | {m} compute | {m} overhead | {m} reduce + step |"
    print(head)
    print("|---" * (1 + 4 * len(modes)) + "|")
    for n in ns:
        line = f"| {n} |"
        for m in modes:
            line += f" {cell(m, n, ms('round_s'))} | {cell(m, n, ms('compute_s'))} |"
            line += f" {cell(m, n, ms('overhead_s'))} | {cell(m, n, ms('reduce_s', 'step_s'))} |"
        print(line)

    if probe:
        print(
            f"\n### Probe: star, MLP 784-{a.probe_hidden}-10 (S = {probe_bytes / 1e3:.1f} kB), "
            "where per-message costs dominate (ms, medians)\n"
        )
        print("| N | messages in + out | round | compute | overhead | reduce + step |")
        print("|---|---|---|---|---|---|")
        for n in ns:
            r = probe[n]
            print(
                f"| {n} | {r['computed'][2] + r['computed'][3]} | {ms('round_s')(r)} "
                f"| {ms('compute_s')(r)} | {ms('overhead_s')(r)} | {ms('reduce_s', 'step_s')(r)} |"
            )

    star = results.get("star", {})
    if len(star) >= 2:
        for r in star.values():
            r["model_bytes"] = model_bytes
        for r in probe.values():
            r["model_bytes"] = probe_bytes
        runs = [("big", n, star[n]) for n in ns] + [("probe", n, probe[n]) for n in probe]
        f = fit([r for *_, r in runs])
        print(
            "\n### Star fit: overhead - reduce - step = c0 + messages * c_msg + bytes / bw\n\n"
            f"c0 = {f['c0'] * 1e3:.2f} ms, c_msg = {f['c_msg'] * 1e6:.0f} us, "
            f"bw = {f['bw'] / 1e9:.2f} GB/s (the coordinator's, in and out together); "
            f"reduce adds block sums at {f['add_rate'] / 1e9:.2f} GB/s.\n"
        )
        print("| model | N | observed ms | model ms |")
        print("|---|---|---|---|")
        for (which, n, _), obs, pred in zip(runs, f["obs"], f["pred"], strict=True):
            print(f"| {which} | {n} | {obs * 1e3:.1f} | {pred * 1e3:.1f} |")

        # The whole star round, predicted with this machine as the "link" (its measured
        # bandwidth), against the measured round: the model's check at N <= 32.
        print("\n### The star model against the measured round (this machine, ms)\n")
        print("| N | measured round | model round | model coordinator part |")
        print("|---|---|---|---|")
        n_micro = GLOBAL_BATCH // MICRO_BATCH
        step_s = median([star[n]["step_s"] for n in ns])
        for n in ns:
            r = star[n]
            pred = model_star(n, model_bytes, r["compute_s"], f, f["bw"], step_s, n_micro)
            print(
                f"| {n} | {r['round_s'] * 1e3:.0f} | {pred * 1e3:.0f} "
                f"| {(pred - r['compute_s']) * 1e3:.0f} |"
            )

        print(
            f"\n### Extrapolation: {MICRO_256} micro-batches per round, 10 GbE "
            f"({LINK_10GBE / 1e9:.2f} GB/s payload each way), this machine's constants; "
            "hierarchical: a tree of aggregators over the hosts, with the best fan-out f of "
            f"{', '.join(map(str, FANS))} "
            "(ms per round; coordinator MB in per round)\n"
        )
        print(
            "| model | params | hosts | compute | star round | star MB in | "
            "hierarchical round | hierarchical MB in |"
        )
        print("|---|---|---|---|---|---|---|---|")
        step_rate = model_bytes / max(step_s, 1e-9)  # SGD step, bytes of weights per second
        for label, hidden, batch in TARGETS:
            if label not in target_compute:
                target_compute[label] = micro_batch_compute(
                    hidden, batch, max(1, batch // MICRO_256)
                )
            t_mb, n_params = target_compute[label]
            s_bytes = 4 * n_params
            for n in HOSTS:
                t_comp = t_mb * -(-MICRO_256 // n)  # the busiest host's micro-batches
                t_step = s_bytes / step_rate
                st = model_star(n, s_bytes, t_comp, f, LINK_10GBE, t_step, MICRO_256)
                # a deployment picks its tree's fan-out (hosts per aggregator): the best one
                fan, tr = min(
                    ((k, model_tree(n, s_bytes, t_comp, f, LINK_10GBE, t_step, k)) for k in FANS),
                    key=lambda kv: kv[1],
                )
                nb = n_blocks(MICRO_256, n)
                print(
                    f"| {label} | {n_params:,} | {n} | {t_comp * 1e3:.1f} | {st * 1e3:.0f} "
                    f"| {nb * s_bytes / 1e6:,.0f} | {tr * 1e3:.0f} (f = {fan}) "
                    f"| {s_bytes / 1e6:.1f} |"
                )


if __name__ == "__main__":
    main()
