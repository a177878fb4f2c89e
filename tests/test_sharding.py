"""Sharding: the mesh from config, the rules table, and sharded steps on 8 simulated devices.

The multi-device checks run in a subprocess (tests/multidevice_cases.py) with XLA simulating 8
CPU devices: JAX fixes its device count at start-up, and this process has one.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mtl.config import DistributedSection, MeshSection
from mtl.errors import MtlError
from mtl.sharding import Layout, initialize_distributed, make_mesh, spec_for

from conftest import xla_flags

TESTS = Path(__file__).parent


def _run_cases(*args: str) -> str:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(TESTS / "multidevice_cases.py"), *args], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("mesh", [["data=8"], ["data=1", "fsdp=8"], ["data=2", "fsdp=2", "tensor=2"],
                                  ["data=2", "fsdp=4", "freeze_layers=1"], ["data=2", "fsdp=2", "tensor=2", "head=choice"]],
                         ids=["data", "fsdp", "data-fsdp-tensor", "data-fsdp-frozen", "multiple-choice"])
def test_sharded_train_steps_equal_the_single_device_step(mesh):
    assert "ok" in _run_cases("train", *mesh)


def test_meta_batch_split_over_devices_equals_the_single_device_meta_step():
    assert "ok" in _run_cases("meta", "data=4", "fsdp=2")


def test_checkpoints_restore_onto_another_mesh_shape():
    out = _run_cases("checkpoint")
    assert "4 -> 1 devices: ok" in out and "1 -> 4 devices: ok" in out


def test_one_device_mesh_is_the_default():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_rules_split_what_divides_and_keep_the_rest_whole():
    mesh = jax.sharding.AbstractMesh((2, 4, 1), ("data", "fsdp", "tensor"))
    assert spec_for("params/model/encoder/layers/query/kernel", (6, 384, 384), mesh) == P(None, "fsdp", "tensor")
    assert spec_for("params/model/encoder/layers/0/ffn_out/kernel", (1536, 384), mesh) == P("tensor", "fsdp")
    assert spec_for("params/model/encoder/embeddings/word/embedding", (30522, 384), mesh) == P(None, "fsdp")
    assert spec_for("params/model/encoder/embeddings/word/embedding", (30522, 30), mesh) == P()  # 30 % 4
    assert spec_for("params/model/heads/sentiment/out/kernel", (384, 3), mesh) == P()
    assert spec_for("opt_state/0/mu/model/encoder/layers/query/kernel", (6, 384, 384), mesh) == P(None, "fsdp", "tensor")
    assert spec_for("step", (), mesh) == P()


@pytest.mark.parametrize("mesh, message", [
    (MeshSection(data=3), "need 3 devices"),
    (MeshSection(data=-1, fsdp=-1), "at most one axis may be -1"),
    (MeshSection(fsdp=0), "mesh.fsdp"),
])
def test_bad_meshes_are_clear_errors(mesh, message):
    if jax.device_count() == 3:
        pytest.skip("this machine happens to have 3 devices")
    with pytest.raises(MtlError, match=message):
        make_mesh(mesh)


def test_batch_that_does_not_split_over_the_mesh_is_an_error():
    layout = Layout(make_mesh())
    with pytest.raises(MtlError, match="train.batch_size 7 does not split evenly"):
        Layout(jax.sharding.AbstractMesh((2, 1, 1), ("data", "fsdp", "tensor"))).check_batch(7, "train.batch_size")
    layout.check_batch(7, "train.batch_size")  # one device: anything goes


# ------------------------------------------------------------- joining a multi-process run

@pytest.fixture
def clean_distributed_env(monkeypatch):
    for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_nothing_set_is_a_one_process_run(clean_distributed_env):
    assert initialize_distributed(DistributedSection()) is False
    assert jax.process_count() == 1


@pytest.mark.parametrize("config, env, message", [
    (DistributedSection(num_processes=2), {},
     r"needs distributed.coordinator_address \(\$JAX_COORDINATOR_ADDRESS\), distributed.process_id \(\$JAX_PROCESS_ID\) too"),
    (DistributedSection(), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"},
     r"needs distributed.process_id \(\$JAX_PROCESS_ID\) too"),
    (DistributedSection(), {"JAX_PROCESS_ID": "one"}, r"\$JAX_PROCESS_ID='one' \(distributed.process_id\): expected an integer"),
    (DistributedSection(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), {},
     r"key 'distributed.process_id': 2 is not in 0..1"),
    (DistributedSection(coordinator_address="localhost", num_processes=2, process_id=1), {},
     r"key 'distributed.coordinator_address': 'localhost' is not host:port"),
], ids=["missing-keys", "missing-env", "bad-env", "id-out-of-range", "no-port"])
def test_incomplete_or_bad_distributed_settings_are_clear_errors(clean_distributed_env, config, env, message):
    for variable, value in env.items():
        clean_distributed_env.setenv(variable, value)
    with pytest.raises(MtlError, match=message):
        initialize_distributed(config)


def test_unreachable_coordinator_is_a_clear_error_not_an_abort(clean_distributed_env):
    # XLA's client would abort the process with a fatal log; mtl checks the address first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it
    config = DistributedSection(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=1,
                                initialization_timeout=1)
    with pytest.raises(MtlError, match=f"process 1 could not reach the coordinator .* at 127.0.0.1:{port} within"):
        initialize_distributed(config)


def test_coordinator_port_in_use_is_a_clear_error(clean_distributed_env):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = DistributedSection(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=0)
        with pytest.raises(MtlError, match=f"port {port} is not free"):
            initialize_distributed(config)
