"""The round-time cost of the coordinator's HTTP side (issue 12): the same digits job on a
local cluster with HTTP off, on with nobody looking, with a dashboard-like poller, with a
heavy poller, and with the real dashboard open in headless Chromium. Prints markdown.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/http_cost.py [--epochs 10] [--repeat 2]

Round times come from the coordinator's own per-round metrics (round_s). Scenarios run in
turn, `--repeat` times, and the table gives the median over all measured rounds, so a slow
moment of a shared machine does not land on one scenario only. The pollers and the browser
run on the same 2-core machine: their CPU is part of what is measured, as for a user who
opens the page on the coordinator's host.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from shardgrad.cluster import LocalCluster  # noqa: E402
from shardgrad.demo import demo_spec  # noqa: E402

# The demo's job (its model, batch and optimizer), with checkpoints out of the way.
# On the workers: computed on the coordinator, its rounds would not be what is measured.
SPEC = {
    **demo_spec().to_dict(),
    "name": "http-cost",
    "checkpoint_every": 1000,
    "placement": "workers",
}


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def poller(url, job, stop, interval, full, counts):
    """What one dashboard page does each `interval`: status + the new metrics rows; with
    `full`, also the whole metrics list and a /metrics scrape (a heavy client)."""
    seen = 0
    while not stop.wait(interval):
        try:
            _get(url + "api/status")
            body = _get(url + f"api/jobs/{job}/metrics?since={seen}")
            seen += body.count(b'"round":')
            if full:
                _get(url + f"api/jobs/{job}/metrics")
                _get(url + "metrics")
            counts[0] += 1
        except OSError:
            pass  # the job is not in the snapshot yet


def run(cluster, epochs, scenario):
    url = cluster.http_url
    stop, threads, counts, browser = threading.Event(), [], [0], None
    if scenario == "chromium":
        browser = Browser(url)  # open and polling before the job starts
    with cluster.client() as c:
        job = c.submit({**SPEC, "epochs": epochs})
        if scenario == "poll":
            threads = [threading.Thread(target=poller, args=(url, job, stop, 1.0, False, counts))]
        elif scenario == "hammer":
            threads = [
                threading.Thread(target=poller, args=(url, job, stop, 0.1, True, counts))
                for _ in range(5)
            ]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        c.wait(job, timeout=600, poll=0.1)
        wall = time.monotonic() - t0
        stop.set()
        for t in threads:
            t.join(15)
        if browser:
            counts[0] = browser.close()
        rows = c.metrics(job)
    return [r["round_s"] for r in rows[5:]], wall, counts[0]


class Browser:
    """The real dashboard in headless Chromium, polling once a second as it does."""

    def __init__(self, url):
        from playwright.sync_api import sync_playwright

        self.pw = sync_playwright().start()
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        self.browser = self.pw.chromium.launch(
            executable_path=exe,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"],
        )
        self.page = self.browser.new_page()
        self.requests = 0
        self.page.on("request", self._count)
        self.page.goto(url)

    def _count(self, _request):
        self.requests += 1

    def close(self):
        self.browser.close()
        self.pw.stop()
        return self.requests


def loop_cost(rounds_in_job=2000, repeat=2000):
    """The work HTTP adds to the coordinator's loop, measured in-process on a real
    Coordinator: observe_round per round, a snapshot publish every 0.25 s."""
    import logging
    import tempfile
    import types

    from shardgrad.coordinator.server import Coordinator

    logging.getLogger("shardgrad").setLevel(logging.ERROR)  # its "no --keys" warning
    tmp = tempfile.mkdtemp(prefix="shardgrad-httpcost-")
    coord = Coordinator(f"ipc://{tmp}/w", f"ipc://{tmp}/c", f"{tmp}/state", http="127.0.0.1:0")
    try:
        spec = {"name": "x", "global_batch": 32, "micro_batch": 8}
        job_id = coord.store.add_job("x", spec, None, rounds_in_job)
        row = {
            "round": 1, "epoch": 0, "round_loss": 0.5, "loss": 0.5, "round_s": 0.003,
            "compute_s": 0.001, "reduce_s": 1e-5, "step_s": 1e-4, "overhead_s": 0.002,
            "transfer_s": 0.002, "workers": 2, "samples_per_s": 10000.0,
        }  # fmt: skip
        engine = types.SimpleNamespace(next_round=rounds_in_job, metrics=[row] * rounds_in_job)
        coord.job = types.SimpleNamespace(id=job_id, state="running", gen=0, engine=engine)
        t0 = time.perf_counter()
        for _ in range(repeat):
            coord.http.observe_round(job_id, row)
        observe = (time.perf_counter() - t0) / repeat
        coord.http.publish(coord, force=True)
        assert coord.http.snapshot["metrics"][job_id], "the snapshot did not build"
        t0 = time.perf_counter()
        for _ in range(repeat // 10):
            coord.http.publish(coord, force=True)
        publish = (time.perf_counter() - t0) / (repeat // 10)
        t0 = time.perf_counter()
        for _ in range(repeat):
            coord.http.publish(coord)  # the check every loop pass, when no publish is due
        check = (time.perf_counter() - t0) / repeat
    finally:
        coord.job = None
        coord.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return observe, publish, check


def have_browser():
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return bool(shutil.which("chromium") or shutil.which("chromium-browser"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="35 rounds each")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    scenarios = [
        ("off", "HTTP off", None),
        ("idle", "HTTP on, nobody looking", "127.0.0.1:0"),
        ("poll", "1 dashboard-like poller, 1/s", "127.0.0.1:0"),
        ("hammer", "5 pollers, 10/s each, full metrics + /metrics", "127.0.0.1:0"),
    ]
    if have_browser():
        scenarios.append(("chromium", "dashboard open in headless Chromium", "127.0.0.1:0"))
    else:
        print("(no chromium + playwright: the browser row is left out)")
    results = {key: ([], [], []) for key, _, _ in scenarios}
    clusters = {}
    try:
        for key, _, http in scenarios:
            clusters[key] = LocalCluster(workers=a.workers, http=http).start()
        for _ in range(a.repeat):
            for key, _, _ in scenarios:
                rounds, wall, hits = run(clusters[key], a.epochs, key)
                results[key][0].extend(rounds)
                results[key][1].append(wall)
                results[key][2].append(hits)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    base = statistics.median(results["off"][0])
    n = len(results["off"][0])
    print(
        f"### Round time with and without HTTP ({a.workers} workers, digits MLP 64-128-10, "
        f"{a.repeat} x {n // a.repeat} rounds per scenario)\n"
    )
    print("| scenario | median round (ms) | mean (ms) | p90 (ms) | job wall (s) | vs off |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, label, _ in scenarios:
        rounds, walls, _ = results[key]
        med = statistics.median(rounds)
        p90 = statistics.quantiles(rounds, n=10)[-1]
        print(
            f"| {label} | {med * 1e3:.2f} | {statistics.fmean(rounds) * 1e3:.2f} | "
            f"{p90 * 1e3:.2f} | {statistics.fmean(walls):.2f} | {med / base - 1:+.1%} |"
        )
    observe, publish, check = loop_cost()
    print("\n### Work HTTP adds to the coordinator's loop (in-process, a 2,000-round job)\n")
    print("| what | how often | time |")
    print("|---|---|---:|")
    print(f"| observe_round (counters + 5 histograms) | once per round | {observe * 1e6:.1f} µs |")
    print(f"| publish a snapshot | at most every 0.25 s | {publish * 1e6:.0f} µs |")
    print(f"| is a publish due? | every loop pass | {check * 1e6:.2f} µs |")


if __name__ == "__main__":
    main()
