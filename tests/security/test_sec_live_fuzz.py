"""Live fuzzing: another process fires hypothesis-generated and mutated frames at both
coordinator ports while a job runs; the job ends with the exact weights and the
coordinator still answers STATUS."""

import json
import os
import subprocess
import sys

import pytest
from sec_helpers import SLOW, expected_digest, spec

pytestmark = pytest.mark.slow
FUZZER = os.path.join(os.path.dirname(__file__), "sec_fuzzer.py")
EXAMPLES = int(os.environ.get("SHARDGRAD_LIVE_FUZZ", "3000"))


@pytest.mark.parametrize("auth", [True, False])
def test_fuzzed_frames_on_both_ports_while_a_job_runs(keys, make_cluster, auth):
    cl = make_cluster(2, keys=str(keys) if auth else None, env=SLOW)
    with cl.client() as c:
        job = c.submit(spec(rounds=120))
        fuzz = subprocess.run(
            [
                sys.executable,
                FUZZER,
                cl.worker_address,
                cl.client_address,
                str(keys) if auth else "-",
                str(EXAMPLES),
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env=cl.env,
        )
        assert fuzz.returncode == 0, fuzz.stderr[-3000:]
        counts = json.loads(fuzz.stdout.strip().splitlines()[-1])
        assert counts["worker"] + counts["client"] >= EXAMPLES * 0.9, counts
        status = c.status()  # still answering
        assert status["counters"]["bad_message"] > EXAMPLES / 10
        final = c.wait(job, timeout=180)
        assert final["digest"] == expected_digest(rounds=120)
        assert cl.coordinator.poll() is None
        print(f"live fuzz (auth={auth}): {counts}, coordinator counters {status['counters']}")
