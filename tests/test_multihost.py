"""Several processes in one run: jax.distributed on 127.0.0.1 with CPU (gloo) collectives.

Each process drives one CPU device, and configs/tiny.yaml runs data-parallel over the two
(mesh.data=2). The reference is one process driving two simulated CPU devices on the same mesh:
the same SPMD program, whose cross-device sums add the same two numbers, so the two-process run
must match it bit for bit (not just closely).
"""

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from test_trainer import TINY, _assert_same_tree, _final_tree, _losses

from mtl.inference import export
from mtl.train.loop import evaluate

from conftest import xla_flags

TESTS = Path(__file__).parent
MESH = ["mesh.data=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(), **extra}


def _command(rows_file: Path, workdir: Path, *overrides: str) -> list[str]:
    """`mtl train configs/tiny.yaml` that records the batch rows its process builds."""
    return [sys.executable, str(TESTS / "multiprocess_train.py"), str(rows_file), "train", TINY, *MESH, *overrides,
            "--workdir", str(workdir)]


def _start_pair(workdir: Path, *, via_env: bool, extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run, configured by config keys or by environment variables."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in (0, 1):
        if via_env:
            env = _env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
            keys = ()
        else:
            env = _env()
            keys = (f"distributed.coordinator_address={address}", "distributed.num_processes=2",
                    f"distributed.process_id={pid}")
        log = open(workdir.parent / f"{workdir.name}.process{pid}.log", "a")
        procs.append(subprocess.Popen(_command(workdir.parent / f"{workdir.name}.rows{pid}", workdir, *keys, *extra),
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], workdir: Path, timeout: float = 600) -> None:
    for pid, proc in enumerate(procs):
        rc = proc.wait(timeout=timeout)
        log = (workdir.parent / f"{workdir.name}.process{pid}.log").read_text()
        assert rc == 0, f"process {pid} exited with {rc}:\n{log[-3000:]}"


def _rows(path: Path) -> dict:
    """{(stream, step): [rows of the batch]} as one process recorded them."""
    out = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out[record["stream"], record["step"]].append(record["rows"])
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, minilm_dir):
    """configs/tiny.yaml in one process that drives two simulated CPU devices."""
    root = tmp_path_factory.mktemp("single")
    env = _env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    proc = subprocess.run(_command(root / "rows", root / "run"), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, minilm_dir):
    """The same run as two processes of one CPU device each, set up by config keys."""
    root = tmp_path_factory.mktemp("pair")
    procs = _start_pair(root / "run", via_env=False)
    _wait(procs, root / "run")
    return root


@pytest.mark.slow
def test_two_processes_train_like_one_process(single_process, two_processes):
    assert _losses(two_processes / "run") == _losses(single_process / "run")
    pair, pair_step = _final_tree(two_processes / "run")
    single, single_step = _final_tree(single_process / "run")
    assert pair_step == single_step == 40
    _assert_same_tree(pair, single)  # params, optimizer state, step and RNG, bit for bit


@pytest.mark.slow
def test_each_process_builds_only_its_half_of_every_batch(single_process, two_processes):
    whole = _rows(single_process / "rows")
    first, second = _rows(two_processes / "run.rows0"), _rows(two_processes / "run.rows1")
    assert set(first) == set(second) == set(whole) and len(whole) == 40  # every train step, once
    for key, [rows] in whole.items():
        [mine], [theirs] = first[key], second[key]
        assert len(mine) == len(theirs) == len(rows) // 2
        assert mine + theirs == rows  # process 0 the first block of rows, process 1 the second


@pytest.mark.slow
def test_one_process_evaluates_and_exports_what_two_processes_trained(tmp_path, two_processes):
    """A checkpoint sharded over two processes restores onto this process's single device."""
    workdir = tmp_path / "run"
    shutil.copytree(two_processes / "run", workdir)
    results = evaluate(workdir, "validation")
    recorded = next(r for r in _metrics(workdir) if r["kind"] == "eval" and r["step"] == results["checkpoint_step"])
    # The data-parallel forward pass has no sum across batch rows: the same params score the same.
    assert {k: v for k, v in results.items() if k != "checkpoint_step"} == {
        k: v for k, v in recorded.items() if k not in ("step", "kind", "selection")}
    model = transformers.AutoModel.from_pretrained(export(workdir, tmp_path / "export"))
    assert model.config.hidden_size == 32


@pytest.mark.slow
def test_a_killed_process_then_a_restarted_pair_resumes_exactly(tmp_path, two_processes):
    workdir = tmp_path / "run"
    # Environment variables this time, and a short heartbeat so the survivor notices quickly.
    procs = _start_pair(workdir, via_env=True, extra=("distributed.heartbeat_timeout=10",))
    deadline = time.monotonic() + 300
    try:
        while not any(r.get("step", 0) >= 25 for r in _metrics(workdir)):  # past the step-20 checkpoint
            assert all(p.poll() is None for p in procs), "a process ended before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill process 1"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        # Process 0 stops by itself once process 1's heartbeats are missed (XLA aborts it).
        assert procs[0].wait(timeout=120) != 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    killed_at = max(r["step"] for r in _metrics(workdir))
    assert 25 <= killed_at < 40

    _wait(_start_pair(workdir, via_env=True, extra=("distributed.heartbeat_timeout=10",)), workdir)
    assert _losses(workdir) == _losses(two_processes / "run")
    resumed, step = _final_tree(workdir)
    reference, _ = _final_tree(two_processes / "run")
    assert step == 40
    _assert_same_tree(resumed, reference)


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_two_process_meta_training_matches_one_process(tmp_path, minilm_dir):
    """configs/meta_tiny.yaml: each process adapts its own episodes of the meta-batch."""
    meta_tiny = str(TESTS.parent / "configs" / "meta_tiny.yaml")
    command = [sys.executable, "-m", "mtl.cli", "meta-train", meta_tiny, *MESH, "--workdir"]
    single = subprocess.run([*command, str(tmp_path / "single")], capture_output=True, text=True,
                            env=_env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2")))
    assert single.returncode == 0, single.stderr[-3000:]
    address = f"127.0.0.1:{_free_port()}"
    pair = [subprocess.Popen([*command, str(tmp_path / "pair")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)))
            for pid in (0, 1)]
    for proc in pair:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]

    def records(workdir):  # every train and evaluation record but the wall-clock rate
        return [{k: v for k, v in r.items() if k != "steps_per_second"} for r in _metrics(workdir)]

    assert records(tmp_path / "pair") == records(tmp_path / "single") != []
