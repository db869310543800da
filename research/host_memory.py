"""Keep freed host memory in the process, so each step reuses pages instead of faulting in fresh ones.

XLA:CPU allocates every execution's buffers (its outputs and one block of temporaries) with malloc,
from its worker threads. glibc gives each thread an arena of at most 64 MiB and serves anything bigger
with a fresh mmap, unmapped again on free: every step then touches its buffers page by page anew, and
the kernel zeroes each page on the first touch. A `bench-512` train step faulted in 1.2 GB this way,
~1.3 s of system CPU time per 5 s step; the 131 MB logits of a [4096, 8000] matmul cost 32,000 page
faults per call.

`retain_freed_memory()` tells glibc to serve large blocks from one heap (one arena, no mmap) and never
to give freed memory back: steady-state steps then fault nothing. The price is that the process keeps
its peak memory until it exits, as a GPU framework's caching allocator does. Numbers in the README.

It acts on the whole process, so the training entry points (`python -m research.train`, the sweep's
workers, `experiments.routing_collapse`) call it first thing, before JAX starts its threads (arenas
already made stay). Anything else in the process gets the same allocator, PyTorch included, which is
why the benchmarks that race Hugging Face in one process leave glibc's defaults alone: HF's eager
forward allocates more per call than ours, gains more from this, and the comparison would then say
more about the allocator than about either framework.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
INT_MAX = 2**31 - 1

_applied = False


def retain_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap and no trimming; True if set (False off glibc)."""
    global _applied  # a process-wide setting, so its state is the process's: applied at most once
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _applied = all(libc.mallopt(param, value) == 1 for param, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, INT_MAX)))
    return _applied


def host_memory_mode() -> str:
    """For run records: how this process's allocator was set."""
    return "retained (glibc: one arena, no mmap, no trim)" if _applied else "default"
