"""The coordinator's HTTP side without a browser: the JSON API says what the client port
says, /metrics is valid Prometheus text with the documented names, bad requests get 4xx
and never hurt the server, nothing over HTTP can change a job or fetch weights."""

import http.client
import importlib.resources
import json
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardgrad.coordinator.http import HttpError, Off, http_server, parse_bind

PHASES = ("pace", "round", "compute", "transfer", "reduce", "step")


def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def finished(module_cluster, dash):
    """A cluster with HTTP and one finished job: (cluster, url, job id). Shared by the
    tests that only read."""
    cluster = module_cluster(workers=2)
    with cluster.client() as c:
        job = c.submit(dash.SPEC)
        c.wait(job, timeout=120, poll=0.05)
    url = cluster.http_url
    # The snapshot lags the loop by at most a quarter second: wait for the job's end in it.
    dash.wait_for(
        lambda: dash.http_json(url + "api/jobs")["jobs"][-1]["state"] == "done",
        "the HTTP snapshot to show the finished job",
    )
    return cluster, url, job


def test_json_api_matches_the_client(finished, dash):
    cluster, url, job = finished
    with cluster.client() as c:
        status, jobs, metrics = c.status(), c.jobs(), c.metrics(job)
        tail = c.metrics(job, since=50)
    strip = lambda ws: [{k: v for k, v in w.items() if k != "last_heartbeat_s"} for w in ws]

    def same_status():
        # The snapshot may lag the loop by a quarter second (a counter that just moved).
        with cluster.client() as c:
            now = c.status()
        api = dash.http_json(url + "api/status")
        same = api["jobs"] == now["jobs"] and api["counters"] == now["counters"]
        return same and strip(api["workers"]) == strip(now["workers"])

    dash.wait_for(same_status, "/api/status to equal the client's status", timeout=30)
    assert dash.http_json(url + "api/jobs") == {"jobs": jobs}
    got = dash.http_json(url + f"api/jobs/{job}/metrics")
    assert got == {"job": job, "metrics": metrics}
    assert dash.http_json(url + f"api/jobs/{job}/metrics?since=50")["metrics"] == tail
    assert dash.http_json(url + f"api/jobs/{job}")["job"] == status["jobs"][-1]
    assert dash.http_json(url + f"api/status?job={job}")["job"] == status["jobs"][-1]


def test_metrics_are_prometheus_text_with_the_documented_names(finished, dash):
    cluster, url, job = finished
    with cluster.client() as c:
        rounds = len(c.metrics(job))

    def scrape_matching_status():
        # The snapshot may lag the loop by a quarter second (a counter that just moved).
        with cluster.client() as c:
            counters = c.status()["counters"]
        status, ctype, body = dash.http_get(url + "metrics")
        assert status == 200 and ctype.startswith("text/plain")
        fams = _families(body.decode())
        exported = {
            s.name[len("shardgrad_") : -len("_total")]: s.value
            for fam in fams.values()
            for s in fam.samples
            if s.name.endswith("_total")
        }
        same = all(exported.get(k) == v for k, v in counters.items())
        return same and (fams, counters)

    fams, counters = dash.wait_for(scrape_matching_status, "/metrics to match status", 30)

    samples = [s for fam in fams.values() for s in fam.samples]

    def value(name, **labels):
        return next(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("shardgrad_rounds_total") == rounds
    assert value("shardgrad_samples_total") == rounds * dash.SPEC["global_batch"]
    for phase in PHASES:
        assert fams[f"shardgrad_{phase}_seconds"].type == "histogram"
        assert value(f"shardgrad_{phase}_seconds_count") == rounds
    assert value("shardgrad_workers", state="alive") == 2
    assert value("shardgrad_jobs", state="done") == 1
    assert value("shardgrad_job_round", job_id=job) == rounds
    assert 0 < value("shardgrad_job_heldout_accuracy", job_id=job) <= 1
    assert value("shardgrad_job_loss", job_id=job) > 0
    blocks = [s for s in fams["shardgrad_worker_blocks_done"].samples]
    assert len(blocks) == 2 and sum(s.value for s in blocks) >= rounds
    for name in ("bad_message", "late_grads", "rate_limited", "backup_blocks", "workers_died"):
        assert value(f"shardgrad_{name}_total") == counters.get(name, 0)
    # Prometheus conventions: one prefix, counters end in _total, times in _seconds.
    for fam in fams.values():
        assert fam.name.startswith("shardgrad_"), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name


def test_the_dashboard_page_and_its_files_are_served_from_the_package(finished, dash):
    _, url, _ = finished
    status, ctype, page = dash.http_get(url)
    assert status == 200 and ctype.startswith("text/html")
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        assert f'"/{name}"'.encode() in page
        status, ctype, body = dash.http_get(url + name)
        assert status == 200 and ctype.startswith(kind) and body
        packaged = importlib.resources.files("shardgrad") / "dashboard" / name
        assert body == packaged.read_bytes()
    # No CDN: nothing the page loads comes from another host.
    for body in (page, dash.http_get(url + "dashboard.js")[2]):
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body and b"//cdn" not in body


@pytest.mark.parametrize(
    "path, code",
    [
        ("nope", 404),
        ("api/nope", 404),
        ("api/jobs/job-999999", 404),
        ("api/jobs/job-999999/metrics", 404),
        ("api/jobs/JOB/weights", 404),
        ("api/jobs/JOB/metrics?since=-1", 400),
        ("api/jobs/JOB/metrics?since=abc", 400),
        ("api/jobs/JOB/metrics?since=99999999999999999999", 400),
        ("../../etc/passwd", 404),
        ("%2e%2e/pyproject.toml", 404),
        ("api/status?job=%00", 404),
    ],
)
def test_bad_requests_get_an_error_and_the_server_goes_on(finished, dash, path, code):
    _, url, job = finished
    status, ctype, body = dash.http_get(url + path.replace("JOB", job))
    assert status == code, body
    assert ctype == "application/json" and b"error" in body
    assert dash.http_get(url + "api/status")[0] == 200


def test_http_is_read_only(finished, dash):
    _, url, job = finished
    parts = urllib.parse.urlsplit(url)
    for method, path in (
        ("POST", "/api/jobs"),
        ("PUT", f"/api/jobs/{job}"),
        ("DELETE", f"/api/jobs/{job}"),
        ("PATCH", "/api/status"),
        ("POST", f"/api/jobs/{job}/cancel"),
    ):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request(method, path, body=b"{}")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status in (405, 501), (method, path, resp.status)
    assert dash.http_json(url + f"api/jobs/{job}")["job"]["state"] == "done"
    status, _, _ = dash.http_get(url + "api/status", timeout=10)
    assert status == 200
    # A HEAD gets the headers only.
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("HEAD", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.close()


def test_a_garbage_request_line_does_not_stop_the_server(finished, dash):
    import socket

    _, url, _ = finished
    parts = urllib.parse.urlsplit(url)
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b""):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    assert dash.http_get(url + "api/status")[0] == 200


def test_a_metrics_page_follows_a_running_job(dash_cluster, dash):
    cluster = dash_cluster(workers=2)
    url = cluster.http_url
    with cluster.client() as c:
        job = c.submit(dash.LONG_SPEC)

        def rounds_seen():
            status, _, body = dash.http_get(url + f"api/jobs/{job}/metrics")
            # 404 until the next snapshot (a quarter second at most) knows the new job
            return status == 200 and len(json.loads(body)["metrics"]) >= 5

        dash.wait_for(rounds_seen, "five rounds in the HTTP metrics")
        first = len(dash.http_json(url + f"api/jobs/{job}/metrics")["metrics"])
        dash.wait_for(
            lambda: len(dash.http_json(url + f"api/jobs/{job}/metrics?since={first}")["metrics"]),
            "rounds after the first look",
        )
        running = dash.http_json(url + "api/jobs")["jobs"][-1]
        assert running["id"] == job and running["state"] == "running" and "last" in running
        c.cancel(job)
    dash.wait_for(
        lambda: dash.http_json(url + f"api/jobs/{job}")["job"]["state"] == "cancelled",
        "the cancelled job in the HTTP snapshot",
    )


def test_parse_bind_and_off():
    assert parse_bind("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_bind("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":80", "h:99999", "h:x", ""):
        with pytest.raises(HttpError, match="HOST:PORT"):
            parse_bind(bad)
    for off in (None, "", "off", "OFF"):
        assert isinstance(http_server(off), Off)


def test_a_port_in_use_names_the_fix(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(HttpError, match="pick another"):
            http_server(f"127.0.0.1:{port}", str(tmp_path))


def test_coordinator_command_reports_a_bad_http_address(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardgrad.cli",
            "coordinator",
            "--http",
            "nonsense",
            "--worker-bind",
            f"ipc://{tmp_path}/w",
            "--client-bind",
            f"ipc://{tmp_path}/c",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_all_addresses_show_a_loopback_url_and_off_means_off(tmp_path):
    from shardgrad.cluster import LocalCluster

    server = http_server("0.0.0.0:0", str(tmp_path))
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert (tmp_path / "http.url").read_text().strip() == server.url
    finally:
        server.close()
    for off in (None, "", "off"):
        cluster = LocalCluster(workers=0, http=off)
        try:
            assert cluster.http is None and cluster.http_url is None
        finally:
            cluster.stop()
