"""The service's round, measured: (a) per-round overhead against raw ZeroMQ transfer, and
(b) training throughput against torch DistributedDataParallel (gloo). Prints markdown.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/round.py [--rounds 20] [--no-ddp]

(a) overhead = round_s - compute_s, from the coordinator's per-round metrics
    (`Client.metrics`: round time minus the slowest worker's compute), median over the
    rounds after a warm-up. Raw = the time to move the same bytes the same way with bare
    pyzmq: one ROUTER process sends every "worker" process a message with the weights'
    frames, each answers with as many gradient messages (same frames + the 8-byte loss) as
    it holds blocks in a real round, median over many round trips. Target: overhead / raw
    <= 1.5x.
(b) samples/s = global_batch / median round_s with 1 and 2 workers, on MLPs 784-512-512-10
    (B=1024) and 784-256-256-10 (B=256), builtin:synthetic classification data (784
    features, 10 classes), SGD, micro_batch = B/8 (whole blocks per worker). The same
    models, batches and optimizer under torch DDP with the gloo backend, world size 1 and 2
    (spawned processes, one intra-op thread each, each rank B/world samples per step).
    Targets: >= 1.0x DDP on the 512 MLP, >= 1.5x DDP on the 256 MLP.

Every process runs with one BLAS / intra-op thread: the workers are the parallelism.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from shardgrad.cluster import LocalCluster  # noqa: E402
from shardgrad.core import nn  # noqa: E402
from shardgrad.core.sampling import assign_blocks  # noqa: E402
from shardgrad.jobspec import parse_spec  # noqa: E402
from shardgrad.training import JobRuntime  # noqa: E402

CONFIGS = [  # (label, hidden sizes, global batch, DDP target)
    ("MLP 784-512-512-10, B=1024", (512, 512), 1024, 1.0),
    ("MLP 784-256-256-10, B=256", (256, 256), 256, 1.5),
]
N_SAMPLES = 8192
LR = 0.01


def make_spec(hidden, batch, rounds, n_micro=8):
    model = []
    for h in hidden:
        model += [{"type": "linear", "out": h}, {"type": "relu"}]
    model.append({"type": "linear", "out": 10})
    return {
        "name": f"bench-{'-'.join(map(str, hidden))}-b{batch}",
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
        "checkpoint_every": 10**6,  # measure rounds, not checkpoint writes
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---- (b) shardgrad through a real local cluster ---------------------------------------------
def run_shardgrad(cluster, spec, warmup):
    with cluster.client(timeout=60) as c:
        job = c.submit(spec)
        status = c.wait(job, timeout=1800, poll=0.05)
        assert status["state"] == "done", status
        rows = c.metrics(job)[warmup:]
    return {
        "round_s": median([r["round_s"] for r in rows]),
        "compute_s": median([r["compute_s"] for r in rows]),
        "overhead_s": median([r["round_s"] - r["compute_s"] for r in rows]),
        "reduce_s": median([r["reduce_s"] for r in rows]),
        "step_s": median([r["step_s"] for r in rows]),
        "workers": {r["workers"] for r in rows},
    }


# ---- (a) raw ZeroMQ: the same frames, the same pattern ---------------------------------------
def _raw_peer(address, ident, grad_shapes, n_replies):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, ident)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    grads = [np.ones(s, np.float32) for s in grad_shapes] + [np.ones(1, np.float64)]
    sock.send_multipart([b"READY"])
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[0].bytes == b"STOP":
            break
        # touch the weights as a worker would (np.frombuffer views, no copy)
        _ = [np.frombuffer(f.buffer, np.uint8) for f in frames[1:]]
        for _ in range(n_replies):
            sock.send_multipart([b"GRADS", *grads], copy=False)
    sock.close(0)
    ctx.term()


def raw_transfer(shapes, n_workers, n_micro, repeats):
    """Median seconds to send every peer the weights and get its block gradients back."""
    tmp = tempfile.mkdtemp(prefix="shardgrad-raw-")
    address = f"ipc://{tmp}/raw"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    ids = [f"peer-{i}".encode() for i in range(n_workers)]
    blocks = assign_blocks(n_micro, [i.decode() for i in ids], 2)
    mpc = mp.get_context("spawn")
    procs = []
    try:
        for ident in ids:
            p = mpc.Process(
                target=_raw_peer,
                daemon=True,
                args=(address, ident, shapes, len(blocks[ident.decode()])),
            )
            p.start()
            procs.append(p)
        for _ in ids:
            if not router.poll(60_000):
                raise TimeoutError("raw peers did not connect")
            router.recv_multipart()
        weights = [np.ones(s, np.float32) for s in shapes]
        expect = sum(len(b) for b in blocks.values())
        times = []
        for i in range(repeats + 5):
            t0 = time.perf_counter()
            for ident in ids:
                router.send_multipart([ident, b"TASK", *weights], copy=False)
            for _ in range(expect):
                router.recv_multipart(copy=False)
            if i >= 5:
                times.append(time.perf_counter() - t0)
        for ident in ids:
            router.send_multipart([ident, b"STOP"])
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        router.close(0)
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
    return median(times)


# ---- (b) torch DDP with gloo ------------------------------------------------------------------
def _ddp_rank(rank, world, init_file, hidden, batch, steps, warmup, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    spec = parse_spec(make_spec(hidden, batch, steps + warmup))
    rt = JobRuntime(spec)
    X, y = torch.from_numpy(np.array(rt.X)), torch.from_numpy(np.array(rt.y))
    torch.manual_seed(0)
    layers, fan_in = [], 784
    for h in hidden:
        layers += [torch.nn.Linear(fan_in, h), torch.nn.ReLU()]
        fan_in = h
    layers.append(torch.nn.Linear(fan_in, 10))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per_rank = batch // world
    times = []
    for step in range(steps + warmup):
        idx = np.concatenate([rt.sample_indices(step, k) for k in range(rt.n_micro)])
        mine = torch.from_numpy(idx[rank * per_rank : (rank + 1) * per_rank])
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[mine]), y[mine])
        loss.backward()  # DDP all-reduces (averages) the gradients here
        opt.step()
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(median(times))
    dist.destroy_process_group()


def run_ddp(hidden, batch, world, steps, warmup):
    tmp = tempfile.mkdtemp(prefix="shardgrad-ddp-")
    mpc = mp.get_context("spawn")
    out = mpc.Queue()
    procs = [
        mpc.Process(
            target=_ddp_rank,
            daemon=True,
            args=(r, world, os.path.join(tmp, "init"), hidden, batch, steps, warmup, out),
        )
        for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        step_s = out.get(timeout=1800)
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return step_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="measured rounds per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--raw-repeats", type=int, default=50)
    ap.add_argument("--no-ddp", action="store_true", help="skip the torch DDP comparison")
    ap.add_argument(
        "--micro-batches",
        type=int,
        default=8,
        help="micro-batches per global batch (the determinism unit; fewer = bigger GEMMs)",
    )
    a = ap.parse_args()
    have_torch = not a.no_ddp
    if have_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            have_torch = False
            print("torch is not installed (oracle extra): no DDP comparison", file=sys.stderr)

    results = []
    cluster = LocalCluster(workers=1).start()
    try:
        for n in (1, 2):
            while len(cluster.workers) < n:
                cluster.add_worker()
            cluster.wait_workers(n)
            for label, hidden, batch, target in CONFIGS:
                spec = make_spec(hidden, batch, a.rounds + a.warmup, a.micro_batches)
                sg = run_shardgrad(cluster, spec, a.warmup)
                shapes = [p.data.shape for p in nn.build(spec["model"], [784], 0).parameters()]
                raw = raw_transfer(shapes, n, a.micro_batches, a.raw_repeats)
                ddp = run_ddp(hidden, batch, n, a.rounds, a.warmup) if have_torch else None
                results.append((label, n, batch, target, shapes, sg, raw, ddp))
                print(
                    f"done: {label}, {n} worker(s): round {sg['round_s']:.4f} s, raw {raw:.5f} s,"
                    f" ddp step {ddp} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        cluster.stop()
        shutil.rmtree(cluster.tmp, ignore_errors=True)

    print(
        f"\nMachine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, pyzmq {zmq.__version__}"
        + (f", torch {__import__('torch').__version__}" if have_torch else "")
        + f"; micro_batch = B/{a.micro_batches}"
        + f"; {a.rounds} measured rounds after {a.warmup} warm-up; medians.\n"
    )
    print("### (a) Per-round overhead vs raw ZeroMQ transfer of the same bytes (target <= 1.5x)\n")
    print(
        "| model | workers | MB out + back / round | round | slowest compute | overhead "
        "| of which reduce + step | raw ZeroMQ | overhead / raw |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, n, _b, _t, shapes, sg, raw, _d in results:
        p_bytes = sum(int(np.prod(s)) * 4 for s in shapes)
        blocks = assign_blocks(a.micro_batches, [str(i) for i in range(n)], 2)
        moved = n * p_bytes + sum(len(b) for b in blocks.values()) * (p_bytes + 8)
        print(
            f"| {label} | {n} | {moved / 1e6:.1f} | {sg['round_s'] * 1e3:.1f} ms "
            f"| {sg['compute_s'] * 1e3:.1f} ms | {sg['overhead_s'] * 1e3:.1f} ms "
            f"| {(sg['reduce_s'] + sg['step_s']) * 1e3:.1f} ms | {raw * 1e3:.2f} ms "
            f"| {sg['overhead_s'] / raw:.2f}x |"
        )
    print("\n### (b) Samples/s vs torch DDP (gloo)\n")
    print("| model | workers / world | shardgrad samples/s | DDP samples/s | ratio | target |")
    print("|---|---|---|---|---|---|")
    for label, n, batch, target, _s, sg, _r, ddp in results:
        ours = batch / sg["round_s"]
        theirs = batch / ddp if ddp else None
        ratio = f"{ours / theirs:.2f}x" if theirs else "n/a"
        theirs_s = f"{theirs:,.0f}" if theirs else "n/a"
        print(f"| {label} | {n} | {ours:,.0f} | {theirs_s} | {ratio} | >= {target}x |")


if __name__ == "__main__":
    main()
