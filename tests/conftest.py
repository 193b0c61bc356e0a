"""Shared test configuration. Keep each concern in its own clearly marked block."""

# --- hypothesis profiles (wire / jobspec / datasets fuzzing) -------------------------------
# HYPOTHESIS_PROFILE=default (the normal quick run) or =fuzz (`make fuzz`, the long run).
# Tests that set max_examples explicitly keep their own count under both profiles.
import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=300, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
# --- end hypothesis profiles ---------------------------------------------------------------

# --- placement -----------------------------------------------------------------------------
# The test jobs are small on purpose, and a coordinator runs a job whose rounds cost less
# than a round trip itself (coordinator/placement.py). Every cluster the tests start (they
# inherit this environment) sends jobs to its workers, so the tests exercise the worker path;
# tests/service/test_placement.py starts its own clusters with placement on.
os.environ.setdefault("SHARDGRAD_INLINE_BELOW", "0")
# Likewise a coordinator may run a job's rounds on one worker ahead on a lease while the
# others stand by, when that is faster (coordinator/width.py): with these small jobs it
# would be, and the multi-worker paths would go untested. tests/service/test_lease.py
# turns it on.
os.environ.setdefault("SHARDGRAD_WIDTH_PROBE", "0")
# A coordinator yields the CPU (nice 10) on the premise that what competes with it is its
# own workers, who wait for it at their lease window's end. Here it competes with the other
# tests' processes, which never wait for it, and tests whose subject is how it handles a
# flood or a malformed stream mid-job would time the scheduler instead (a job over before
# the stream, a rate limit never reached). test_peer_lease.py checks the default and the
# option; the benchmarks and `make demo` run with the default.
os.environ.setdefault("SHARDGRAD_NICE", "0")
# --- end placement -------------------------------------------------------------------------

# --- a failed test, for fixtures that keep its cluster's logs -------------------------------
import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """item.sg_failed: its setup or call failed (read by fixtures at their teardown)."""
    rep = (yield).get_result()
    if rep.when in ("setup", "call") and rep.failed:
        item.sg_failed = True


# --- end a failed test ---------------------------------------------------------------------
