"""The `mtl` command as a user runs it: in a subprocess, through the console script."""

import os
import shutil
import subprocess
import sys

import pytest

MTL = shutil.which("mtl") or f"{sys.executable} -m mtl.cli"


def run_mtl(*args, env=None):
    return subprocess.run([*MTL.split(), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_embed_prints_similarities(minilm_dir):
    proc = run_mtl("embed", "A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today.")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "bert, 6 layers, hidden 384" in proc.stdout
    row0 = [float(x) for x in lines[-3].split()[1:]]
    assert row0[0] == pytest.approx(1.0, abs=1e-3)
    assert row0[1] == pytest.approx(0.755, abs=0.005)
    assert abs(row0[2]) < 0.05


def test_bad_model_is_one_clear_line(tmp_path):
    proc = run_mtl("embed", "--model", "no-such-org/no-such-model", env={"MTL_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("mtl: error: cannot resolve model 'no-such-org/no-such-model'. Tried:")
    assert "Traceback" not in proc.stderr


def test_fetch_prints_a_directory(tiny_hf):
    proc = run_mtl("fetch", str(tiny_hf["bert"][1]))
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(tiny_hf["bert"][1])


@pytest.mark.slow
def test_data_prints_counts(minilm_dir):
    import json

    proc = run_mtl("data", "wnut_ner", "--compact")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["task"] == "wnut_ner" and summary["rows_read"] == 2394
    assert sum(summary["tokens"].values()) == 46469


def test_data_unknown_task_is_one_line():
    proc = run_mtl("data", "no_such_task")
    assert proc.returncode == 2
    assert proc.stderr.startswith("mtl: error: task 'no_such_task' is neither a file nor a shipped task")
    assert "Traceback" not in proc.stderr
