"""The coordinator's read-only HTTP side: the dashboard page, a JSON API and Prometheus
`/metrics`.

Threading: the coordinator's loop is single-threaded and mutates its dicts freely, so the
HTTP threads never read them. Instead the loop *publishes* an immutable snapshot (plain
dicts, lists and tuples, built at most every PUBLISH_EVERY seconds, and at once when the
active job starts, pauses, rolls back or ends) into `HttpServer.snapshot` with one reference
assignment; handlers serve only from the snapshot they picked up. Per-round histograms are
prometheus_client metrics (thread-safe) observed by the loop in `observe_round`; the
Prometheus side itself is prom.py.

Nothing here can change a job: only GET and HEAD exist, and no route returns weights.
"""

import json
import logging
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from .prom import Metrics

log = logging.getLogger("shardgrad.coordinator")

PUBLISH_EVERY = 0.25  # seconds between snapshots while nothing else forces one
STATIC = {  # the only files served, with their content types (no path ever reaches the disk)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


class HttpError(ValueError):
    """A bad --http address, or one we cannot listen on; the message names the fix."""


def parse_bind(text: str) -> tuple[str, int]:
    """HOST:PORT (port 0: any free port) -> (host, port); HttpError naming the fix."""
    host, sep, port = (text or "").strip().rpartition(":")
    host = host.strip("[]")  # [::1]:8080
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise HttpError(
            f"--http / SHARDGRAD_HTTP: expected HOST:PORT such as 127.0.0.1:8080 (port 0 picks "
            f"a free one), got {text!r}"
        )
    return host, int(port)


def http_server(bind: str | None, state_dir: str | None = None):
    """The HTTP side for `Coordinator(http=...)`: an `HttpServer` serving on `bind`, or a
    stand-in that does nothing when `bind` is None, empty or "off"."""
    if not bind or bind.strip().lower() in ("off", "none", "no"):
        return Off()
    url_file = os.path.join(state_dir, "http.url") if state_dir else None
    return HttpServer(bind, url_file)


class Off:
    """HTTP turned off: the loop's calls cost nothing."""

    url = None

    def publish(self, coord, force=False):
        pass

    def observe_round(self, job_id, row):
        pass

    def close(self):
        pass


class HttpServer:
    def __init__(self, bind: str, url_file: str | None = None):
        host, port = parse_bind(bind)
        self.metrics = Metrics(lambda: self.snapshot)
        self.snapshot: dict | None = None  # replaced whole, never mutated
        self._last_publish = 0.0
        self._job_key = ()  # (active job id, its state) at the last publish
        self._results: dict[str, tuple] = {}  # finished jobs: (summary, metrics), never change
        self._specs: dict[str, dict] = {}
        self._cache_lock = threading.Lock()
        self._cache: dict = {}  # (snapshot id, route) -> body bytes, for many pollers
        try:
            server_cls = _Server6 if ":" in host else _Server
            self.httpd = server_cls((host, port), _Handler)
        except OSError as e:  # in use, or not an address of this machine
            raise HttpError(
                f"--http {bind}: cannot listen there: {e.strerror or e}; pick another "
                "HOST:PORT (port 0 picks a free one) or turn it off with --http off"
            ) from None
        self.httpd.app = self
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        # Listening on every address: the URL to open is this machine's loopback.
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound_host, bound_host)
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound_port}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="shardgrad-http", daemon=True
        )
        self.thread.start()
        log.info("dashboard and /metrics on %s", self.url)
        if url_file:
            _write_atomic(url_file, self.url + "\n")  # how `LocalCluster` learns the port

    # ---- called by the coordinator's loop --------------------------------------------------
    def observe_round(self, job_id: str, row: dict) -> None:
        self.metrics.observe_round(row)

    def publish(self, coord, force: bool = False) -> None:
        """Build a fresh snapshot from the coordinator's state (loop thread only)."""
        now = time.monotonic()
        # A job that starts, ends or pauses is news at once; rounds (milliseconds apart on
        # small models) wait for the next quarter second: a snapshot per round would cost
        # the loop a copy of the metrics list every round.
        job = coord.job
        key = (job.id, job.state, getattr(job, "gen", 0)) if job is not None else None
        if key == self._job_key and not force and now - self._last_publish < PUBLISH_EVERY:
            return
        self._last_publish, self._job_key = now, key
        try:
            self.snapshot = self._build(coord)
        except Exception:  # a bug here must cost the dashboard a refresh, never the loop
            log.exception("could not publish the HTTP snapshot")

    def _build(self, coord) -> dict:
        """Through the same narrow view of the coordinator as the client port (`status`,
        `live_job`, the store, `ClientHandler.summary`), so both say the same."""
        jobs, metrics = [], {}
        for row in _job_rows(coord.store):
            job_id = row["id"]
            if job_id not in self._specs:  # a job's spec never changes: parsed once
                self._specs[job_id] = json.loads(row["spec"])
            row["spec"] = self._specs[job_id]
            summary = row.pop("summary")
            if summary:
                if job_id not in self._results:  # nor does a finished job's result
                    metrics_done = tuple(coord.store.metrics(job_id))
                    self._results[job_id] = (json.loads(summary), metrics_done)
                row["result"], done = self._results[job_id]
            else:
                row["result"], done = None, ()
            jobs.append(coord.client_handler.summary(row))
            live = coord.live_job(job_id)
            if live is not None:
                # A copy: the loop appends to the list (and truncates it on a rollback).
                metrics[job_id] = tuple(live[2])
            elif row["result"]:
                metrics[job_id] = done
        return {"time": time.time(), **coord.status(), "jobs": jobs, "metrics": metrics}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    # ---- called by the HTTP threads ---------------------------------------------------------
    def cached(self, snap: dict, key, build) -> bytes:
        """JSON body for `key` under snapshot `snap`, built once however many browsers ask."""
        with self._cache_lock:
            if self._cache.get("snap") is not snap:
                self._cache = {"snap": snap}
            body = self._cache.get(key)
        if body is None:
            body = _json(build())
            with self._cache_lock:
                if self._cache.get("snap") is snap:
                    self._cache[key] = body
        return body


def _job_rows(store, limit: int = 100) -> list[dict]:
    """The queue's rows without their result JSON: the summary (parsed once per finished
    job, with its metrics)."""
    rows = store.db.execute(
        "SELECT id, name, spec, state, round, total_rounds, checkpoint_round, error, placement,"
        " summary FROM jobs ORDER BY seq DESC LIMIT ?",
        (limit,),
    )
    return [dict(r) for r in rows][::-1]


def _clean(obj):
    """JSON for browsers: NaN and Infinity are not JSON, they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _json(obj) -> bytes:
    return json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False).encode()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- the HTTP server ----------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "shardgrad"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 10  # a slow or idle client loses its thread after this many seconds

    def log_message(self, fmt, *args):  # access logs would drown the coordinator's log
        log.debug("http %s %s", self.address_string(), fmt % args)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        try:
            status, ctype, body = self.route()
        except Exception:  # never let one request take the server down
            log.exception("http: error serving %s", self.path)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def route(self):
        app: HttpServer = self.server.app
        url = urlsplit(self.path)
        path = url.path
        if path in STATIC:
            name, ctype = STATIC[path]
            return 200, ctype, _static(name)
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(app.metrics.registry)
        if not path.startswith("/api/"):
            return _error(404, f"no page {path!r}: try / , /metrics or /api/status")
        snap = app.snapshot
        if snap is None:
            return _error(503, "the coordinator is starting; ask again in a moment")
        try:
            query = parse_qs(url.query, strict_parsing=False, max_num_fields=10)
        except ValueError:
            return _error(400, "bad query string")
        parts = path.rstrip("/").split("/")[2:]  # /api/a/b -> [a, b]
        ok = "application/json"
        if parts == ["status"]:
            job = query.get("job", [None])[0]
            if job is None:
                return 200, ok, app.cached(snap, "status", lambda: _status(snap))
            found = _find(snap, job)
            if found is None:
                return _error(404, f"no job {job!r} (/api/jobs lists the jobs)")
            return 200, ok, _json({**_status(snap, jobs=False), "job": found})
        if parts == ["jobs"]:
            return 200, ok, app.cached(snap, "jobs", lambda: {"jobs": snap["jobs"]})
        if len(parts) in (2, 3) and parts[0] == "jobs":
            found = _find(snap, parts[1])
            if found is None:
                return _error(404, f"no job {parts[1]!r} (/api/jobs lists the jobs)")
            if len(parts) == 2:
                return 200, ok, _json({"job": found})
            if parts[2] != "metrics":
                return _error(404, f"no page {path!r}: try /api/jobs/{parts[1]}/metrics")
            since = query.get("since", ["0"])[0]
            if not since.isdigit() or len(since) > 12:
                return _error(400, f"since must be a round count (0, 1, 2, ...), got {since!r}")
            rows = snap["metrics"].get(found["id"], ())
            key = ("metrics", found["id"], int(since))
            return (
                200,
                ok,
                app.cached(snap, key, lambda: {"job": found["id"], "metrics": rows[int(since) :]}),
            )
        return _error(404, f"no API route {path!r}: try /api/status or /api/jobs")


def _status(snap, jobs=True) -> dict:
    out = {"workers": snap["workers"], "counters": snap["counters"], "time": snap["time"]}
    if jobs:
        out["jobs"] = snap["jobs"]
    return out


def _find(snap, job_id):
    return next((j for j in snap["jobs"] if j["id"] == job_id), None)


def _error(status: int, message: str):
    return status, "application/json", _json({"error": message, "status": status})


_static_cache: dict[str, bytes] = {}


def _static(name: str) -> bytes:
    body = _static_cache.get(name)
    if body is None:
        body = (resources.files("shardgrad") / "dashboard" / name).read_bytes()
        _static_cache[name] = body
    return body


__all__ = ["HttpError", "HttpServer", "Off", "http_server", "parse_bind"]
