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


def python(code, **env):
    """Run `code` in a fresh interpreter with no allocator settings but `env`."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=clean_env() | env, check=True)  # fmt: skip


def faults_per_step(setup, **env):
    return int(python(STEPS.format(setup=setup), **env).stdout.split()[-1])


# (platform.libc_ver: musl's confstr raises where glibc's answers)
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")


@glibc
def test_a_tuned_process_reuses_freed_pages_step_after_step():
    tuned = faults_per_step("from shardgrad.malloc import keep_freed_memory as k; assert k()")
    assert tuned < PAGES_TOUCHED // 100, (tuned, PAGES_TOUCHED)


@glibc
def test_an_untuned_process_faults_its_pages_in_anew_every_step():
    """The control: without the tuning, this pattern does fault (so the tests above can
    fail). Transparent huge pages off, or one fault would map 512 pages."""
    untuned = "import ctypes; assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0"  # THP off
    got = faults_per_step(untuned, SHARDGRAD_MALLOC="default", NUMPY_MADVISE_HUGEPAGE="0")
    assert got > PAGES_TOUCHED // 2, (got, PAGES_TOUCHED)


@glibc
def test_a_process_gives_its_kept_memory_back_when_a_job_ends():
    kept = textwrap.dedent(
        """
        import numpy as np
        from shardgrad.malloc import give_back_memory, keep_freed_memory
        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 >> 20
        assert keep_freed_memory()
        arrays = [np.ones(4 << 20, np.float32) for _ in range(12)]  # 192 MiB on the heap
        del arrays
        print(rss_mb())
        print(give_back_memory(), rss_mb())
        """
    )
    out = python(kept).stdout.split()
    before, trimmed, after = int(out[0]), out[1], int(out[2])
    assert trimmed == "True" and before - after > 150, out


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
        assert python(setup, **env).stdout.split() == ["False"], env
    # a value that is no choice is named on stderr, and the default holds
    out = python(setup, SHARDGRAD_MALLOC="defualt")
    assert out.stdout.split() == ["True"] and "SHARDGRAD_MALLOC='defualt'" in out.stderr
    # an unrelated glibc tunable is not a choice about these two
    other = python(setup, GLIBC_TUNABLES="glibc.cpu.x86_rep_movsb_threshold=4096")
    assert other.stdout.split() == ["True"]
