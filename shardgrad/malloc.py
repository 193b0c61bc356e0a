"""Keep freed array memory in the process, as a caching allocator does.

glibc hands a freed block above its mmap threshold straight back to the kernel (munmap), and
trims free memory off the heap's top past 128 KiB. The threshold starts at 128 KiB and rises
to the size of a mapped block once one is freed, but only partly fits a step's mix of sizes,
so the next step's arrays come back as fresh pages: each is faulted in and zeroed by the
kernel, every step. A training step frees and allocates the same few-MB arrays over and
over, and on this project's 2-core VM those page faults were 30-45 % of a step's CPU (system
time), and two processes faulting at once slowed each other. PyTorch keeps its own caching
allocator for the same reason; NumPy has none for large arrays, so we tell glibc to keep
what it frees: blocks up to 32 MiB come from the heap, and up to 256 MiB of free memory
stays at its top. So a process stays at its peak while it trains; `give_back_memory()`
returns what is free to the kernel when a job ends (the coordinator, and the workers on
STOP_JOB).

Every `shardgrad` process calls `keep_freed_memory()` first thing (`shardgrad.cli.main`), as
do the benchmarks, whose floor is the same NumPy under the same allocator. A user who sets
glibc's own thresholds (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or either in
GLIBC_TUNABLES) keeps them, and SHARDGRAD_MALLOC=default leaves the allocator alone.
"""

import ctypes
import os
import sys

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


def _libc():
    """This process's C library if it is glibc (mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except (OSError, TypeError):  # (TypeError: CDLL(None) on Windows)
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None  # musl, macOS: their allocators keep freed memory anyway
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Tune glibc malloc to keep freed memory; True if it did (False: not glibc, or the user
    chose their own settings)."""
    choice = os.environ.get("SHARDGRAD_MALLOC", "keep")
    if choice not in ("keep", "default"):
        print(
            f"shardgrad: SHARDGRAD_MALLOC={choice!r} is not a choice: 'keep' (the default: "
            "keep freed memory for the next step) or 'default' (glibc's own settings); "
            "keeping freed memory",
            file=sys.stderr,
        )
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        choice == "default"
        or any(v in os.environ for v in _USERS_OWN)
        or any(t in tunables for t in _USERS_TUNABLES)
        or (libc := _libc()) is None
    ):
        return False
    global _tuned
    # mallopt returns 1 on success
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(
        M_TRIM_THRESHOLD, TRIM_THRESHOLD
    ):
        _tuned = libc
    return _tuned is not None


_tuned = None  # the C library, once tuned


def give_back_memory() -> bool:
    """Return this process's free heap memory to the kernel (a job ended: what it kept for
    the next step would otherwise stay with the process until it exits). True if any was."""
    return _tuned is not None and bool(_tuned.malloc_trim(0))
