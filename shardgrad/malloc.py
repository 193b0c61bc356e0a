"""Keep freed array memory in the process, as a caching allocator does.

glibc hands a freed block of 128 KiB or more straight back to the kernel (munmap, or a trim
of the heap's top), so the next step's arrays of the same sizes come back as fresh pages:
each is faulted in and zeroed by the kernel, every step. A training step frees and
allocates the same few-MB arrays over and over, and on this project's 2-core VM those page
faults were 30-45 % of a step's CPU (system time), and two processes faulting at once slowed
each other. PyTorch keeps its own caching allocator for the same reason; NumPy has none for
large arrays, so we tell glibc to keep what it frees: memory stays at the process's peak
instead of shrinking between steps.

Every `shardgrad` process calls `keep_freed_memory()` first thing (`shardgrad.cli.main`), as
do the benchmarks, whose floor is the same NumPy under the same allocator. A user who sets
glibc's own thresholds (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or either in
GLIBC_TUNABLES) keeps them, and SHARDGRAD_MALLOC=default leaves the allocator alone.
"""

import ctypes
import os

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit; larger blocks (rare here) are still mapped
MMAP_THRESHOLD = 32 << 20
# free memory at the heap's top is handed back only past this much: a step's worth stays
TRIM_THRESHOLD = 256 << 20

_USERS_OWN = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# (GLIBC_TUNABLES may hold unrelated tunables: only these two are the user's choice here)
_USERS_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def keep_freed_memory() -> bool:
    """Tune glibc malloc to keep freed memory; True if it did (False: not glibc, or the user
    chose their own settings)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        os.environ.get("SHARDGRAD_MALLOC") == "default"
        or any(v in os.environ for v in _USERS_OWN)
        or any(t in tunables for t in _USERS_TUNABLES)
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):  # (TypeError: CDLL(None) on Windows)
        return False  # no mallopt (macOS, Windows): their allocators keep memory anyway
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success (musl has none: AttributeError above)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
