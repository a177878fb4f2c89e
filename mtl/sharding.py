"""Device meshes and where every array lives on them: JAX's own SPMD, nothing home-made.

A run's mesh has three named axes (config key `mesh`):
  data    batch rows (and a meta-batch's episodes) split across devices, params replicated;
  fsdp    batch rows split as over `data`, and params plus optimizer state split too (ZeRO-3
          style: XLA gathers each weight where it is used and reduce-scatters its gradient);
  tensor  the attention heads and the MLP's hidden units split (Megatron style).
With one device every axis has size 1 and everything below is the single-device program.

Which dimensions of a parameter split over which axes is one table, PARAM_RULES, matched on
the parameter's path; optimizer moments have the same paths under opt_state, so they follow
their parameters. Steps are jitted with explicit in/out shardings from a `Layout`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtl.config import MeshSection
from mtl.errors import MtlError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes that split batch rows

# (regex searched in the "/"-joined parameter path, spec of the parameter's trailing dims).
# The first match wins. Stacked (scanned) layers have a leading layer dim, which stays whole.
# A dim that the named axes do not divide stays whole too (see `spec_for`).
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"embeddings/word/embedding$", P(None, "fsdp")),  # [vocab, hidden]: vocabularies rarely divide
    (r"/(query|key|value)/kernel$", P("fsdp", "tensor")),  # [hidden, heads * head_dim]
    (r"/(query|key|value)/bias$", P("tensor")),
    (r"/attention_out/kernel$", P("tensor", "fsdp")),  # [heads * head_dim, hidden]
    (r"/ffn_in/kernel$", P("fsdp", "tensor")),  # [hidden, intermediate]
    (r"/ffn_in/bias$", P("tensor")),
    (r"/ffn_out/kernel$", P("tensor", "fsdp")),  # [intermediate, hidden]
    (r"/pooler/kernel$", P("fsdp", None)),
    (r".*", P()),  # norms, biases, small tables, heads, scalars: replicated
)


def make_mesh(config: MeshSection | None = None, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    config = config or MeshSection()
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    for name, size in zip(AXES, sizes):
        if size == 0 or size < -1:
            raise MtlError(f"key 'mesh.{name}': must be positive or -1 (the devices left), got {size}")
    if sizes.count(-1) > 1:
        raise MtlError("key 'mesh': at most one axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise MtlError(f"key 'mesh': {len(devices)} devices do not split into axes of sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise MtlError(f"key 'mesh': axes {dict(zip(AXES, sizes))} need {math.prod(sizes)} devices, "
                       f"there are {len(devices)}")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def path_name(path: tuple) -> str:
    """"params/model/encoder/layers/query/kernel" for a jax tree path (nnx's `.value` dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name != "value":
            parts.append(str(name))
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of the array at `name` with `shape` on `mesh`, by PARAM_RULES."""
    rule = next(spec for pattern, spec in PARAM_RULES if re.search(pattern, name))
    if len(rule) > len(shape):
        return P()
    spec = [None] * (len(shape) - len(rule)) + list(rule)
    for dim, axis in enumerate(spec):
        if axis is not None and shape[dim] % mesh.shape[axis]:
            spec[dim] = None  # e.g. 3 labels over 2 devices: keep this dim whole
    return P(*spec) if any(spec) else P()


class StepShardings(NamedTuple):
    """In/out shardings a step factory jits with: the TrainState's, and a batch's."""

    state: Any  # a TrainState-shaped tree of NamedShardings
    batch: NamedSharding  # a prefix for every array of a batch (or of stacked episodes)
    replicated: NamedSharding

    def gradients(self) -> dict:
        """jax.jit arguments of `(state, batch) -> (grads, scalar metrics)`."""
        return dict(in_shardings=(self.state, self.batch), out_shardings=(self.state.params, self.replicated))

    def update(self) -> dict:
        """jax.jit arguments of `(state, grads, metrics) -> (state, metrics)`."""
        return dict(in_shardings=(self.state, self.state.params, self.replicated),
                    out_shardings=(self.state, self.replicated))

    def predict(self, params: Any) -> dict:
        """jax.jit arguments of `(params, batch) -> per-row predictions`; `params` their shardings."""
        return dict(in_shardings=(params, self.batch), out_shardings=self.batch)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one run's arrays are laid out on its mesh."""

    mesh: Mesh

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def batch_divisor(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def tree(self, tree: Any) -> Any:
        """NamedShardings for every array of `tree` (params, a TrainState), by PARAM_RULES."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, spec_for(path_name(path), np.shape(x), self.mesh)), tree)

    def step_shardings(self, state: Any) -> StepShardings:
        return StepShardings(self.tree(state), self.batch, self.replicated)

    def put(self, tree: Any) -> Any:
        """`tree` moved onto the mesh by PARAM_RULES."""
        return jax.device_put(tree, self.tree(tree))

    def check_batch(self, rows: int, what: str) -> None:
        if rows % self.batch_divisor:
            raise MtlError(f"{what} {rows} does not split evenly over the mesh's {self.batch_divisor} "
                           f"data-parallel devices (mesh.data x mesh.fsdp)")
