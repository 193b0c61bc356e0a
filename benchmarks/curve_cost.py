"""The throughput cost of CURVE (issue 6): the round benchmark's jobs (benchmarks/round.py:
same specs, same metrics) on a local cluster with and without `--keys`. Prints markdown.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/curve_cost.py [--rounds 20] [--workers 2]

samples/s = global_batch / median round_s; overhead = median(round_s - compute_s), both
from the coordinator's per-round metrics after a warm-up. Every byte of weights and
gradients is encrypted and authenticated with CURVE (Curve25519 + XSalsa20-Poly1305), so
the cost grows with the model size and shows up in the overhead, not in compute.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from round import CONFIGS, make_spec, run_shardgrad  # noqa: E402

from shardgrad.cluster import LocalCluster  # noqa: E402
from shardgrad.security import generate_keys  # noqa: E402


def measure(keys, workers, rounds, warmup):
    out = {}
    with LocalCluster(workers=workers, keys=keys) as cluster:
        for label, hidden, batch, _ in CONFIGS:
            out[label] = run_shardgrad(cluster, make_spec(hidden, batch, rounds + warmup), warmup)
            out[label]["batch"] = batch
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="measured rounds per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="shardgrad-curve-")
    try:
        keys = os.path.join(tmp, "keys")
        list(generate_keys(keys))
        open_run = measure(None, a.workers, a.rounds, a.warmup)
        curve_run = measure(keys, a.workers, a.rounds, a.warmup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"### CURVE cost ({a.workers} workers, median of {a.rounds} rounds, local ipc)\n")
    print("| job | transport | samples/s | round (ms) | overhead (ms) | throughput cost |")
    print("|---|---|---:|---:|---:|---:|")
    for label in open_run:
        base = open_run[label]
        for name, r in (("open", base), ("CURVE", curve_run[label])):
            sps = r["batch"] / r["round_s"]
            cost = 1 - sps / (base["batch"] / base["round_s"])
            print(
                f"| {label} | {name} | {sps:,.0f} | {r['round_s'] * 1e3:.1f} | "
                f"{r['overhead_s'] * 1e3:.1f} | {cost:+.1%} |"
            )


if __name__ == "__main__":
    main()
