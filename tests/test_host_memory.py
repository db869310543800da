"""research/host_memory.py: with freed memory retained, a big buffer freed by a worker thread (as XLA's
are) stays resident and the next one reuses it, where glibc's defaults unmap it."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIB = 64

# Resident MiB kept after one and after two 64 MiB arrays, each filled and freed on a fresh thread.
PROBE = f"""
import resource, sys, threading
import numpy as np
from research.host_memory import host_memory_mode, retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20

def fill_on_thread():
    worker = threading.Thread(target=lambda: np.ones({MIB} << 18, np.float32).sum())
    worker.start()
    worker.join()

base = resident()
fill_on_thread()
once = resident() - base
fill_on_thread()
print(applied, once, resident() - base, host_memory_mode())
"""


def probe(mode: str) -> tuple[str, int, int, str]:
    applied, once, twice, mode = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split(maxsplit=3)
    return applied, int(once), int(twice), mode.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_and_reused():
    applied, once, twice, mode = probe("default")
    assert (applied, mode) == ("False", "default")
    assert once < MIB // 4  # glibc's default: the block was an mmap, unmapped on free
    applied, once, twice, mode = probe("retain")
    assert applied == "True" and mode.startswith("retained")
    assert once >= MIB * 3 // 4  # kept resident...
    assert twice < MIB * 5 // 4  # ...and reused by the next block rather than grown past
