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
from test_meta import LENGTH, _batch, _episodes, _learner, _model  # noqa: E402  (tests/ is sys.path[0])

from mtl.checkpoint import Checkpointer  # noqa: E402
from mtl.config import MeshSection, OptimSection  # noqa: E402
from mtl.models.heads import MultipleChoiceHead  # noqa: E402
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


def _assert_trees_close(a, b, what: str, skip: str | None = None) -> None:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        if skip is not None and path_name(path).endswith(skip):
            continue
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=1e-14, err_msg=f"{what} {path_name(path)}")


CHOICES = 3


def _choice_batch(rng, rows):
    """A multiple-choice batch: `rows` examples of CHOICES sequences each, [rows, CHOICES, LENGTH],
    some with a padding choice (no tokens) last."""
    flat = _batch(rng, rows * CHOICES, "class")
    batch = {k: flat[k].reshape(rows, CHOICES, LENGTH) for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = rng.integers(0, CHOICES - 1, size=(rows,)).astype(np.int32)
    batch["attention_mask"][::3, CHOICES - 1] = 0  # every third example has one choice fewer: padding
    return dict(batch, labels=labels, weights=np.ones((rows,), np.float32))


def _train_setup(freeze_layers: int = 0, head: str = "class"):
    model, config = _model(dtype="float64")
    if head == "choice":  # the same encoder under a multiple-choice head
        # Reading the pooler, as BertForMultipleChoice: under mean or first-token pooling a shift
        # shared by every choice (the top LayerNorm's bias) cannot move the softmax over choices,
        # so that bias gets a zero gradient, and Adam turns its rounding noise into ~1e-12 updates
        # that differ with the summation order.
        choose = MultipleChoiceHead(16, [str(i) for i in range(CHOICES)], rngs=nnx.Rngs(1), dropout=0.0)
        nnx.update(choose, jax.tree.map(lambda x: x.astype(np.float64), nnx.state(choose, nnx.Param)))
        model.heads[HEAD] = choose
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    train_params = {"model": params, "log_vars": np.zeros((1,))}
    optim = OptimSection(learning_rate=1e-2, warmup_ratio=0.0, freeze_layers=freeze_layers)
    tx = build_optimizer(optim, train_params, config, total_steps=10)
    return graphdef, rest, tx, TrainState.create(train_params, tx, seed=0), frozen_mask(train_params, config, optim)


def check_train(mesh_args: list[str]) -> None:
    """Two multi-task steps (dropout on) on the mesh equal two single-device steps; params and
    optimizer moments are laid out by the rules table. With `freeze_layers=N` among the
    arguments, the steps take no gradient of the frozen embeddings (None on the mesh too); with
    `head=choice`, the batches are multiple-choice ones, [8, K, T], split over the batch axes."""
    options = dict(a.split("=") for a in mesh_args)
    head = options.get("head", "class")
    graphdef, rest, tx, state, frozen = _train_setup(int(options.get("freeze_layers", 0)), head)
    layout = Layout(make_mesh(_mesh_section(mesh_args)))
    rng = np.random.default_rng(0)
    batches = [_choice_batch(rng, 8) if head == "choice" else _batch(rng, 8, "class") for _ in range(2)]
    kwargs = dict(weighting="static", skip_nonfinite=False, dropout=True, frozen=frozen)
    single = make_train_steps(graphdef, rest, tx, [HEAD], [1.0], **kwargs)[HEAD]
    sharded_state = layout.put(jax.tree.map(np.array, state))  # own buffers: the steps donate theirs
    sharded = make_train_steps(graphdef, rest, tx, [HEAD], [1.0], shardings=layout.step_shardings(sharded_state),
                               **kwargs)[HEAD]
    # The multiple-choice head's bias adds one number to every choice's score, which the softmax
    # over choices cannot see: its gradient is zero, so both runs keep it, up to Adam's scaling of
    # rounding noise (~1e-12), which differs with the summation order; it is checked apart.
    gradient_free = "heads/episode/out/bias" if head == "choice" else None
    bias = np.array(_leaf(state.params, gradient_free)) if gradient_free else None
    for batch in batches:
        state, m1 = single(state, batch)
        sharded_state, m2 = sharded(sharded_state, batch)
        np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=RTOL)
    _assert_trees_close(sharded_state.params, state.params, "params", skip=gradient_free)
    _assert_trees_close(sharded_state.opt_state, state.opt_state, "opt_state", skip=gradient_free)
    if gradient_free:
        for run in (state, sharded_state):
            np.testing.assert_allclose(np.asarray(_leaf(run.params, gradient_free)), bias, rtol=0, atol=1e-10)
    if int(options.get("freeze_layers", 0)):
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
