"""Every shardgrad process keeps freed array memory (shardgrad/malloc.py): a training step's
arrays reuse the last step's pages instead of being faulted in and zeroed by the kernel anew.
Counted in page faults, not time, in a fresh process each."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

# A step's allocation pattern: a few arrays of 0.3-12 MB made, used, and freed, over and over.
STEPS = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    {setup}
    def step():
        arrays = [np.ones(n, np.float32) for n in (3 << 20, 1 << 20, 80_000, 250_000, 1 << 18)]
        arrays.append(np.ones(784 * 512 * 4, np.float32) + arrays[0][:1])
        del arrays
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
    """
)
PAGES_TOUCHED = (3 * 2**20 + 2**20 + 80_000 + 250_000 + 2**18 + 784 * 512 * 4) * 4 // 4096


def clean_env():
    """This environment without glibc allocator settings of its own."""
    ours = ("MALLOC_", "GLIBC_", "SHARDGRAD_MALLOC")
    return {k: v for k, v in os.environ.items() if not k.startswith(ours)}


def faults_per_step(setup, **env):
    out = subprocess.run(
        [sys.executable, "-c", STEPS.format(setup=setup)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env() | env,
        check=True,
    )
    return int(out.stdout.split()[-1])


# (platform.libc_ver: musl's confstr raises where glibc's answers)
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")


@glibc
def test_a_tuned_process_reuses_freed_pages_step_after_step():
    tuned = faults_per_step("from shardgrad.malloc import keep_freed_memory as k; assert k()")
    assert tuned < PAGES_TOUCHED // 100, (tuned, PAGES_TOUCHED)


@glibc
def test_every_shardgrad_command_tunes_its_process(tmp_path):
    ran = f"from shardgrad import cli; cli.main(['keys', 'generate', {str(tmp_path)!r}])"
    assert faults_per_step(ran) < PAGES_TOUCHED // 100


@glibc
def test_the_users_own_allocator_settings_win():
    setup = "from shardgrad.malloc import keep_freed_memory as k; print(k())"
    users = (
        {"SHARDGRAD_MALLOC": "default"},
        {"MALLOC_TRIM_THRESHOLD_": "1"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
    )
    for env in users:
        out = subprocess.run(
            [sys.executable, "-c", setup],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env() | env,
            check=True,
        )
        assert out.stdout.split() == ["False"], env
    # an unrelated glibc tunable is not a choice about these two
    other = {"GLIBC_TUNABLES": "glibc.cpu.x86_rep_movsb_threshold=4096"}
    out = subprocess.run([sys.executable, "-c", setup], capture_output=True, text=True,
                         timeout=60, env=clean_env() | other, check=True)  # fmt: skip
    assert out.stdout.split() == ["True"]
