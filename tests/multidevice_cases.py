"""Checks that need several devices, run by tests/test_sharding.py in a subprocess whose XLA
flags simulate 8 CPU devices (the flag must be set before JAX starts, and the rest of the
suite runs on one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_cases.py train data=8

Everything runs in float64: a sharded step sums partial gradients across devices in another
order than one device does, which changes only rounding, so sharded and single-device results
agree to ~1e-13 relative; RTOL = 1e-10 leaves room for that and nothing else (a wrong
sharding, a missing all-reduce or a dropped shard is off by O(1)).
"""

from __future__ import annotations

import sys
import tempfile

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from test_meta import _batch, _episodes, _learner, _model  # noqa: E402  (tests/ is sys.path[0])

from mtl.checkpoint import Checkpointer  # noqa: E402
from mtl.config import MeshSection, OptimSection  # noqa: E402
from mtl.sharding import Layout, make_mesh, path_name  # noqa: E402
from mtl.train.meta import HEAD, make_meta_step  # noqa: E402
from mtl.train.multitask import make_train_steps  # noqa: E402
from mtl.train.optim import build_optimizer, frozen_mask  # noqa: E402
from mtl.train.state import TrainState  # noqa: E402

RTOL = 1e-10


def _mesh_section(args: list[str]) -> MeshSection:
    return MeshSection(**{k: int(v) for k, v in (a.split("=") for a in args) if k in ("data", "fsdp", "tensor")})


def _leaf(tree, suffix: str):
    """The one array of `tree` whose path ends with `suffix`."""
    found = [x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if path_name(path).endswith(suffix)]
    assert len(found) == 1, (suffix, len(found))
    return found[0]


def _assert_trees_close(a, b, what: str) -> None:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=1e-14, err_msg=f"{what} {path_name(path)}")


def _train_setup(freeze_layers: int = 0):
    model, config = _model(dtype="float64")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    train_params = {"model": params, "log_vars": np.zeros((1,))}
    optim = OptimSection(learning_rate=1e-2, warmup_ratio=0.0, freeze_layers=freeze_layers)
    tx = build_optimizer(optim, train_params, config, total_steps=10)
    return graphdef, rest, tx, TrainState.create(train_params, tx, seed=0), frozen_mask(train_params, config, optim)


def check_train(mesh_args: list[str]) -> None:
    """Two multi-task steps (dropout on) on the mesh equal two single-device steps; params and
    optimizer moments are laid out by the rules table. With `freeze_layers=N` among the
    arguments, the steps take no gradient of the frozen embeddings (None on the mesh too)."""
    freeze_layers = int(dict(a.split("=") for a in mesh_args).get("freeze_layers", 0))
    graphdef, rest, tx, state, frozen = _train_setup(freeze_layers)
    layout = Layout(make_mesh(_mesh_section(mesh_args)))
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 8, "class") for _ in range(2)]
    kwargs = dict(weighting="static", skip_nonfinite=False, dropout=True, frozen=frozen)
    single = make_train_steps(graphdef, rest, tx, [HEAD], [1.0], **kwargs)[HEAD]
    sharded_state = layout.put(jax.tree.map(np.array, state))  # own buffers: the steps donate theirs
    sharded = make_train_steps(graphdef, rest, tx, [HEAD], [1.0], shardings=layout.step_shardings(sharded_state),
                               **kwargs)[HEAD]
    for batch in batches:
        state, m1 = single(state, batch)
        sharded_state, m2 = sharded(sharded_state, batch)
        np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=RTOL)
    _assert_trees_close(sharded_state.params, state.params, "params")
    _assert_trees_close(sharded_state.opt_state, state.opt_state, "opt_state")
    if freeze_layers:
        grads, _ = sharded.gradients(sharded_state, batches[0])
        assert jax.tree.leaves(grads["model"]["encoder"]["embeddings"]) == []

    mesh = layout.mesh
    query = _leaf(sharded_state.params, "layers/query/kernel")  # [layers, hidden, heads * head_dim]
    mu = _leaf(sharded_state.opt_state, "mu/model/encoder/layers/query/kernel")
    expected = P(None, "fsdp" if mesh.shape["fsdp"] > 1 else None, "tensor" if mesh.shape["tensor"] > 1 else None)
    for array in (query, mu):
        assert array.sharding.spec == P(None, "fsdp", "tensor"), array.sharding.spec
        shard = array.addressable_shards[0].data.shape
        assert shard == tuple(n // mesh.shape[a] if a else n for n, a in zip(array.shape, expected, strict=True)), shard
    print(f"train {dict(mesh.shape)}: ok, query kernel {query.shape} held as {query.addressable_shards[0].data.shape}")


def check_meta(mesh_args: list[str]) -> None:
    """A second-order MAML meta-step with the meta-batch's episodes split over devices equals
    the single-device step."""
    learner, meta_params = _learner("maml", dtype="float64")
    tx = optax.adam(1e-2)
    state = TrainState.create(meta_params, tx, seed=0)
    episodes = _episodes(8)
    layout = Layout(make_mesh(_mesh_section(mesh_args)))
    sharded_state = layout.put(jax.tree.map(np.array, state))  # own buffers: the steps donate theirs
    sharded = make_meta_step(learner, tx, skip_nonfinite=False, shardings=layout.step_shardings(sharded_state))
    state, m1 = make_meta_step(learner, tx, skip_nonfinite=False)(state, episodes)
    sharded_state, m2 = sharded(sharded_state, episodes)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=RTOL)
    _assert_trees_close(sharded_state.params, state.params, "meta params")
    print(f"meta {dict(layout.mesh.shape)}: ok")


def check_checkpoint(_: list[str]) -> None:
    """Saved from a 4-device FSDP mesh, restored onto one device, and the reverse."""
    *_, state, _ = _train_setup()
    devices = jax.devices()
    four = Layout(make_mesh(MeshSection(data=1, fsdp=4), devices[:4]))
    one = Layout(make_mesh(MeshSection(data=1), devices[:1]))
    for source, target in ((four, one), (one, four)):
        with tempfile.TemporaryDirectory() as directory:
            checkpointer = Checkpointer(directory)
            checkpointer.save(1, source.put(state), {"note": "x"})
            checkpointer.wait()
            restored, meta = checkpointer.restore(1, target.put(state))
            checkpointer.close()
        _assert_trees_close(restored, state, "restored")
        query = _leaf(restored.params, "layers/query/kernel")
        assert query.sharding.mesh.devices.size == target.mesh.devices.size
        assert query.sharding.spec == _leaf(target.tree(state.params), "layers/query/kernel").spec
        print(f"checkpoint {source.mesh.devices.size} -> {target.mesh.devices.size} devices: ok, "
              f"query kernel held as {query.addressable_shards[0].data.shape}")


if __name__ == "__main__":
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    {"train": check_train, "meta": check_meta, "checkpoint": check_checkpoint}[sys.argv[1]](sys.argv[2:])
