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

Several processes (hosts) join one run through `initialize_distributed` (config section
`distributed`, or the environment). The mesh then spans every process's devices, each process
builds only the batch rows its own devices hold (`Layout.process_rows`) and hands them over as
its part of a global array (`Layout.put_batch`); everything else is the same program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtl.config import DistributedSection, MeshSection
from mtl.errors import MtlError

log = logging.getLogger(__name__)

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


# (config key, environment variable) for the settings of jax.distributed.initialize. JAX itself
# reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS; the process count and id have no
# variable of JAX's own outside the clusters it detects, so mtl reads these two names.
_DISTRIBUTED_ENV = (
    ("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
    ("num_processes", "JAX_NUM_PROCESSES"),
    ("process_id", "JAX_PROCESS_ID"),
    ("local_device_ids", "JAX_LOCAL_DEVICE_IDS"),
)


def _distributed_settings(config: DistributedSection) -> dict[str, Any]:
    """The config's jax.distributed settings, each unset one taken from its environment variable."""
    settings = {}
    for key, variable in _DISTRIBUTED_ENV:
        value = getattr(config, key)
        if value is None and os.environ.get(variable, "").strip():
            text = os.environ[variable].strip()
            try:
                value = (text if key == "coordinator_address" else
                         [int(v) for v in text.split(",")] if key == "local_device_ids" else int(text))
            except ValueError:
                expected = "integers separated by commas" if key == "local_device_ids" else "an integer"
                raise MtlError(f"${variable}={text!r} (distributed.{key}): expected {expected}") from None
        settings[key] = value
    return settings


def initialize_distributed(config: DistributedSection | None = None) -> bool:
    """Join a multi-process run through jax.distributed when the config or environment asks.

    Call it before anything else touches JAX's devices. Returns whether this process is part of
    a multi-process run (also when it already was). With nothing set, the run is one process and
    nothing happens. Every process must run the same config; process 0 hosts the coordinator.
    """
    if jax.distributed.is_initialized():
        return True
    config = config or DistributedSection()
    settings = _distributed_settings(config)
    required = ("coordinator_address", "num_processes", "process_id")
    if not config.cluster_detection:
        given = [k for k in required if settings[k] is not None]
        if not given:
            return False
        missing = [k for k in required if settings[k] is None]
        if missing:
            names = ", ".join(f"distributed.{k} (${dict(_DISTRIBUTED_ENV)[k]})" for k in missing)
            raise MtlError(f"a multi-process run needs {names} too; {', '.join(given)} is set")
    count, index = settings["num_processes"], settings["process_id"]
    if count is not None and count <= 0:
        raise MtlError(f"key 'distributed.num_processes': must be positive, got {count}")
    if count is not None and index is not None and not 0 <= index < count:
        raise MtlError(f"key 'distributed.process_id': {index} is not in 0..{count - 1} (num_processes {count})")
    if settings["coordinator_address"] is not None:
        _check_coordinator(settings["coordinator_address"], index, config.initialization_timeout)
    try:
        jax.distributed.initialize(
            **settings, cluster_detection_method=None if config.cluster_detection else "deactivate",
            initialization_timeout=config.initialization_timeout,
            heartbeat_timeout_seconds=config.heartbeat_timeout,
        )
    except (RuntimeError, ValueError, TypeError) as e:  # XlaRuntimeError is a RuntimeError
        where = settings["coordinator_address"] or "the detected cluster"
        raise MtlError(f"distributed: process {index} of {count} could not join the run at {where}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    log.info("process %d of %d joined the run at %s; %d local of %d devices", jax.process_index(),
             jax.process_count(), settings["coordinator_address"], jax.local_device_count(), jax.device_count())
    return True


def _check_coordinator(address: str, process_id: int | None, timeout: float) -> None:
    """Fail with one clear error where XLA would abort the process with a fatal log instead:
    process 0 cannot bind the coordinator's port, or another process cannot reach it in time."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise MtlError(f"key 'distributed.coordinator_address': {address!r} is not host:port")
    if process_id == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", int(port)))
            except OSError as e:
                raise MtlError(f"distributed: process 0 hosts the coordinator, but port {port} is not free on "
                               f"this host ({e.strerror}); choose another distributed.coordinator_address") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise MtlError(
                    f"distributed: process {process_id} could not reach the coordinator (process 0) at {address} "
                    f"within distributed.initialization_timeout={timeout:g} s ({e.strerror})"
                ) from None
            time.sleep(0.5)


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, config): process 0."""
    return jax.process_index() == 0


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Process 0 runs the block before the others do: it fills the shared caches (assets,
    tokenized datasets) once, and the others then read them. One process: just the block."""
    if jax.process_count() == 1:
        yield
        return
    if not is_primary():
        multihost_utils.sync_global_devices(f"mtl: {name}")
    yield
    if is_primary():
        multihost_utils.sync_global_devices(f"mtl: {name}")


def make_mesh(config: MeshSection | None = None, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    config = config or MeshSection()
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    for name, size in zip(AXES, sizes, strict=True):
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
        raise MtlError(f"key 'mesh': axes {dict(zip(AXES, sizes, strict=True))} need {math.prod(sizes)} devices, "
                       f"there are {len(devices)}")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def fit_mesh(config: MeshSection) -> MeshSection:
    """A finished run's mesh, where it fits the devices here; otherwise data parallel over all of
    them. Evaluating or meta-testing a workdir elsewhere than it trained (say 8 GPUs, then one
    CPU) needs no other layout: checkpoints restore onto any mesh."""
    try:
        make_mesh(config)
    except MtlError as e:
        log.warning("%s: using all %d devices here, data parallel", e, jax.device_count())
        return MeshSection()
    return config


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
        """Whole on every device: scalars, RNG keys, the step."""
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        """Rows split over the data-parallel axes (BATCH_AXES), everything else whole."""
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def batch_divisor(self) -> int:
        """The number of data-parallel shards: every batch's rows must be a multiple of it."""
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def tree(self, tree: Any) -> Any:
        """NamedShardings for every array of `tree` (params, a TrainState), by PARAM_RULES."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, spec_for(path_name(path), np.shape(x), self.mesh)), tree)

    def step_shardings(self, state: Any) -> StepShardings:
        """The shardings a jitted step takes and returns: the state's by PARAM_RULES, the batch's."""
        return StepShardings(self.tree(state), self.batch, self.replicated)

    def put(self, tree: Any) -> Any:
        """`tree` moved onto the mesh by PARAM_RULES."""
        return jax.device_put(tree, self.tree(tree))

    def process_rows(self, rows: int) -> slice:
        """The rows of a `rows`-row batch that this process's devices hold under the batch
        sharding: the part this process builds. With one process, all of them."""
        spans = {index[0].indices(rows)[:2] for index in self.batch.addressable_devices_indices_map((rows,)).values()}
        start, stop = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != stop - start:  # the mesh orders devices process-major
            raise MtlError(f"process {jax.process_index()} holds batch rows {sorted(spans)}, not one block")
        return slice(start, stop)

    def put_batch(self, local: Mapping[str, Any], rows: int) -> Any:
        """Global arrays of a `rows`-row batch (any nesting of arrays with rows first), split
        over the data axes, from this process's part of it (`process_rows(rows)` rows)."""
        def global_array(x: np.ndarray) -> jax.Array:
            return jax.make_array_from_process_local_data(self.batch, np.asarray(x), (rows, *np.shape(x)[1:]))

        return jax.tree.map(global_array, local)

    def put_whole_batch(self, batch: Mapping[str, Any]) -> Any:
        """`put_batch` for a batch every process built whole (evaluation): each passes its part."""
        rows = len(jax.tree.leaves(batch)[0])
        part = self.process_rows(rows)
        return self.put_batch(jax.tree.map(lambda x: x[part], batch), rows)

    @staticmethod
    def gather(tree: Any) -> Any:
        """Host numpy copies of (global) arrays, whole on every process."""
        return multihost_utils.process_allgather(tree, tiled=True)

    def check_batch(self, rows: int, what: str) -> None:
        """An MtlError naming `what` (a config key) unless `rows` splits over the data shards."""
        if rows % self.batch_divisor:
            raise MtlError(f"{what} {rows} does not split evenly over the mesh's {self.batch_divisor} "
                           f"data-parallel devices (mesh.data x mesh.fsdp)")
