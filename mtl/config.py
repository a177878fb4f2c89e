"""Typed configuration files: YAML onto dataclass schemas, validated at load.

Every schema (task specs now, experiment configs with the trainer) is a dataclass. OmegaConf
merges a YAML file and dotted `key=value` overrides onto it, which rejects unknown keys,
wrong types and missing required values. `load_structured` turns OmegaConf's errors into one
`MtlError` line naming the file and the full key, and the override when one set that key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mtl.errors import MtlError
from mtl.models.encoder import REMAT_POLICIES

T = TypeVar("T")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently, so a second `train:` section in a config would
    drop the first without a word. Keys brought in by a `<<` merge may still be overridden.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue  # unhashable: the base class reports it
            if key in first_line:
                problem = f"key {key!r} is given twice (first on line {first_line[key] + 1})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML mapping; syntax errors and repeated keys name the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MtlError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise MtlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise MtlError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MtlError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_structured(
    schema: type[T],
    data: Mapping[str, Any],
    *,
    where: str,
    overrides: Sequence[str] = (),
) -> T:
    """Validate `data` (plus dotted `key=value` overrides) against the dataclass `schema`.

    Raises:
      MtlError: "<where>: key 'a.b': <what is wrong>" for an unknown key, a value of the wrong
        type, or a missing required value; or a malformed override. A key an override set reads
        "<where> with override 'a.b=x': key 'a.b': ...".
    """
    for override in overrides:
        if "=" not in override or not override.split("=", 1)[0]:
            raise MtlError(f"override {override!r}: expected key=value")
    with _named_errors(where):
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(dict(data)))
    for override in overrides:
        with _named_errors(where, applying=override):  # this override, not a later one of the same key
            merged = _apply_override(merged, override, where=where)
    with _named_errors(where, overrides):
        return OmegaConf.to_object(merged)


@contextlib.contextmanager
def _named_errors(where: str, overrides: Sequence[str] = (), applying: str | None = None) -> Iterator[None]:
    """An OmegaConf error inside becomes one MtlError line naming the file, key and override.

    `applying`: the override being applied, named whatever key OmegaConf reports: the error is
    its value's (a mapping inside a list value is reported without the list's key, and a
    section replaced whole with no key at all). Otherwise the last of `overrides` that set the
    key is named, if one did.
    """
    try:
        yield
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        message = str(e).splitlines()[0]
        last = getattr(e, "key", None)  # the offending key itself, not its path
        if isinstance(last, str) and re.fullmatch(r"[A-Za-z_][\w-]*:\S.*", last):
            name, value = last.split(":", 1)
            message += f" (YAML reads {last!r} as one key; write '{name}: {value}', with a space after the colon)"
        else:
            message = _with_known_keys(message, e)
        if applying:  # OmegaConf names no key when a whole section is replaced: the override's is it
            key = key or applying.split("=", 1)[0].strip()
            raise MtlError(f"{where} with override {applying!r}: key {key!r}: {message}") from None
        if not key:
            raise MtlError(f"{where}: {message}") from None
        named = at_key(where, key, overrides)
        raise MtlError(f"{named}: {message}") from None


def _with_known_keys(message: str, error: OmegaConfBaseException) -> str:
    """`message`, for an unknown key in a schema, followed by the schema's keys (OmegaConf's
    message suggests a near miss at most)."""
    schema = getattr(error, "object_type", None)
    unknown = isinstance(error, (ConfigKeyError, ConfigAttributeError)) and " not in " in message
    if not unknown or not dataclasses.is_dataclass(schema):
        return message
    separator = " " if message.endswith("?") else ". "  # after "Did you mean: 'steps'?"
    return f"{message}{separator}Keys: {[field.name for field in dataclasses.fields(schema)]}"


def at_key(where: str, key: str, overrides: Sequence[str] = ()) -> str:
    """"<where>: key '<key>'" for an error message, naming the last override that set the key,
    a section above it or a key inside it, when one did: the file does not show that value."""
    dotted = re.sub(r"\[(\d+)\]", r".\1", key)  # OmegaConf writes tasks[1].weight
    for override in reversed(overrides):
        target = override.split("=", 1)[0].strip()
        if f"{target}.".startswith(f"{dotted}.") or f"{dotted}.".startswith(f"{target}."):
            return f"{where} with override {override!r}: key {key!r}"
    return f"{where}: key {key!r}"


def _apply_override(config: DictConfig, override: str, *, where: str) -> DictConfig:
    """`config` with one dotted `key=text` override, list items included.

    A merge of `from_dotlist` fills a section that is None (`model.random_init.hidden_size=32`
    builds a RandomEncoder with defaults), but builds a dict for `tasks.1` and cannot merge it
    into the list, so a key through a list item goes through OmegaConf.update, which indexes
    lists. Both parse the value the same way.
    """
    key, text = override.split("=", 1)
    node: Any = config
    parts = key.split(".")
    through_list = False
    for depth, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not (part.isdigit() and int(part) < len(node)):
                items = f"items 0 to {len(node) - 1}" if len(node) else "no items"
                list_key = ".".join(parts[:depth])
                raise MtlError(f"{at_key(where, key, [override])}: {list_key!r} is a list; it has {items}")
            node, through_list = node[int(part)], True
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break  # an unknown key or a None section: the merge fills or names it
    try:
        if not through_list:
            return OmegaConf.merge(config, OmegaConf.from_dotlist([override]))
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
    except yaml.YAMLError as e:  # OmegaConf parses the value as YAML and lets its errors through
        raise MtlError(f"{where} with override {override!r}: {_yaml_value_problem(e, text)}") from None
    OmegaConf.update(config, key, value, merge=True)
    return config


def _yaml_value_problem(error: yaml.YAMLError, text: str) -> str:
    """Why an override's value does not parse, and where in the value."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        problem += (" at the end of the value" if mark.index >= len(text)
                    else f" at column {mark.index + 1} of the value")
    if text.lstrip().startswith("[") and "=" in text:
        # A task's `overrides` list: its items hold `=` and often brackets or commas of their own.
        problem += "; quote each item: '[\"labels=[a, b]\"]'"
    return f"the value is not valid YAML: {problem}"


def schema_defaults() -> str:
    """Every key of the experiment schema at its default, as `to_yaml` writes a config (the meta
    section's too; required keys read "???")."""
    return to_yaml(ExperimentConfig(meta=MetaSection()))


def to_yaml(obj: Any) -> str:
    """A dataclass instance as YAML (for writing the resolved config into a workdir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def config_changes(before: str, after: str, *, ignore: Sequence[str] = (), defaults: str | None = None,
                   limit: int = 8) -> list[str]:
    """"key: old -> new" for each dotted key whose value differs between two configs written
    by `to_yaml`, leaving out the sections in `ignore` (at most `limit`, then a count of the rest).

    `defaults` (`schema_defaults()`): a key `before` lacks that `after` holds at its default is
    no change. Such a key is one a later mtl added, whose default keeps the earlier behaviour.
    """

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            return {prefix: node}
        out = {}
        for key, value in items:
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: node}  # an empty dict or list is a value of its own

    old, new = flat(yaml.safe_load(before)), flat(yaml.safe_load(after))
    default = flat(yaml.safe_load(defaults)) if defaults else {}
    missing = object()

    def added_at_default(key: str) -> bool:  # a list item's key is not the schema's: [64] -> [64, 64] is a change
        return key not in old and key in default and new.get(key) == default[key] and \
            not any(part.isdigit() for part in key.split("."))

    changes = [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
               for key in sorted(old.keys() | new.keys())
               if old.get(key, missing) != new.get(key, missing) and key.split(".")[0] not in ignore
               and not added_at_default(key)]
    return changes[:limit] + ([f"and {len(changes) - limit} more"] if len(changes) > limit else [])


# ----------------------------------------------------------------------- experiment schema
# An experiment file (configs/*.yaml) is an ExperimentConfig; every key is documented in the
# README's "Experiment configs" table (tests/test_readme.py checks). Defaults here are the
# defaults of every config.

@dataclasses.dataclass
class RandomEncoder:
    """Architecture of a randomly initialised encoder (smoke tests); vocab from the tokenizer."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    max_position_embeddings: int = 512


@dataclasses.dataclass
class ModelSection:
    """`model`: the encoder (pretrained, or random for smoke tests), its dtypes and layout, and transfer."""

    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"  # name or directory (weights + tokenizer)
    random_init: RandomEncoder | None = None  # set: a random encoder of this shape, not the weights
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False  # true: nnx.scan over stacked layers (compile time flat in depth, slower steps)
    remat_policy: str | None = None
    init_from: str | None = None  # a workdir to transfer from: its encoder and matching heads
    init_checkpoint: str = "best"  # which of init_from's checkpoints: best, latest, or a saved step's number
    reinit_heads: list[str] = dataclasses.field(default_factory=list)  # heads to start fresh


@dataclasses.dataclass
class TaskEntry:
    """One of `tasks`: a shipped task or spec file, its loss weight, spec overrides and slices."""

    task: str = MISSING  # shipped task name or path to a task spec
    weight: float = 1.0  # static loss weight (loss_weighting: static)
    rate: float | None = None  # sampling: rates: this task's share of the steps (normalised over the tasks)
    overrides: list[str] = dataclasses.field(default_factory=list)  # dotted task-spec overrides
    max_train_examples: int | None = None  # use a slice: the first N of the shuffled split
    max_eval_examples: int | None = None  # slice of validation (periodic evals); test stays whole


@dataclasses.dataclass
class OptimSection:
    """`optim`: the optax chain: optimizer, schedule, clipping, accumulation, layer decay, freezing."""

    optimizer: str = "adamw"  # adamw | sgd (e.g. Reptile's outer step)
    learning_rate: float = 5e-5
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1  # optax.MultiSteps: one update every N steps
    layer_decay: float | None = None  # LLRD: layer l of L gets lr * decay**(L - l)
    head_lr_scale: float = 1.0  # heads (and pooler, loss weights) learn at lr * scale: fresh heads start from random
    freeze_encoder: bool = False
    freeze_layers: int = 0  # freeze the embeddings and the lowest N layers


@dataclasses.dataclass
class TrainSection:
    """`train`: steps and batches, task sampling, loss weighting, evaluation, checkpoints, stopping."""

    steps: int = 1000
    batch_size: int = 32
    eval_batch_size: int | None = None  # rows per evaluation batch (no gradients held: can be larger); None: batch_size
    seed: int = 0
    sampling: str = "proportional"  # proportional | temperature | uniform | round_robin | rates (tasks[].rate)
    temperature: float = 2.0  # sampling: temperature, p_t ~ n_t ** (1 / T)
    loss_weighting: str = "static"  # static | uncertainty
    dropout: bool = True
    buckets: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128, 256])
    eval_every: int = 200
    eval_split: str = "validation"
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    best_metric: str = "aggregate"  # "aggregate" (mean of primary metrics) or "task/metric"
    early_stopping_patience: int | None = None  # evaluations without improvement
    nan_policy: str = "stop"  # stop | skip
    tensorboard: bool = True
    profile_steps: int = 0  # trace this many steps with jax.profiler into workdir/profile (0: none)
    profile_start: int = 10  # steps before the trace: the first steps compile


@dataclasses.dataclass
class EpisodeSourceEntry:
    """One of `meta.train` or `meta.test`: a task episodes are drawn from, the classes they may use."""

    task: str = MISSING  # a task as `tasks` lists it: a shipped name, or the same spec path
    classes: list[str] | None = None  # labels (entity types for NER) episodes may draw; None: all
    split: str | None = None  # default: train for meta.train sources, test for meta.test


@dataclasses.dataclass
class MetaSection:
    """Few-shot meta-learning (mtl meta-train); see mtl.train.meta and mtl.data.episodes."""

    algorithm: str = "maml"  # maml | fomaml | anil | meta_sgd | reptile | protonet
    adapt: str = "all"  # what the inner loop adapts: head | top (adapt_layers + head) | all
    adapt_layers: int = 1
    proto_init: bool = False  # Proto-MAML: each episode's head starts at the class prototypes
    ways: int = 5
    shots: int = 5
    queries: int = 5
    meta_batch: int = 4  # episodes per meta-step
    max_length: int = 64  # every episode is padded (and its texts truncated) to this length
    inner_steps: int = 1
    inner_lr: float = 0.01
    test_inner_steps: int | None = None  # adaptation steps at meta-test; None: inner_steps
    remat: bool = False  # rematerialise the inner loop (bounds second-order memory)
    pooling: str = "mean"  # how a text becomes one vector: pooler | cls | mean
    train: list[EpisodeSourceEntry] = MISSING  # meta-train episode sources
    test: list[EpisodeSourceEntry] = MISSING  # meta-test sources: held-out classes or tasks
    eval: list[EpisodeSourceEntry] | None = None  # periodic-evaluation sources (split default: eval_split)
    eval_split: str = "validation"  # with eval unset: the meta.test classes on this split
    eval_episodes: int = 40  # episodes per periodic evaluation
    test_episodes: int = 200  # episodes of `mtl meta-test`
    baseline_from: str | None = None  # a multi-task workdir: the meta-test baseline (b)


@dataclasses.dataclass
class MeshSection:
    """Device mesh axis sizes (see mtl.sharding); -1 on one axis: all the devices left."""

    data: int = -1  # batch rows (meta-batch episodes) split, params replicated
    fsdp: int = 1  # batch rows split, and params + optimizer state split
    tensor: int = 1  # attention heads and MLP units split


@dataclasses.dataclass
class DistributedSection:
    """Several processes (hosts) in one run, through jax.distributed (see mtl.sharding).

    A key left null falls back to its environment variable; with none of the three set (and no
    cluster_detection), the run is one process. Every process runs the same command.
    """

    coordinator_address: str | None = None  # host:port of process 0 ($JAX_COORDINATOR_ADDRESS)
    num_processes: int | None = None  # ($JAX_NUM_PROCESSES)
    process_id: int | None = None  # this process, 0..num_processes-1 ($JAX_PROCESS_ID)
    local_device_ids: list[int] | None = None  # accelerators this process drives ($JAX_LOCAL_DEVICE_IDS)
    cluster_detection: bool = False  # let JAX read the unset keys from SLURM, Open MPI, TPU or Kubernetes
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds of silence after which a process counts as dead (the rest stop)


@dataclasses.dataclass
class ExperimentConfig:
    """A whole experiment file; `load_experiment` reads, overrides and validates one."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tasks: list[TaskEntry] = MISSING
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    meta: MetaSection | None = None  # set: a meta-learning experiment (mtl meta-train)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)


META_ALGORITHMS = ("maml", "fomaml", "anil", "meta_sgd", "reptile", "protonet")
META_ADAPT = ("head", "top", "all")

# Keys whose value must be one of a few names; keys in an absent section (meta) are skipped.
_CHOICES = {
    # Checked here, not only by EncoderConfig, so that the error names the file and key before
    # any weights load. float64 needs jax_enable_x64, which no CLI run sets.
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat_policy": REMAT_POLICIES,
    "optim.optimizer": ("adamw", "sgd"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "train.sampling": ("proportional", "temperature", "uniform", "round_robin", "rates"),
    "train.loss_weighting": ("static", "uncertainty"),
    "train.nan_policy": ("stop", "skip"),
    "train.eval_split": ("validation", "test"),
    "meta.algorithm": META_ALGORITHMS,
    "meta.adapt": META_ADAPT,
    "meta.pooling": ("pooler", "cls", "mean"),
}

CHECKPOINT_CHOICES = ("best", "latest")  # or a saved checkpoint's step number


def checkpoint_choice(value: str | int, where: str = "checkpoint") -> str | int:
    """The checkpoint a user chose (`--checkpoint`, model.init_checkpoint): "best", "latest", or
    a step number as an int. Anything else is an MtlError naming `where`."""
    text = str(value).strip()
    if text in CHECKPOINT_CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise MtlError(f"{where}: {value!r} is not best, latest or a saved checkpoint's step number")


# The shortest sequence a task (or meta-learning's episodes) may be cut to: room for the special
# tokens and a few words.
MIN_MAX_LENGTH = 8

_POSITIVE = ("positive", lambda v: v > 0)
_NON_NEGATIVE = ("non-negative", lambda v: v >= 0)
_FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
# Numeric keys and the range their value must lie in; `[]` walks every item of a list. A key
# left null (an optional key, or an absent section) is not checked: its fallback applies.
_RANGES = {
    "model.random_init.hidden_size": _POSITIVE,
    "model.random_init.num_layers": _POSITIVE,
    "model.random_init.num_heads": _POSITIVE,
    "model.random_init.intermediate_size": _POSITIVE,
    "model.random_init.max_position_embeddings": _POSITIVE,
    "tasks[].weight": _NON_NEGATIVE,
    "tasks[].rate": _POSITIVE,
    "tasks[].max_train_examples": _POSITIVE,
    "tasks[].max_eval_examples": _POSITIVE,
    "optim.learning_rate": _POSITIVE,
    "optim.warmup_ratio": _FRACTION,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.b1": _FRACTION,
    "optim.b2": _FRACTION,
    "optim.eps": _POSITIVE,  # 0 divides 0 by 0 wherever a gradient is exactly zero
    "optim.clip_norm": _POSITIVE,
    "optim.grad_accum": _POSITIVE,
    "optim.layer_decay": ("in (0, 1]", lambda v: 0 < v <= 1),
    "optim.head_lr_scale": _POSITIVE,
    "optim.freeze_layers": _NON_NEGATIVE,  # the upper bound (the encoder's depth) is checked with the model
    "train.steps": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.eval_batch_size": _POSITIVE,
    "train.temperature": _POSITIVE,
    "train.buckets[]": _POSITIVE,
    "train.eval_every": _POSITIVE,
    "train.log_every": _POSITIVE,
    "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.early_stopping_patience": _POSITIVE,
    "train.profile_steps": _NON_NEGATIVE,
    "train.profile_start": _NON_NEGATIVE,
    "meta.adapt_layers": _POSITIVE,
    "meta.ways": _POSITIVE,
    "meta.shots": _POSITIVE,
    "meta.queries": _POSITIVE,
    "meta.meta_batch": _POSITIVE,
    "meta.max_length": (f"at least {MIN_MAX_LENGTH}", lambda v: v >= MIN_MAX_LENGTH),
    "meta.inner_lr": _POSITIVE,
    "meta.test_inner_steps": _POSITIVE,
    "meta.eval_episodes": _POSITIVE,
    "meta.test_episodes": _POSITIVE,
    "distributed.initialization_timeout": _POSITIVE,
    "distributed.heartbeat_timeout": _POSITIVE,
}


def _values(config: Any, key: str) -> list[tuple[str, Any]]:
    """(full key, value) of each non-null value the dotted `key` reaches in `config`."""
    found = [("", config)]
    for part in key.split("."):
        name, each = part.removesuffix("[]"), part.endswith("[]")
        reached = []
        for prefix, node in found:
            value, full_key = getattr(node, name), f"{prefix}.{name}" if prefix else name
            if value is None:
                continue
            reached += [(f"{full_key}[{i}]", item) for i, item in enumerate(value)] if each else [(full_key, value)]
        found = reached
    return found


def load_experiment(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                    data: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load an experiment config file (or a dict) with dotted overrides, and validate it."""
    where = str(path) if path is not None else "config"
    config = load_structured(ExperimentConfig, read_yaml(path) if path is not None else dict(data or {}),
                             where=where, overrides=overrides)
    for key, names in _CHOICES.items():
        for full_key, value in _values(config, key):
            if value not in names:
                raise MtlError(f"{at_key(where, full_key, overrides)}: {value!r} is not one of {list(names)}")
    for key, (expected, holds) in _RANGES.items():
        for full_key, value in _values(config, key):
            if not holds(value):
                raise MtlError(f"{at_key(where, full_key, overrides)}: must be {expected}, got {value}")
    chosen = at_key(where, "model.init_checkpoint", overrides)
    checkpoint_choice(config.model.init_checkpoint, chosen)
    if config.model.init_checkpoint != "best" and config.model.init_from is None:
        raise MtlError(f"{chosen}: set, but model.init_from is not: it chooses a checkpoint of that workdir")
    if not config.tasks:
        raise MtlError(f"{at_key(where, 'tasks', overrides)}: list at least one task")
    train = config.train
    for i, entry in enumerate(config.tasks):  # a rate the sampling ignores would mislead whoever reads the config
        if (entry.rate is None) == (train.sampling == "rates"):
            key = f"tasks.{i}.rate"
            raise MtlError(f"{at_key(where, key, overrides)}: " + (
                "train.sampling is 'rates': give every task its rate" if entry.rate is None else
                f"set, but train.sampling is {train.sampling!r}: rates are read only with sampling: rates"))
    if train.profile_steps and train.profile_start >= train.steps:
        raise MtlError(f"{at_key(where, 'train.profile_start', overrides)}: {train.profile_start} steps before the "
                       f"profile leave none of train.steps ({train.steps}) to trace")
    if config.meta is not None:
        _check_meta_sources(config, where, overrides)
    return _absolute_task_paths(config)


def _absolute_task_paths(config: ExperimentConfig) -> ExperimentConfig:
    """`config` with its task spec files (and the episode sources naming them) as absolute paths.

    A relative path is relative to where mtl runs. The config a workdir keeps must find its
    tasks from anywhere: mtl evaluate, predict and meta-test may run in another directory.
    """
    absolute = {e.task: str(Path(e.task).resolve()) for e in config.tasks if Path(e.task).is_file()}
    for entry in config.tasks:
        entry.task = absolute.get(entry.task, entry.task)
    for sources in (config.meta.train, config.meta.test, config.meta.eval or []) if config.meta else ():
        for source in sources:
            source.task = absolute.get(source.task, source.task)
    return config


def _check_meta_sources(config: ExperimentConfig, where: str, overrides: Sequence[str]) -> None:
    """Every episode source names one of the config's tasks."""
    meta = config.meta
    tasks = [entry.task for entry in config.tasks]
    for part in ("train", "test", "eval"):
        sources = getattr(meta, part)
        if part == "eval" and sources is None:
            continue
        if not sources:
            raise MtlError(f"{at_key(where, f'meta.{part}', overrides)}: list at least one episode source")
        for i, source in enumerate(sources):
            if source.task not in tasks:
                raise MtlError(f"{at_key(where, f'meta.{part}[{i}].task', overrides)}: {source.task!r} is not "
                               f"one of the config's tasks {tasks}")
