"""Host memory: let a CPU run reuse the memory its steps free instead of faulting it in again.

XLA:CPU allocates each step's temporaries and outputs afresh and frees them after. glibc's malloc
serves large blocks with mmap, gives them back with munmap, and trims what a thread's arena frees
at the top of its heap, so every step the kernel maps and zeroes the same gigabytes again. On a
2-core AMD EPYC a MiniLM train step took 417 thousand page faults and 0.7 s of system CPU time;
a second-order MAML meta-step faulted in 7.7 GB.

`retain_freed_memory()` tells glibc to keep freed memory for reuse: one arena for all threads,
no mmap for large blocks, no trimming. Measured there (README, Benchmarks): train step 2.49 s ->
1.99 s, peak RSS 2.9 -> 4.1 GB; MAML meta-step 16.8 s -> 11-12 s, peak RSS 7.3 -> 13.0 GB. The
process keeps its high-water mark, and fragmentation in the one heap raises it, so it is an
opt-in (`mtl --retain-memory ...`), not a default.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True if it applied.

    Call it first thing in the process, before JAX starts its threads: a thread that has already
    allocated keeps its own arena. A no-op returning False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
