"""The `shardgrad` command.

    shardgrad coordinator | worker | aggregator | cluster up --workers N
    shardgrad submit SPEC | status [JOB] | watch JOB | cancel JOB | fetch JOB -o model.npz
    (or -o model.safetensors: the format PyTorch and Hugging Face load)
    shardgrad train SPEC --local | demo | keys generate DIR

Addresses come from flags or the environment (ready for docker-compose):
SHARDGRAD_COORDINATOR (client port), SHARDGRAD_COORDINATOR_WORKERS (worker port),
SHARDGRAD_WORKER_BIND, SHARDGRAD_CLIENT_BIND, SHARDGRAD_STATE_DIR, SHARDGRAD_DATA_ROOT,
SHARDGRAD_KEYS (key directory; turns CURVE on), SHARDGRAD_HTTP (dashboard and /metrics).
"""

import os

# One BLAS thread per process unless the user says otherwise: workers are the parallelism.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

ENV = os.environ.get


def _env_float(name, default):
    return float(ENV(name, default))


def cmd_coordinator(a):
    from .coordinator.placement import DEFAULT_INLINE_BELOW_S
    from .coordinator.server import Config, main

    if a.inline_below is None:
        a.inline_below = _env_float("SHARDGRAD_INLINE_BELOW", DEFAULT_INLINE_BELOW_S)
    cfg = Config(
        heartbeat_interval=a.heartbeat_interval,
        liveness=a.liveness,
        min_deadline=a.min_deadline,
        inline_below_s=a.inline_below,
        lease_window=a.lease_window,
        peer_leases=a.peer_leases == "on",
        follow=a.follow,
        width_probe=a.width_probe,
        write_retry_s=a.write_retry,
        nice=a.nice,
    )
    from .coordinator.http import HttpError

    try:
        main(
            a.worker_bind,
            a.client_bind,
            a.state_dir,
            a.data_root,
            cfg,
            _server_auth(a),
            http=a.http,
        )
    except HttpError as e:
        sys.exit(f"shardgrad coordinator: {e}")


def cmd_worker(a):
    from .worker.worker import main

    main(
        a.coordinator_workers,
        a.data_root,
        a.id,
        a.heartbeat_interval,
        _peer_auth(a, "worker"),
        liveness=a.liveness,
    )


def cmd_aggregator(a):
    from .coordinator.aggregator import main

    security = server = None
    if a.keys:
        from .security import ServerAuth

        security = _peer_auth(a, "worker")  # upstream it is a worker ...
        server = ServerAuth(a.keys, pair=security).worker_domain  # ... and serves workers
    main(a.coordinator_workers, a.bind, a.id, a.data_root, a.heartbeat_interval, a.liveness,
         security, server, a.min_deadline)  # fmt: skip


def _sigterm_as_interrupt():
    """Commands that own child processes must stop them on SIGTERM too (a supervisor, docker,
    `kill`): SIGTERM's default action would exit without cleanup and orphan the children."""
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_cluster(a):
    from .cluster import LocalCluster

    _sigterm_as_interrupt()

    with LocalCluster(
        a.workers, a.worker_bind, a.client_bind, a.state_dir, a.data_root, keys=a.keys, http=a.http
    ) as cluster:
        print(
            f"cluster up: coordinator at {cluster.client_address} with {a.workers} workers; "
            "Ctrl-C stops all",
            flush=True,
        )
        if cluster.http_url:
            print(f"dashboard: {cluster.http_url}  (Prometheus: {cluster.http_url}metrics)")
        cluster.wait()


def _client(a):
    from .client import Client

    return Client(a.coordinator, timeout=a.timeout, security=_peer_auth(a, "client"))


def cmd_submit(a):
    from .jobspec import SpecError, parse_spec

    try:
        spec = parse_spec(a.spec)
    except (SpecError, OSError) as e:
        sys.exit(f"shardgrad submit: {a.spec}: invalid job spec:\n{e}")
    with _client(a) as c:
        job = c.submit(spec)
    print(job)
    if a.wait:
        a.job = job
        cmd_watch(a)


def cmd_status(a):
    with _client(a) as c:
        st = c.status(a.job)
    if a.json:
        print(json.dumps(st, indent=2))
        return
    from .progress import print_status

    print_status(st)


def cmd_watch(a):
    from .progress import watch

    with _client(a) as c:
        job = watch(c, a.job)
    if job["state"] != "done":
        sys.exit(f"job {a.job} {job['state']}: {job.get('error') or ''}")


def cmd_cancel(a):
    with _client(a) as c:
        print(c.cancel(a.job)["state"])


def cmd_fetch(a):
    import numpy as np

    with _client(a) as c:
        state = c.fetch(a.job)
    if a.output.endswith(".safetensors"):  # names are torch.nn.Sequential's already
        from .export import to_safetensors

        to_safetensors(None, state, a.output)
        print(f"wrote {len(state)} tensors to {a.output}")
        return
    # np.savez appends ".npz" to a name without it: report the file that really exists.
    path = a.output if a.output.endswith(".npz") else a.output + ".npz"
    np.savez(path, **state)
    print(f"wrote {len(state)} arrays to {path}")


def cmd_train(a):
    import numpy as np

    from .jobspec import SpecError, parse_spec
    from .training import train_local, weights_digest

    if not a.local:
        sys.exit("shardgrad train: only --local is supported (use submit for a cluster)")
    try:
        spec = parse_spec(a.spec)
    except (SpecError, OSError) as e:
        sys.exit(f"shardgrad train: {a.spec}: invalid job spec:\n{e}")
    try:
        state, metrics = train_local(spec, a.data_root)
    except ValueError as e:  # data, init weights: the reason names the fix
        sys.exit(f"shardgrad train: {a.spec}: {e}")
    if a.output and a.output.endswith(".safetensors"):
        from .export import to_safetensors

        to_safetensors(spec, state, a.output)
    elif a.output:
        np.savez(a.output, **state)
    last = metrics[-1]
    print(
        json.dumps(
            {
                "rounds": len(metrics),
                "loss": last.get("loss"),
                "eval": {k: last[k] for k in ("accuracy", "mse") if k in last},
                "digest": weights_digest(state),
            }
        )
    )


def cmd_demo(a):
    from .demo import run_demo

    _sigterm_as_interrupt()

    sys.exit(run_demo(a.workers, a.output_dir, http=a.http, wait=not a.no_wait))


def cmd_keys(a):
    from .security import generate_keys

    for line in generate_keys(a.dir, a.workers, a.clients):
        print(line)


def _server_auth(a):
    if not a.keys:
        return None
    from .security import ServerAuth

    return ServerAuth(a.keys)


def _peer_auth(a, role):
    keys = getattr(a, "keys", None)
    if not keys:
        return None
    from .security import peer_security

    return peer_security(keys, role, getattr(a, "key_name", None), getattr(a, "server_key", None))


HTTP_HELP = (
    "HOST:PORT for the dashboard and /metrics (default 127.0.0.1:0, a free port; 'off' for "
    "none) [SHARDGRAD_HTTP]"
)


def parser():
    from .jobspec import MICRO_BATCH_RULE

    p = argparse.ArgumentParser(prog="shardgrad", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def client_args(s):
        s.add_argument(
            "--coordinator",
            default=ENV("SHARDGRAD_COORDINATOR", "tcp://127.0.0.1:5556"),
            help="coordinator client address [SHARDGRAD_COORDINATOR]",
        )
        s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
        s.add_argument("--keys", default=ENV("SHARDGRAD_KEYS"), help="key directory (CURVE)")
        s.add_argument(
            "--key-name",
            default=ENV("SHARDGRAD_KEY_NAME"),
            help="which client key pair in --keys to use (default: the only one)",
        )

    def server_args(s):
        s.add_argument(
            "--worker-bind", default=ENV("SHARDGRAD_WORKER_BIND", "tcp://127.0.0.1:5555")
        )
        s.add_argument(
            "--client-bind", default=ENV("SHARDGRAD_CLIENT_BIND", "tcp://127.0.0.1:5556")
        )
        s.add_argument("--state-dir", default=ENV("SHARDGRAD_STATE_DIR", "shardgrad-state"))
        s.add_argument("--data-root", default=ENV("SHARDGRAD_DATA_ROOT"))
        s.add_argument("--keys", default=ENV("SHARDGRAD_KEYS"), help="key directory: turn CURVE on")

    hb = _env_float("SHARDGRAD_HEARTBEAT_INTERVAL", 0.5)
    s = sub.add_parser("coordinator", help="run the coordinator")
    server_args(s)
    s.add_argument("--heartbeat-interval", type=float, default=hb)
    s.add_argument("--liveness", type=int, default=int(ENV("SHARDGRAD_LIVENESS", 5)))
    s.add_argument(
        "--min-deadline",
        type=float,
        default=_env_float("SHARDGRAD_MIN_DEADLINE", 5.0),
        help="seconds before a round's stragglers get backup tasks (at least; it adapts)",
    )
    s.add_argument(
        "--inline-below",
        type=float,
        help="seconds: a job whose whole round computes faster than this runs on the "
        "coordinator itself (one process beats a round trip); 0: every job on workers "
        "[SHARDGRAD_INLINE_BELOW, default 0.002]",
    )
    s.add_argument(
        "--lease-window",
        type=int,
        default=int(ENV("SHARDGRAD_LEASE_WINDOW", 8)),
        help="rounds workers on a lease may compute ahead of the coordinator's step, "
        "stepping their own copy of the training state (same bits); 0: every round waits for the "
        "coordinator; at most 64, and fewer for a model whose sums pass 8 MiB "
        "[SHARDGRAD_LEASE_WINDOW, default 8]",
    )
    s.add_argument(
        "--peer-leases",
        choices=("on", "off"),
        default=ENV("SHARDGRAD_PEER_LEASES", "on"),
        help="on: workers on the coordinator's host run ahead on one lease together, "
        "sending each other their sums (the coordinator steps off the round's path; same "
        "bits); off: only a lone worker runs ahead [SHARDGRAD_PEER_LEASES, default on]",
    )
    s.add_argument(
        "--follow",
        type=int,
        choices=range(33),
        metavar="0..32",
        default=int(ENV("SHARDGRAD_FOLLOW", 8)),
        help="a lease of several workers on the coordinator's host sends the coordinator "
        "its training state every this many rounds instead of its sums every round: the "
        "coordinator takes it in place of stepping a copy of every round itself, off the "
        "workers' cores (same bits; only for jobs with verify = 0); 0: it steps every round "
        "[SHARDGRAD_FOLLOW, default 8]",
    )
    s.add_argument(
        "--width-probe",
        type=int,
        default=int(ENV("SHARDGRAD_WIDTH_PROBE", 32)),
        help="rounds to time a job on all live workers and on one ahead on a lease; the "
        "faster wins (the same bits), the others stand by; 0: always all "
        "[SHARDGRAD_WIDTH_PROBE, default 32]",
    )
    s.add_argument(
        "--write-retry",
        type=float,
        default=_env_float("SHARDGRAD_WRITE_RETRY", 300.0),
        help="seconds to keep retrying a finished job's result when the state directory "
        "refuses it (full disk); the job then fails with the reason "
        "[SHARDGRAD_WRITE_RETRY, default 300]",
    )
    s.add_argument(
        "--nice",
        type=int,
        choices=range(20),
        metavar="0..19",
        default=int(ENV("SHARDGRAD_NICE", 10)),
        help="the coordinator's scheduling niceness: workers on its host get the CPU first "
        "(ahead on a lease they never wait for its step); 0: the same priority as they "
        "[SHARDGRAD_NICE, default 10]",
    )
    s.add_argument(
        "--http",
        default=ENV("SHARDGRAD_HTTP"),
        help="HOST:PORT for the dashboard, JSON API and /metrics (read-only; off by default) "
        "[SHARDGRAD_HTTP]",
    )
    s.set_defaults(fn=cmd_coordinator)

    def upstream_arg(s):
        s.add_argument(
            "--coordinator-workers",
            "--coordinator",
            default=ENV("SHARDGRAD_COORDINATOR_WORKERS", "tcp://127.0.0.1:5555"),
            help="coordinator worker address, or this host's aggregator's "
            "[SHARDGRAD_COORDINATOR_WORKERS]",
        )

    s = sub.add_parser("worker", help="run a worker")
    upstream_arg(s)
    s.add_argument(
        "--liveness",
        type=int,
        default=int(ENV("SHARDGRAD_LIVENESS", 5)),
        help="unanswered heartbeats before the coordinator counts as silent (then re-register)",
    )
    s.add_argument("--data-root", default=ENV("SHARDGRAD_DATA_ROOT"))
    s.add_argument("--id", default=ENV("SHARDGRAD_WORKER_ID"), help="worker identity")
    s.add_argument("--heartbeat-interval", type=float, default=hb)
    s.add_argument("--keys", default=ENV("SHARDGRAD_KEYS"), help="key directory (CURVE)")
    s.add_argument("--key-name", default=ENV("SHARDGRAD_KEY_NAME"))
    s.add_argument(
        "--server-key",
        default=ENV("SHARDGRAD_SERVER_KEY"),
        help="public key file of an aggregator this worker connects to (default: the "
        "coordinator's, DIR/coordinator.key) [SHARDGRAD_SERVER_KEY]",
    )
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser(
        "aggregator",
        help="run a host's aggregator: its workers connect here, it speaks to the coordinator",
    )
    upstream_arg(s)
    s.add_argument(
        "--bind",
        default=ENV("SHARDGRAD_AGGREGATOR_BIND", "tcp://0.0.0.0:5557"),
        help="where this host's workers connect [SHARDGRAD_AGGREGATOR_BIND]",
    )
    s.add_argument("--liveness", type=int, default=int(ENV("SHARDGRAD_LIVENESS", 5)))
    s.add_argument("--data-root", default=ENV("SHARDGRAD_DATA_ROOT"))
    s.add_argument("--id", default=ENV("SHARDGRAD_WORKER_ID"), help="aggregator identity")
    s.add_argument("--heartbeat-interval", type=float, default=hb)
    s.add_argument("--keys", default=ENV("SHARDGRAD_KEYS"), help="key directory (CURVE)")
    s.add_argument(
        "--key-name",
        default=ENV("SHARDGRAD_KEY_NAME"),
        help="its worker key pair: upstream it is a worker, and it serves its workers with it",
    )
    s.add_argument(
        "--server-key",
        default=ENV("SHARDGRAD_SERVER_KEY"),
        help="public key file of the aggregator above this one, if any (default: the "
        "coordinator's) [SHARDGRAD_SERVER_KEY]",
    )
    s.add_argument(
        "--min-deadline",
        type=float,
        default=_env_float("SHARDGRAD_MIN_DEADLINE", 5.0),
        help="seconds before its stragglers' sub-blocks get backups (at least; it adapts)",
    )
    s.set_defaults(fn=cmd_aggregator)

    s = sub.add_parser("cluster", help="run a local cluster: cluster up --workers N")
    s.add_argument("action", choices=["up"])
    s.add_argument("--workers", type=int, default=2)
    server_args(s)
    s.add_argument("--http", default=ENV("SHARDGRAD_HTTP", "127.0.0.1:0"), help=HTTP_HELP)
    s.set_defaults(fn=cmd_cluster)

    for name, fn, helptext in (
        ("submit", cmd_submit, "submit a job spec (TOML/JSON)"),
        ("train", cmd_train, "run a job spec in this process"),
    ):
        s = sub.add_parser(name, help=helptext, epilog=MICRO_BATCH_RULE)
        s.add_argument("spec")
        client_args(s)
        s.set_defaults(fn=fn)
    sub.choices["submit"].add_argument("--wait", action="store_true", help="watch it to the end")
    sub.choices["train"].add_argument("--local", action="store_true", help="no cluster, no sockets")
    sub.choices["train"].add_argument(
        "-o", "--output", help="write the final weights (.npz, or .safetensors for PyTorch)"
    )
    sub.choices["train"].add_argument("--data-root", default=ENV("SHARDGRAD_DATA_ROOT"))

    for name, fn, helptext in (
        ("status", cmd_status, "workers and jobs"),
        ("watch", cmd_watch, "a progress bar until the job ends"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("fetch", cmd_fetch, "a done job's weights (.npz or .safetensors)"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("job", nargs="?" if name == "status" else None)
        client_args(s)
        s.set_defaults(fn=fn)
    sub.choices["status"].add_argument("--json", action="store_true")
    sub.choices["fetch"].add_argument("-o", "--output", default="model.npz")

    s = sub.add_parser("demo", help="local cluster, digits MLP, accuracy and a loss curve")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--output-dir", default="demo-output")
    s.add_argument("--http", default=ENV("SHARDGRAD_HTTP", "127.0.0.1:0"), help=HTTP_HELP)
    s.add_argument(
        "--no-wait",
        action="store_true",
        help="exit when done; by default a demo run from a terminal keeps the dashboard up "
        "until Enter",
    )
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("keys", help="keys generate DIR: CURVE key pairs and allow-lists")
    s.add_argument("action", choices=["generate"])
    s.add_argument("dir")
    s.add_argument("--workers", type=int, default=1, help="worker key pairs to make")
    s.add_argument("--clients", type=int, default=1, help="client key pairs to make")
    s.set_defaults(fn=cmd_keys)
    return p


def main(argv=None):
    from .malloc import keep_freed_memory

    keep_freed_memory()  # before any array: a step's arrays reuse freed pages (malloc.py)
    a = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from zmq import ZMQError

    from .client import ClientError

    try:
        a.fn(a)
    except (ClientError, TimeoutError) as e:
        sys.exit(f"shardgrad {a.command}: {e}")
    except ZMQError as e:  # a malformed address or a port in use: say so, no traceback
        sys.exit(f"shardgrad {a.command}: {e} (addresses look like tcp://HOST:PORT or ipc://PATH)")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
