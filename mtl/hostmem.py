"""Host memory: let a CPU run reuse or cheaply map the memory its steps allocate.

XLA:CPU allocates each step's temporaries and outputs afresh and frees them after. glibc's malloc
serves large blocks with mmap, gives them back with munmap, and trims what a thread's arena frees
at the top of its heap, so every step the kernel maps and zeroes the same gigabytes again, one
4 KiB page fault at a time. On a 2-core AMD EPYC a MiniLM train step took 417 thousand page
faults and 0.7 s of system CPU time; a second-order MAML meta-step faulted in 7.7 GB.

Two remedies, each process-wide:

- `reexec_with_huge_pages()`, which every `mtl` command applies: glibc asks the kernel for
  transparent huge pages (2 MiB) for its large blocks (the `glibc.malloc.hugetlb=1` tunable), so
  a step's fresh temporaries take a few thousand faults instead of hundreds of thousands, at no
  cost in peak memory. The tunable is read when a process starts, so the process starts itself
  again with it. On the 2-core Zen 5 EPYC the MiniLM train step went from 1.77-2.04 s to
  1.04-1.26 s, at the same peak RSS (README, Other commands).
- `retain_freed_memory()`: glibc keeps freed memory for reuse (one arena for all threads, no mmap
  for large blocks, no trimming), so nothing is faulted in again. Measured on the older EPYC:
  train step 2.49 s -> 1.99 s, peak RSS 2.9 -> 4.1 GB; MAML meta-step 16.8 s -> 11-12 s, peak
  RSS 7.3 -> 13.0 GB. The process keeps its high-water mark, and fragmentation in the one heap
  raises it, so it is an opt-in (`mtl --retain-memory ...`), not a default.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

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


# glibc's malloc tunable for transparent huge pages, read at process start (glibc 2.35 and later).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_FIRST_GLIBC_WITH_HUGETLB = (2, 35)
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None where the
    kernel has none (not Linux, or built without THP)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES as {name: value}."""
    items = (item.partition("=") for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)
    return {name: value for name, _, value in items}


def asks_for_huge_pages(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a process started with `environ` has glibc ask for huge pages (benchmarks say so)."""
    return _tunables(environ).get(HUGE_PAGES_TUNABLE) == "1"


def huge_pages_environment(environ: Mapping[str, str], thp_mode: str | None,
                           libc: tuple[str, str]) -> dict[str, str] | None:
    """`environ` with glibc's malloc set to ask for transparent huge pages, or None where that
    would change nothing or is not ours to change.

    None when: the C library is not glibc 2.35 or later; the kernel's THP mode is not "madvise"
    (under "always" large blocks get huge pages anyway, under "never" they cannot); or
    GLIBC_TUNABLES already sets the tunable, the user's choice (`glibc.malloc.hugetlb=0` turns
    this off for every mtl command) and the mark of a process that has started itself again.
    """
    name, version = libc
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or release < _FIRST_GLIBC_WITH_HUGETLB or thp_mode != "madvise":
        return None
    if HUGE_PAGES_TUNABLE in _tunables(environ):
        return None
    tunables = [environ.get("GLIBC_TUNABLES", ""), f"{HUGE_PAGES_TUNABLE}=1"]
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, tunables))}


def reexec_with_huge_pages() -> None:
    """Start this process again from its command line with huge pages for malloc's large blocks
    (see the module docstring and `huge_pages_environment`); return where that changes nothing.

    Call it first thing in a script's `main`, before it reads stdin or writes anything: the
    process is replaced (same PID), and its command line runs again from the start. An
    interactive interpreter or a program read from stdin cannot be run again: there it returns.
    """
    environ = huge_pages_environment(os.environ, transparent_huge_pages_mode(), platform.libc_ver())
    if environ is None or not sys.executable or sys.argv[0] in ("", "-"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # speed is not worth failing the command for: it runs on here, as it is
        return
