"""mtl.hostmem: freed memory is reused, not faulted in again. Each case runs in a subprocess,
because the setting is process-wide and must come before the process's threads allocate."""

import json
import platform
import subprocess
import sys

import pytest

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
