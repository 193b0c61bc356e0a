"""What verified gradients cost: samples/s with verify = 0, 0.05 and 1.0 on 2 workers.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/verify_cost.py [--rounds 40]

A checked block is computed by a second worker too, so the expected cost is about
`verify` more worker compute; on a 2-core machine that is what it costs in time as well.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from round import CONFIGS, make_spec  # noqa: E402

from shardgrad.cluster import LocalCluster  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    cluster = LocalCluster(workers=2).start()
    out = []
    try:
        for label, hidden, batch in CONFIGS:
            for verify in (0.0, 0.05, 1.0):
                spec = make_spec(hidden, batch, a.rounds + a.warmup, a.k)
                spec["verify"] = verify
                with cluster.client(timeout=60) as c:
                    job = c.submit(spec)
                    c.wait(job, timeout=1800, poll=0.05)
                    rows = c.metrics(job)[a.warmup :]
                    verified = c.status()["counters"].get("verified_blocks", 0)
                out.append((label, batch, verify, statistics.median(r["round_s"] for r in rows)))
                print(f"done {label} verify={verify} ({verified} verified so far)", file=sys.stderr)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.tmp, ignore_errors=True)
    print(f"\n2 workers, k = {a.k}, medians of {a.rounds} rounds\n")
    print("| model | verify | samples/s | vs verify = 0 |")
    print("|---|---|---|---|")
    base = {}
    for label, batch, verify, round_s in out:
        sps = batch / round_s
        base.setdefault(label, sps)
        print(f"| {label} B={batch} | {verify} | {sps:,.0f} | {sps / base[label]:.2f}x |")


if __name__ == "__main__":
    main()
