"""Fixtures for the fault tests (helpers live in fault_helpers.py)."""

import os

import pytest
from fault_helpers import DELAY, HB

from shardgrad.cluster import LocalCluster


@pytest.fixture
def make_cluster(tmp_path, request):
    clusters = []

    def make(workers, **kw):
        kw.setdefault("heartbeat_interval", HB)
        kw.setdefault("env", {"SHARDGRAD_FAULT_DELAY": DELAY})
        # SHARDGRAD_TEST_AGGREGATORS=k: the same tests with the hierarchical path on
        kw.setdefault("aggregators", int(os.environ.get("SHARDGRAD_TEST_AGGREGATORS", "0")))
        cl = LocalCluster(workers, state_dir=str(tmp_path / "state"), **kw)
        clusters.append(cl)
        return cl

    yield make
    failed = getattr(request.node, "sg_failed", False)  # (tests/conftest.py)
    for cl in clusters:
        cl.cleanup = cl.cleanup and not failed
        cl.stop()
        if failed:  # what each process said last: CI keeps no files
            print(f"\n--- cluster logs kept in {cl.log_dir}\n{cl.log_tails()}")
