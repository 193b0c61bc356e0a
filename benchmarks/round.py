"""Does data parallelism pay off? One table, all peers measured in the same run.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/round.py [--rounds 30] [--trials 3]
                                                                [--no-torch]

For MLPs 784-512-512-10 (B=1024) and 784-256-256-10 (B=256) on builtin:synthetic
classification data, SGD, with micro_batch = B/k for k = 2 and 8, samples/s of:

  sg 1w, sg 2w    shardgrad on a local cluster (coordinator + 1 or 2 worker processes):
                  global_batch / mean pace_s: the coordinator's steps' span from round 1
                  (before it, nobody is ahead) to the last round, over its rounds. Not a
                  median of paces: workers run ahead on a lease (one alone; two on one
                  lease, sending each other their sums) and the coordinator may step a few
                  rounds at once, so single paces are bursty; the span is what the job
                  waits. "sg 2w" puts every round on both workers (--width-probe 0)
  2w f0/local     the same 2 workers with the coordinator stepping every round itself
                  (--follow 0), rather than following their lease by the state it sends:
                  what following is worth, in the same run
  sg 2w auto      the same 2-worker cluster as it runs by default: it times the job on both
                  workers and on one ahead on a lease, and keeps the faster ("on": how
                  many it chose); measured after its probes
  ratios          this machine's speed drifts by +-10 % between minutes, so each shardgrad
                  column is divided by a `train_local` run measured right before it, and
                  compared with DDP through the local run measured right after DDP.
                  --trials N repeats everything and ends with each ratio's median and range
  local           `train_local` (the same spec in one process): B / mean round time, its
                  step and its metrics row (evaluation) as in a job
  floor           the contract's floor: a hand-written NumPy step that keeps the contract
                  (k micro-batches, per-micro-batch weight gradients from one batched
                  np.matmul, summed by the canonical tree, SGD) — benchmarks/contract_floor.py;
                  its steps (at k, and at 1 for the tax) are timed in turn with `local`'s
                  rounds, and both are means, so local/floor compares like with like
  ideal 2w        the floor on two processes at once, each on half the batch (k/2
                  micro-batches), with no communication at all: two workers on this machine
                  if the service cost nothing; ideal/floor (against one such process on the
                  whole batch, timed the same way right before) is the ceiling 2w/local
                  can approach (the processes share the cores, caches and memory)
  lockstep        the same two floors, each step ending at a barrier: both compute at the
                  same time every step, as the members of a synchronous round (ours or DDP's)
                  do; lockstep/floor is the ceiling of any synchronous data parallelism here
  torch           torch eager, one process, whole batch
  ddp 1, ddp 2    torch DistributedDataParallel (gloo), world 1 and 2, B/world per rank

then the goals' ratios, a breakdown of a 2-worker round (median compute / transfer /
reduce / step ms), and what that round costs in CPU, every process together, against
`train_local`'s round: on C cores no pace beats that CPU / C, which bounds 2w/local.
Last, the demo job (examples/jobs/demo.toml) on the 2-worker cluster, as submitted
(placement "auto": small enough to run on the coordinator) and pinned to the workers,
against `train --local`. Every process runs one BLAS / intra-op thread: the workers are
the parallelism. Medians over --rounds rounds after --warmup.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import zmq  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contract_floor import floor_step  # noqa: E402

from shardgrad.cluster import LocalCluster  # noqa: E402
from shardgrad.coordinator.job import Config  # noqa: E402
from shardgrad.coordinator.width import Width  # noqa: E402
from shardgrad.demo import demo_spec  # noqa: E402
from shardgrad.engine import RoundEngine, row_seconds, run_local  # noqa: E402
from shardgrad.jobspec import parse_spec  # noqa: E402
from shardgrad.malloc import keep_freed_memory  # noqa: E402
from shardgrad.training import JobRuntime  # noqa: E402

CONFIGS = [("784-512-512-10", (512, 512), 1024), ("784-256-256-10", (256, 256), 256)]
N_SAMPLES = 8192
LR = 0.01


def make_spec(hidden, batch, rounds, n_micro=8):
    model = []
    for h in hidden:
        model += [{"type": "linear", "out": h}, {"type": "relu"}]
    model.append({"type": "linear", "out": 10})
    return {
        "name": f"bench-{'-'.join(map(str, hidden))}-b{batch}-k{n_micro}",
        "model": model,
        "input_shape": [784],
        "loss": "cross_entropy",
        "optimizer": {"type": "sgd", "lr": LR},
        "data": {
            "source": "builtin:synthetic",
            "task": "classification",
            "n_samples": N_SAMPLES,
            "n_features": 784,
            "n_classes": 10,
            "seed": 0,
        },
        "global_batch": batch,
        "micro_batch": batch // n_micro,
        "rounds": rounds,
        "seed": 0,
        "verify": 0.0,  # verification's cost is measured on its own (benchmarks/verify_cost.py)
        # Evaluation at each epoch's end is the same work in every column that has it; on
        # all 8192 samples it would be a third of the 512 model's compute and swamp the
        # rounds. The demo rows below time whole jobs, evaluation and all.
        "eval": {"holdout": 1 / 128},
        "checkpoint_every": 10**6,  # measure rounds, not checkpoint writes
        "placement": "workers",  # these columns are about the workers (auto picks them too)
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def cpu_seconds(pid) -> float:
    """CPU time process `pid` has used, every thread (/proc/PID/task/*/schedstat: ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # (a thread that just ended)
    return total / 1e9


# A status request costs the coordinator about 0.3 ms of CPU on this machine. Polled every
# 10 ms, as this did, that was 1-3 % of a 2-worker round's CPU, taken from the workers
# (users poll every 0.2 s: Client.wait; 0.5 s: watch). So the wait for a round sleeps about
# half the time its rounds should take, and polls often only close to it.
def _wait_round(c, job, target) -> dict:
    """The job's status once it reaches round `target` (or stops running)."""
    t0, r0 = time.monotonic(), None
    while (now := c.status(job)["job"])["state"] in ("queued", "running"):
        got = now.get("round") or 0
        if got >= target:
            break
        if r0 is None or got <= r0:
            t0, r0 = time.monotonic(), got
            time.sleep(0.01)
            continue
        per_round = (time.monotonic() - t0) / (got - r0)
        time.sleep(min(0.25, max(0.005, (target - got) * per_round / 2)))
    return now


def run_shardgrad(cluster, spec, warmup, span_from=1):
    pids = {"coordinator": cluster.coordinator.pid}
    pids.update((f"worker {i}", p.pid) for i, p in enumerate(cluster.workers) if p.poll() is None)
    with cluster.client(timeout=60) as c:
        job = c.submit(spec)
        # CPU between two rounds well inside the job: not its start (every process loads the
        # data), nor its end (workers on a lease run up to a window ahead of our round count,
        # and stop first), so what the workers ran ahead is the same at both reads
        first = _wait_round(c, job, warmup).get("round") or 0
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        now = _wait_round(c, job, spec["rounds"] - 10)
        cpu = {n: cpu_seconds(p) - cpu0[n] for n, p in pids.items()}
        # (a job done meanwhile: its rounds are all in, and its workers stopped with it)
        counted = (now["round"] if now["state"] == "running" else spec["rounds"]) - first
        status = c.wait(job, timeout=1800, poll=0.05)
        assert status["state"] == "done", status
        rows = c.metrics(job)
    keys = ("round_s", "compute_s", "transfer_s", "reduce_s", "step_s")
    out = {k: median([r[k] for r in rows[warmup:]]) for k in keys}
    out["pace_s"] = statistics.mean(r["pace_s"] for r in rows[span_from:])  # (see the top)
    out["cpu_s"] = {n: t / counted for n, t in cpu.items()} if counted >= 20 else None  # n/a
    return {**out, "on": rows[-1]["workers"]}


PROBE = Config().width_probe  # the coordinator's default --width-probe
# its first stretch, then both ways' (coordinator/width.py)
PROBE_ROUNDS = Width(PROBE).probe_rounds()


def run_auto(cluster, hidden, batch, rounds, warmup, k):
    """The default coordinator: its probes first, then the measured rounds."""
    spec = make_spec(hidden, batch, PROBE_ROUNDS + rounds + warmup, k)
    return run_shardgrad(cluster, spec, PROBE_ROUNDS + warmup, span_from=PROBE_ROUNDS)


def local_round_seconds(spec, warmup, *also):
    """Mean seconds per round of train_local's engine: its step and its metrics row
    (which evaluates at an epoch's end), as run_local runs them. `also`: more steps to time
    the same way, each taken in turn with the rounds (round, also[0], also[1], round, ...),
    so the machine's drift weighs on all alike; then a tuple of every mean, the round's
    first."""
    times = [[] for _ in range(1 + len(also))]
    rt = JobRuntime(parse_spec(spec))
    engine = RoundEngine(rt)
    while not engine.done:
        t0 = time.perf_counter()
        engine.record(engine.step(rt.block_grad(engine.next_round, 0, rt.n_micro)))
        times[0].append(time.perf_counter() - t0)
        for fn, ts in zip(also, times[1:], strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    means = tuple(statistics.mean(ts[warmup:]) for ts in times)
    return means if also else means[0]


def _floor_rank(sizes, batch, k, steps, warmup, barrier, out, lockstep):
    keep_freed_memory()  # (a fresh process: as every shardgrad process does)
    step = floor_step(sizes, batch, k)
    for _ in range(warmup):
        step()
    barrier.wait(timeout=600)  # all start together, so each runs while the others do
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
        if lockstep:
            barrier.wait(timeout=600)
    out.put(time.perf_counter() - t0)


def floor_ranks(sizes, batch, k, steps, warmup, world, lockstep=False):
    """Seconds per step of the floor run by `world` fresh processes at once, each on
    batch/world (k/world micro-batches of the same size) with no communication at all. At
    world 2: what two workers would reach on this machine if the service cost nothing; at
    world 1 the same measurement of one process, so that their ratio compares like with like.
    `lockstep`: every step ends at a barrier, as a synchronous round does (each worker needs
    the others' sums before its next step), so both compute at the same time, every step.
    None when k does not divide."""
    if k % world:
        return None
    mpc = mp.get_context("spawn")
    barrier, out = mpc.Barrier(world), mpc.Queue()
    args = (sizes, batch // world, k // world, steps, warmup, barrier, out, lockstep)
    procs = [mpc.Process(target=_floor_rank, daemon=True, args=args) for _ in range(world)]
    return max(run_ranks(procs, out, world, timeout=600)) / steps


def run_ranks(procs, out, n, timeout):
    """Start `procs`, take `n` results from `out`, and kill and reap whichever is left,
    whatever happens. A rank that exits without its result fails the run at once, naming it,
    instead of leaving the others to wait out the timeout."""
    got, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(got) < n:
            try:
                got.append(out.get(timeout=0.5))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode}") from None
                if time.monotonic() > deadline:
                    missing = f"{n - len(got)} of {n} ranks gave no result in {timeout} s"
                    raise TimeoutError(missing) from None
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    return got


# ---- torch: eager in one process, and DDP with gloo ---------------------------------------
def _torch_model(hidden):
    import torch

    layers, fan_in = [], 784
    for h in hidden:
        layers += [torch.nn.Linear(fan_in, h), torch.nn.ReLU()]
        fan_in = h
    layers.append(torch.nn.Linear(fan_in, 10))
    return torch.nn.Sequential(*layers)


def _data(hidden, batch, steps):
    rt = JobRuntime(parse_spec(make_spec(hidden, batch, steps)))
    idx = [
        np.concatenate([rt.sample_indices(s, k) for k in range(rt.n_micro)]) for s in range(steps)
    ]
    return np.array(rt.X), np.array(rt.y), idx


def _torch_step_times(model, X, y, idx, lr, barrier=None, part=slice(None)):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    times = []
    for rows in idx:
        mine = torch.from_numpy(rows[part])
        if barrier:
            barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[mine]), y[mine])
        loss.backward()  # under DDP: the gradients are all-reduced (averaged) here
        opt.step()
        if barrier:
            barrier()
        times.append(time.perf_counter() - t0)
    return times


def torch_eager(hidden, batch, steps, warmup):
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    X, y, idx = _data(hidden, batch, steps + warmup)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    return median(_torch_step_times(_torch_model(hidden), X, y, idx, LR)[warmup:])


def _ddp_rank(rank, world, init_file, hidden, batch, steps, warmup, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    X, y, idx = _data(hidden, batch, steps + warmup)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_torch_model(hidden))
    per = batch // world
    part = slice(rank * per, (rank + 1) * per)
    times = _torch_step_times(model, X, y, idx, LR, dist.barrier, part)
    if rank == 0:
        out.put(median(times[warmup:]))
    dist.destroy_process_group()


def torch_ddp(hidden, batch, world, steps, warmup):
    tmp = tempfile.mkdtemp(prefix="shardgrad-ddp-")
    mpc = mp.get_context("spawn")
    out = mpc.Queue()
    args = (world, os.path.join(tmp, "init"), hidden, batch, steps, warmup, out)
    procs = [mpc.Process(target=_ddp_rank, daemon=True, args=(r, *args)) for r in range(world)]
    try:
        (step_s,) = run_ranks(procs, out, 1, timeout=1800)  # (rank 0's)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return step_s


# ---- the demo job ---------------------------------------------------------------------------
def demo_rounds(cluster):
    spec = demo_spec()
    t0 = time.perf_counter()
    engine = run_local(JobRuntime(spec))
    local = sum(r["samples_per_s"] ** -1 * spec.global_batch for r in engine.metrics)
    local_wall = time.perf_counter() - t0
    seconds = {}
    with cluster.client(timeout=60) as c:
        for placement in ("auto", "workers"):
            t0 = time.perf_counter()
            job = c.submit({**spec.to_dict(), "placement": placement})
            status = c.wait(job, timeout=1800, poll=0.01)
            wall = time.perf_counter() - t0  # submit to done: evaluation, checkpoints, all
            rows = c.metrics(job)
            where = status.get("placement")
            paces = [row_seconds(r) for r in rows]  # (computed here: no pace)
            seconds[placement] = (sum(paces), wall, where)
    return seconds, local, local_wall, len(rows)


RATIOS = (
    "1w/local",
    "2w/local",
    "2w f0/local",
    "auto/local",
    "1w/ddp1",
    "2w/ddp2",
    "auto/ddp2",
    "local/floor",
    "ideal/floor",
    "lockstep/floor",
)


def ratios(res, torch_times):
    """The goals' ratios of one row. Each shardgrad column is divided by the `train_local`
    time measured right before it (the machine drifts between minutes), and compared with
    DDP through the local time measured right after DDP: sg/ddp = sg/local' x local/ddp."""
    out = {}
    for key, name in (("sg1", "1w"), ("sg2", "2w"), ("sg2f0", "2w f0"), ("auto", "auto")):
        out[f"{name}/local"] = res[f"local@{key}"] / res[key]["pace_s"]  # speed ratios
    if torch_times:
        _, d1, d2 = torch_times
        out["1w/ddp1"] = out["1w/local"] * d1 / res["local"]
        out["2w/ddp2"] = out["2w/local"] * d2 / res["local"]
        out["auto/ddp2"] = out["auto/local"] * d2 / res["local"]
    out["local/floor"] = res["local"] / res["floor"]
    if res.get("2floors"):
        out["ideal/floor"] = res["1floor"] / res["2floors"]  # (speeds: the ceiling of 2w/local)
        out["lockstep/floor"] = res["1floor"] / res["2lockstep"]
    return out


def measure(a, ks, have_torch, with_demo):
    rows, n_rounds, torch_cols = [], a.rounds + a.warmup, {}
    cluster = LocalCluster(workers=2, env={"SHARDGRAD_WIDTH_PROBE": "0"}).start()
    try:
        for label, hidden, batch in CONFIGS:
            if have_torch:
                torch_cols[label] = (
                    torch_eager(hidden, batch, a.rounds, a.warmup),
                    torch_ddp(hidden, batch, 1, a.rounds, a.warmup),
                    torch_ddp(hidden, batch, 2, a.rounds, a.warmup),
                )
            for k in ks:
                spec = make_spec(hidden, batch, n_rounds, k)
                floors = (floor_step((784, *hidden, 10), batch, j) for j in (k, 1))
                res = dict(
                    zip(
                        ("local", "floor", "floor1"),
                        local_round_seconds(spec, a.warmup, *floors),
                        strict=True,
                    )
                )
                sizes = (784, *hidden, 10)
                for key, world, lockstep in (
                    ("1floor", 1, False),
                    ("2floors", 2, False),
                    ("2lockstep", 2, True),
                ):  # (back to back, alike)
                    res[key] = floor_ranks(sizes, batch, k, a.rounds, a.warmup, world, lockstep)
                res["local@sg2"] = local_round_seconds(spec, a.warmup)
                res["sg2"] = run_shardgrad(cluster, spec, a.warmup)
                rows.append((label, hidden, batch, k, res))
                print(f"done: {label} k={k}", file=sys.stderr, flush=True)
        # the coordinator stepping every round itself, not following the lease (--follow 0)
        cluster.coordinator.terminate()
        cluster.coordinator.wait(30)
        cluster.start_coordinator(env={"SHARDGRAD_WIDTH_PROBE": "0", "SHARDGRAD_FOLLOW": "0"})
        cluster.wait_workers(2)
        for _label, hidden, batch, k, res in rows:
            spec = make_spec(hidden, batch, n_rounds, k)
            res["local@sg2f0"] = local_round_seconds(spec, a.warmup)
            res["sg2f0"] = run_shardgrad(cluster, spec, a.warmup)
        # the default coordinator, which chooses how many workers to use
        cluster.coordinator.terminate()
        cluster.coordinator.wait(30)
        cluster.start_coordinator(env={"SHARDGRAD_WIDTH_PROBE": str(PROBE)})
        cluster.wait_workers(2)
        for _label, hidden, batch, k, res in rows:
            res["local@auto"] = local_round_seconds(make_spec(hidden, batch, n_rounds, k), a.warmup)
            res["auto"] = run_auto(cluster, hidden, batch, a.rounds, a.warmup, k)
        # one worker: stop the second (workers first, so its BYE reaches the coordinator)
        cluster.workers[-1].terminate()
        cluster.workers[-1].wait(30)
        cluster.wait_until(lambda c: len(cluster.live_workers(c)) == 1, "one worker left")
        for _label, hidden, batch, k, res in rows:
            spec = make_spec(hidden, batch, n_rounds, k)
            res["local@sg1"] = local_round_seconds(spec, a.warmup)
            res["sg1"] = run_shardgrad(cluster, spec, a.warmup)
        cluster.add_worker()
        cluster.wait_workers(2)
        demo = demo_rounds(cluster) if with_demo else None
    finally:
        cluster.stop()
        shutil.rmtree(cluster.tmp, ignore_errors=True)
    return rows, torch_cols, demo


def print_tables(rows, torch_cols, demo, have_torch):
    print(
        "| model | k | sg 1w | sg 2w | sg 2w auto (on) | local | floor | tax | ideal 2w | torch "
        "| ddp 1 | ddp 2 | " + " | ".join(RATIOS) + " |"
    )
    print("|---" * (12 + len(RATIOS)) + "|")
    for label, _hidden, batch, k, res in rows:
        sps = {key: batch / res[key] for key in ("local", "floor")}
        sps["ideal"] = batch / res["2floors"] if res.get("2floors") else None
        for key in ("sg1", "sg2", "auto"):
            sps[key] = batch / res[key]["pace_s"]
        te, d1, d2 = (batch / t for t in torch_cols[label]) if have_torch else (None,) * 3
        got = ratios(res, torch_cols.get(label))

        def f(x):
            return f"{x:,.0f}" if x else "n/a"

        print(
            f"| {label} B={batch} | {k} | {f(sps['sg1'])} | {f(sps['sg2'])} "
            f"| {f(sps['auto'])} ({res['auto']['on']}) | {f(sps['local'])} "
            f"| {f(sps['floor'])} | {res['floor'] / res['floor1']:.2f}x | {f(sps['ideal'])} "
            f"| {f(te)} | {f(d1)} "
            f"| {f(d2)} | " + " | ".join(
                f"{got[n]:.2f}x" if n in got else "n/a" for n in RATIOS
            ) + " |"
        )  # fmt: skip
    print(
        "\nA 2-worker round in ms: pace is the mean (the span), the rest medians. Round and "
        "transfer\nare a round's own span on the coordinator: ahead on a lease, its sums may "
        "all be in before\nit starts (transfer < 0), so only pace says what a round costs.\n"
    )
    print("| model | k | pace | round | slowest compute | transfer | reduce | step |")
    print("|---|---|---|---|---|---|---|---|")
    for label, _hidden, batch, k, res in rows:
        s = res["sg2"]
        print(
            f"| {label} B={batch} | {k} | {s['pace_s'] * 1e3:.1f} | {s['round_s'] * 1e3:.1f} "
            f"| {s['compute_s'] * 1e3:.1f} "
            f"| {s['transfer_s'] * 1e3:.1f} | {s['reduce_s'] * 1e3:.2f} | {s['step_s'] * 1e3:.2f} |"
        )
    cores = len(os.sched_getaffinity(0))
    print(
        f"\nWhat a 2-worker round costs in CPU (ms per round, every thread; /proc schedstat)"
        f", against\n`train_local`'s round. The processes share {cores} cores, so no pace "
        f"beats their CPU / {cores}:\n2w/local can reach at most {cores} x local / their "
        "CPU (the bound), however well they overlap.\n"
    )
    print("| model | k | coordinator | workers | all | local | 2w/local | bound |")
    print("|---|---|---|---|---|---|---|---|")
    for label, _hidden, batch, k, res in rows:
        cpu, local = res["sg2"]["cpu_s"], res["local@sg2"]
        if cpu is None:
            print(f"| {label} B={batch} | {k} | n/a | n/a | n/a | {local * 1e3:.2f} | | |")
            continue
        each = " + ".join(f"{t * 1e3:.2f}" for n, t in cpu.items() if n != "coordinator")
        total = sum(cpu.values())
        print(
            f"| {label} B={batch} | {k} | {cpu['coordinator'] * 1e3:.2f} | {each} "
            f"| {total * 1e3:.2f} | {local * 1e3:.2f} | {local / res['sg2']['pace_s']:.2f}x "
            f"| {cores * local / total:.2f}x |"
        )
    if demo:
        seconds, local, local_wall, n = demo
        print(
            f"\nDemo job ({n} rounds) on the 2-worker cluster; `train --local` {local:.2f} s "
            f"in rounds ({local_wall:.2f} s wall with evaluation); goal <= 1.5x:\n"
        )
        print("| placement | ran on | s in rounds | vs local | wall s | vs local wall |")
        print("|---|---|---|---|---|---|")
        for placement, (sg, wall, where) in seconds.items():
            print(
                f"| {placement} | {where} | {sg:.2f} | {sg / local:.2f}x | {wall:.2f} "
                f"| {wall / local_wall:.2f}x |"
            )


def print_ranges(trials, have_torch):
    """Each ratio over the trials: median [lowest - highest]."""
    print(f"\nThe ratios over {len(trials)} trials: median [lowest - highest]\n")
    print("| model | k | " + " | ".join(RATIOS) + " |")
    print("|---" * (2 + len(RATIOS)) + "|")
    for i, (label, _hidden, batch, k, _res) in enumerate(trials[0][0]):
        got = [ratios(rows[i][4], cols.get(label)) for rows, cols, _ in trials]
        cells = []
        for n in RATIOS:
            xs = [g[n] for g in got if n in g]
            cells.append(f"{median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if xs else "n/a")
        print(f"| {label} B={batch} | {k} | " + " | ".join(cells) + " |")
    demos = [demo for _, _, demo in trials if demo]
    for placement in demos[0][0] if demos else ():
        xs = [seconds[placement][0] / local for seconds, local, _, _ in demos]
        print(
            f"\nDemo, placement {placement}: s in rounds / `train --local`'s, "
            f"{median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"
        )


def main():
    keep_freed_memory()  # as every shardgrad process does (shardgrad/malloc.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="measured rounds per run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ks", default="2,8", help="micro-batches per global batch")
    ap.add_argument("--trials", type=int, default=1, help="repeat everything; ratio ranges")
    ap.add_argument("--no-torch", action="store_true", help="skip torch eager and DDP")
    ap.add_argument("--no-demo", action="store_true")
    a = ap.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    have_torch = not a.no_torch
    if have_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            have_torch = False
            print("torch is not installed (oracle extra): no torch columns", file=sys.stderr)
    print(
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, pyzmq {zmq.__version__}"
        + (f", torch {__import__('torch').__version__}" if have_torch else "")
        + f"; {a.rounds} measured rounds after {a.warmup} warm-up; samples/s: shardgrad and "
        "local B / mean round (a span: see the top of this file), torch B / median step."
    )
    trials = []
    for t in range(a.trials):
        # The demo in every trial (one run of a job this short is at the mercy of a noisy
        # second); only the first one's `train --local` wall time includes loading the
        # data, which this process caches for the later trials.
        trials.append(measure(a, ks, have_torch, with_demo=not a.no_demo))
        print(f"\n## Trial {t + 1} of {a.trials}\n", flush=True)
        print_tables(*trials[-1], have_torch)
    if a.trials > 1:
        print_ranges(trials, have_torch)


if __name__ == "__main__":
    main()
