"""mtl.hostmem: freed memory is reused, not faulted in again, or faulted in in huge pages. The
cases that measure run in a subprocess, because each setting is process-wide and must come before
the process's threads allocate (huge pages: before it starts)."""

import json
import platform
import subprocess
import sys

import pytest

from mtl.hostmem import asks_for_huge_pages, huge_pages_environment, transparent_huge_pages_mode

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Allocate, touch and free a 64 MiB block (above glibc's largest mmap threshold, 32 MiB) five
# times, from a second thread as XLA's workers do; count the page faults of the last four.
CHILD = """
import ctypes, json, resource, sys, threading
from mtl.hostmem import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 64 << 20, []
def work():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"applied": applied, "faults": faults[1:]}))
"""


def _run(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_retained_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    default = _run("default")
    assert min(default["faults"]) > pages // 2, default  # mapped and zeroed afresh each time
    retained = _run("retain")
    assert retained["applied"] is True
    assert max(retained["faults"]) < 100, retained  # the freed block is handed out again


@pytest.mark.slow
def test_cli_flag_runs_a_command(minilm_dir):
    proc = subprocess.run([sys.executable, "-m", "mtl.cli", "-q", "--retain-memory", "embed", "one", "two"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cosine similarity" in proc.stdout
    assert proc.stderr == ""


# ------------------------------------------------------------------------ huge pages

GLIBC = ("glibc", "2.36")


def test_huge_pages_are_asked_of_glibc_under_the_madvise_mode():
    assert huge_pages_environment({"HOME": "/h"}, "madvise", GLIBC) == {
        "HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # the user's other tunables stay, in glibc's colon-separated list
    environ = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC)
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert asks_for_huge_pages(environ)
    assert not asks_for_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not asks_for_huge_pages({})


@pytest.mark.parametrize("environ, thp_mode, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user's choice wins
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", GLIBC),  # already started again
    ({}, "always", GLIBC),  # the kernel gives large blocks huge pages anyway
    ({}, "never", GLIBC),
    ({}, None, GLIBC),  # no THP in this kernel
    ({}, "madvise", ("glibc", "2.34")),  # the tunable came in glibc 2.35
    ({}, "madvise", ("", "")),  # musl, macOS
])
def test_huge_pages_are_left_alone_where_they_change_nothing(environ, thp_mode, libc):
    assert huge_pages_environment(environ, thp_mode, libc) is None


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert transparent_huge_pages_mode(mode_file) == "madvise"
    assert transparent_huge_pages_mode(tmp_path / "missing") is None


def _applies_here() -> bool:
    return huge_pages_environment({}, transparent_huge_pages_mode(), platform.libc_ver()) is not None


needs_madvise_thp = pytest.mark.skipif(not _applies_here(),
                                       reason="needs glibc 2.35+ and the kernel's THP mode 'madvise'")

# The same 64 MiB blocks, in a process that first starts itself again with huge pages.
CHILD_HUGE = "from mtl.hostmem import reexec_with_huge_pages\nreexec_with_huge_pages()\n" + CHILD.replace(
    'applied = retain_freed_memory() if sys.argv[1] == "retain" else None',
    'import os\napplied = os.environ.get("GLIBC_TUNABLES")')


@needs_madvise_thp
def test_a_restarted_process_maps_large_blocks_in_huge_pages():
    pages = (64 << 20) // 4096
    proc = subprocess.run([sys.executable, "-c", CHILD_HUGE, "huge"], capture_output=True, text=True, check=True)
    huge = json.loads(proc.stdout)  # one line: the first process was replaced before it printed
    assert huge["applied"] == "glibc.malloc.hugetlb=1"
    assert max(huge["faults"]) < pages // 16, huge  # 2 MiB pages: 32 faults a block, not 16,384


# `mtl` over its own command line (argv None), with an exit hook that reports the environment.
CLI = ("import atexit, os, sys\n"
       "atexit.register(lambda: print('tunables:', os.environ.get('GLIBC_TUNABLES')))\n"
       "from mtl.cli import main\n"
       "sys.exit(main())\n")


@needs_madvise_thp
@pytest.mark.parametrize("flags, tunables", [
    ([], "glibc.malloc.hugetlb=1"),
    (["--no-huge-pages"], "None"),
    (["--retain-memory"], "None"),  # freed memory is reused: nothing to fault in
])
def test_the_cli_runs_its_command_with_huge_pages_unless_told_not_to(tmp_path, flags, tunables):
    # A missing config: the command fails at once, after the restart.
    proc = subprocess.run([sys.executable, "-c", CLI, *flags, "train", str(tmp_path / "missing.yaml"),
                           "--workdir", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "missing.yaml" in proc.stderr
    assert proc.stdout.splitlines() == [f"tunables: {tunables}"]  # printed once: by the process that ran it


def test_a_restart_the_system_refuses_leaves_the_command_running_here(monkeypatch):
    from mtl import hostmem

    tried = []

    def refuse(path, argv, environ):
        tried.append(environ["GLIBC_TUNABLES"])
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(hostmem, "huge_pages_environment", lambda *_: {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    monkeypatch.setattr(hostmem.os, "execve", refuse)
    monkeypatch.setattr(sys, "argv", ["mtl", "train"])
    assert hostmem.reexec_with_huge_pages() is None  # returned, so the caller goes on
    assert tried == ["glibc.malloc.hugetlb=1"]
