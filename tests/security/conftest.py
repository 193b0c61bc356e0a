"""Fixtures for the security tests: a fresh key directory and clusters stopped at the end."""

import os

import pytest

from shardgrad.cluster import LocalCluster
from shardgrad.security import generate_keys


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    list(generate_keys(d, workers=2, clients=2, admins=1))
    return d


@pytest.fixture
def make_cluster(tmp_path):
    clusters = []

    def make(workers=2, **kw):
        kw.setdefault("heartbeat_interval", 0.2)
        # SHARDGRAD_TEST_AGGREGATORS=k: the same tests with the hierarchical path on
        kw.setdefault("aggregators", int(os.environ.get("SHARDGRAD_TEST_AGGREGATORS", "0")))
        cl = LocalCluster(workers, state_dir=str(tmp_path / f"state{len(clusters)}"), **kw)
        clusters.append(cl)
        return cl.start()

    yield make
    for cl in clusters:
        cl.stop()
        for p in [cl.coordinator, *cl.workers]:
            # SIGTERM must end the coordinator cleanly (the ZAP thread must not block
            # Context.term()), not by the SIGKILL that stop() falls back to.
            assert p is None or p.returncode in (0, -15), f"exit code {p.returncode}"
