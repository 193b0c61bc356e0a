"""A real Prometheus scrapes a running job: the distribution's `prometheus` server, started
here on 127.0.0.1 with a scrape config pointing at the coordinator, and PromQL through its
HTTP API returns the rounds counter and the round-time histogram.

`make test-browser` installs it (apt-get install prometheus)."""

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.browser


def prometheus_path() -> str:
    found = shutil.which("prometheus")
    if not found:
        pytest.skip(
            "!!! NO PROMETHEUS: the `prometheus` server is not installed (make test-browser "
            "installs it with apt-get install prometheus); the scrape test did NOT run"
        )
    return found


def free_port() -> int:
    # An external binary needs a number up front: bind port 0, read it, close it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promql(base: str, query: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """start(target "HOST:PORT") -> base URL of a Prometheus scraping it every second."""
    exe = prometheus_path()
    procs = []

    def start(target: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: shardgrad\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_prometheus_scrapes_rounds_and_round_times(prometheus, dash_cluster, dash, tmp_path):
    cluster = dash_cluster(workers=2)
    target = urllib.parse.urlsplit(cluster.http_url).netloc
    base = prometheus(target)
    with cluster.client() as c:
        job = c.submit({**dash.LONG_SPEC, "name": "prom-digits"})

        def query(q):
            try:
                return promql(base, q)
            except OSError:  # still starting
                return None

        def log():
            return (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:]

        up = dash.wait_for(
            lambda: query('up{job="shardgrad"} == 1'),
            "Prometheus to scrape the coordinator",
            timeout=90,
            interval=0.2,
        )
        assert up, log()
        rounds = dash.wait_for(
            lambda: query("shardgrad_rounds_total > 0"), "a scraped rounds counter", 60, 0.2
        )
        assert float(rounds[0]["value"][1]) > 0
        buckets = dash.wait_for(
            lambda: query("shardgrad_round_seconds_bucket"), "round-time buckets", 60, 0.2
        )
        assert {b["metric"]["le"] for b in buckets} >= {"0.01", "1.0", "+Inf"}
        count = query("shardgrad_round_seconds_count")
        assert float(count[0]["value"][1]) > 0
        # A quantile over the histogram needs two scrapes in the window: wait for a number.
        median = dash.wait_for(
            lambda: [
                r
                for r in query("histogram_quantile(0.5, rate(shardgrad_round_seconds_bucket[10s]))")
                or []
                if r["value"][1] not in ("NaN", "+Inf")
            ],
            "a median round time from the histogram",
            60,
            0.2,
        )
        assert 0 < float(median[0]["value"][1]) < 60
        assert query(f'shardgrad_job_round{{job_id="{job}"}}')
        c.cancel(job)
