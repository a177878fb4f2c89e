"""The tree passes the lint that pyproject.toml configures ([tool.ruff]): unused names, imports out
of order, zips of unequal lengths, closures over loop variables, and the like."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "mtl", "scripts", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
