"""`shardgrad demo`: the whole product in one command.

Starts a local cluster (a coordinator and N workers as real processes), trains an MLP on the
bundled digits, shows progress, then checks the result three ways: held-out accuracy >= 97%,
the accuracy recomputed here from the fetched weights equals the coordinator's, and the
weights are bitwise equal to `shardgrad train --local` (the determinism contract).
"""

import logging
import os
import sys
import time

import numpy as np

from .cluster import LocalCluster
from .core import nn
from .core.tensor import Tensor, no_grad
from .engine import row_seconds
from .jobspec import JobSpec, parse_spec
from .progress import watch
from .training import JobRuntime, train_local, weights_digest

TARGET_ACCURACY = 0.97

# The same job as examples/jobs/demo.toml (a test keeps them equal). Embedded because an
# installed package cannot count on the repository's examples/ folder being there.
DEMO_SPEC = """
name = "digits-demo"
model = [
    { type = "linear", out = 128 },
    { type = "relu" },
    { type = "linear", out = 10 },
]
input_shape = [64]
loss = "cross_entropy"
global_batch = 32
micro_batch = 8
epochs = 20
seed = 3
min_workers = 1
checkpoint_every = 100

[optimizer]
type = "sgd"
lr = 0.1
momentum = 0.9
weight_decay = 0.0005

[data]
source = "builtin:digits"

[eval]
holdout = 0.2
metric = "accuracy"
"""


def demo_spec() -> JobSpec:
    return parse_spec(DEMO_SPEC)


def heldout_accuracy(spec: JobSpec, weights: dict[str, np.ndarray]) -> float:
    """Accuracy of `weights` on the spec's held-out split, computed independently of the
    coordinator's evaluation: a fresh nn.build model, the split from JobRuntime."""
    rt = JobRuntime(spec)  # only for the data and the seeded held-out indices
    model = nn.build(list(spec.model), list(spec.input_shape), spec.seed)
    model.load_state_dict(weights)
    model.eval()
    with no_grad():
        logits = model(Tensor(rt.X[rt.holdout_idx])).data
    return float(np.mean(logits.argmax(axis=1) == rt.y[rt.holdout_idx]))


def plot_loss(metrics: list[dict], path: str, title: str) -> None:
    """Training loss per round, and held-out accuracy at each epoch end on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: we only write a file
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache INFO is noise
    import matplotlib.pyplot as plt

    steps = [(m["round"], m["loss"]) for m in metrics if m.get("loss") is not None]
    evals = [(m["round"], m["accuracy"]) for m in metrics if m.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rounds, losses = (np.array(v) for v in zip(*steps, strict=True))
    ax.plot(rounds, losses, lw=0.5, color="tab:blue", alpha=0.35, label="training loss")
    # One step's loss is one small batch: the running mean is the curve worth reading.
    window = min(len(losses), 25)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(rounds[window - 1 :], smooth, lw=1.5, color="tab:blue", label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss (log scale)")
    if evals:
        acc_ax = ax.twinx()
        acc_ax.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label="held-out accuracy")
        acc_ax.set_ylabel("held-out accuracy")
        acc_ax.axhline(TARGET_ACCURACY, ls="--", lw=0.8, color="gray", label="target")
        acc_ax.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_on_cluster(
    spec: JobSpec, workers: int, http: str | None = None, wait: bool = False
) -> tuple[dict, dict, list[dict]]:
    """Run the job on a fresh local cluster; (final job status, weights, metrics).
    The cluster is stopped whatever happens, Ctrl-C included."""
    cluster = LocalCluster(workers=workers, http=http)
    try:
        print(f"starting a local cluster: 1 coordinator + {workers} worker processes", flush=True)
        cluster.start()  # not `with`: a failed start must still stop what was spawned
        if cluster.http_url:
            print(f"dashboard: {cluster.http_url}", flush=True)
        with cluster.client() as client:
            job_id = client.submit(spec)
            print(f"submitted {job_id} ({spec.name}): MLP on builtin:digits", flush=True)
            job = watch(client, job_id)
            if wait:
                _hold_dashboard(cluster.http_url)
            if job["state"] != "done":
                return job, {}, []
            return job, client.fetch(job_id), client.metrics(job_id)
    finally:
        cluster.stop()
        print("cluster stopped", flush=True)


def _hold_dashboard(url: str | None) -> None:
    """From a terminal, keep the cluster (and its dashboard) up until Enter; never wait when
    standard input is not a terminal (scripts, CI)."""
    if url and sys.stdin is not None and sys.stdin.isatty():
        try:
            input(f"job finished; the dashboard stays up at {url}: press Enter to go on ")
        except EOFError:
            pass


def _throughput(metrics: list[dict], global_batch: int) -> float:
    """Samples per second over the whole job (total samples / what its rounds cost)."""
    seconds = sum(row_seconds(m) or 0.0 for m in metrics)
    return len(metrics) * global_batch / seconds if seconds else float("nan")


def _missing_extras() -> list[str]:
    """Checked before starting anything: better than a traceback after a full training run."""
    import importlib.util

    return [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]


def run_demo(
    workers: int = 2, output_dir: str = "demo-output", http: str | None = None, wait: bool = True
) -> int:
    """Returns the exit code: 0 if every check passed, 1 otherwise."""
    if workers < 1:
        print("shardgrad demo: --workers must be at least 1")
        return 1
    missing = _missing_extras()
    if missing:
        print(f"shardgrad demo: needs {', '.join(missing)}: pip install 'shardgrad[demo]'")
        return 1
    spec = demo_spec()
    os.makedirs(output_dir, exist_ok=True)
    t0 = time.perf_counter()
    try:
        job, weights, metrics = run_on_cluster(spec, workers, http, wait)
    except (RuntimeError, TimeoutError) as e:  # ClientError too: a cluster that did not work
        print(f"shardgrad demo: {e}")
        return 1
    elapsed = time.perf_counter() - t0
    if job["state"] != "done":
        print(f"FAILED: job {job['id']} ended {job['state']}: {job.get('error') or ''}")
        return 1

    reported = job["eval"]["accuracy"]
    recomputed = heldout_accuracy(spec, weights)
    digest = weights_digest(weights)
    local_digest = weights_digest(train_local(spec)[0])  # the one-process reference
    loss_png = os.path.join(output_dir, "loss.png")
    plot_loss(metrics, loss_png, f"{spec.name}: {workers} workers, {len(metrics)} rounds")

    checks = {
        f"held-out accuracy >= {TARGET_ACCURACY:.0%}": reported >= TARGET_ACCURACY,
        "accuracy recomputed from fetched weights == coordinator's": recomputed == reported,
        "weights digest == `train --local`'s (bitwise)": digest == local_digest,
        "weights digest == coordinator's": digest == job.get("digest"),
    }
    print(
        f"\njob {job['id']} done: {len(metrics)} rounds, {elapsed:.1f} s from cluster start to stop"
    )
    print(f"  held-out accuracy  {reported:.2%} (coordinator), {recomputed:.2%} (recomputed here)")
    rate = _throughput(metrics, spec.global_batch)
    print(f"  throughput         {rate:,.0f} samples/s (over what its rounds cost, step to step)")
    if job.get("placement") == "coordinator":
        print(
            "  placement          the coordinator: a round computes faster in one process than "
            "a round trip to a worker takes (placement = 'workers' in a spec forces workers)"
        )
    print(f"  weights digest     {digest}")
    print(f"  train --local      {local_digest}")
    print(f"  loss curve         {loss_png}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1
