"""Few-shot episodes: N-way K-shot classification, and N-way K-shot NER, as fixed-shape batches.

An episode picks N classes of one source (a task's split, optionally restricted to some of its
classes), K support and Q query examples per class, and relabels them 0..N-1 in the order the
classes were drawn, so a model cannot memorise which class is which across episodes.

For token (NER) tasks a "class" is an entity type. An N-way K-shot NER episode draws N types
and, for each, K + Q sentences that contain it (each sentence used once per episode). Inside
the episode the tags are IOB2 over the N drawn types, "O" then B-/I- per type in draw order
(2N + 1 tags); every other entity is tagged O, as in the standard few-shot NER setups.

`EpisodeSampler.episode(i)` is a pure function of (seed, i), like `TrainStream.batch`, so a
resumed run draws the same episodes without replaying anything. Every support set has N*K rows
and every query set N*Q, all padded to one length, so a meta-step compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mtl.data.batching import Batcher
from mtl.data.pipeline import TaskData, column
from mtl.errors import MtlError
from mtl.models.heads import IGNORE


@dataclasses.dataclass(frozen=True)
class EpisodeSource:
    """Where episodes come from: a task's split and the classes (or entity types) allowed."""

    task: TaskData
    split: str
    classes: tuple[str, ...]  # label names (class tasks) or entity types (token tasks)
    rows: dict[str, np.ndarray]  # class -> split rows that can stand for it

    @property
    def name(self) -> str:
        """"task/split", as errors and a checkpoint's meta name the source."""
        return f"{self.task.spec.name}/{self.split}"


def entity_type(tag: str) -> str | None:
    """'B-person' -> 'person'; 'O' -> None."""
    return tag[2:] if tag[:2] in ("B-", "I-") else None


def task_classes(task: TaskData) -> list[str]:
    """The classes an episode can draw from a task: its labels, or its entity types."""
    if task.label_kind == "class":
        return list(task.labels)
    if task.label_kind == "tags":
        return list(dict.fromkeys(t for t in map(entity_type, task.labels) if t is not None))
    raise MtlError(f"task {task.spec.name!r}: head {task.spec.head!r} (labels of kind {task.label_kind!r}) cannot "
                   "be meta-learned; episodes need a classification or token-classification task")


def make_source(task: TaskData, split: str, classes: Sequence[str] | None) -> EpisodeSource:
    """An EpisodeSource over `classes` of the task's split (all of them when None)."""
    known = task_classes(task)
    name = task.spec.name
    if split not in task.splits:
        raise MtlError(f"task {name!r} has no split {split!r}; it has {sorted(task.splits)}")
    chosen = list(known) if classes is None else list(classes)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        what = "entity types" if task.label_kind == "tags" else "labels"
        raise MtlError(f"task {name!r}: classes {unknown} are not among its {what} {known}")
    ds = task.splits[split]
    if task.label_kind == "class":
        labels = np.asarray(column(ds, "labels"))
        rows = {c: np.flatnonzero(labels == task.labels.index(c)) for c in chosen}
    else:
        types = np.array([entity_type(t) or "" for t in task.labels])
        rows = {c: [] for c in chosen}
        for row, tags in enumerate(column(ds, "tags")):
            for t in set(types[np.asarray(tags, np.int64)]) & set(chosen):
                rows[t].append(row)
        rows = {c: np.asarray(r, np.int64) for c, r in rows.items()}
    return EpisodeSource(task, split, tuple(chosen), rows)


class EpisodeSampler:
    """Seeded, resumable N-way K-shot episodes with Q queries per class; see the module docstring.

    Each episode draws its source uniformly from `sources` (all of one label kind), then N of
    that source's classes. An episode is a dict:
      support, query: batches as mtl.data.batching describes (N*K and N*Q rows, length
        `max_length`), labels relabelled to the episode's classes;
      classes: the N class names in episode order; source: the source's name.
    """

    def __init__(self, sources: Sequence[EpisodeSource], *, ways: int, shots: int, queries: int,
                 max_length: int, pad_token_id: int, seed: int):
        if not sources:
            raise MtlError("episodes need at least one source")
        kinds = {s.task.label_kind for s in sources}
        if len(kinds) > 1:
            raise MtlError(f"episode sources mix label kinds {sorted(kinds)}: {[s.name for s in sources]}; "
                           "use classification tasks or token tasks, not both")
        if min(ways, shots, queries) <= 0:
            raise MtlError(f"ways, shots and queries must be positive, got {ways}, {shots}, {queries}")
        self.kind = kinds.pop()
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        for source in sources:
            if ways > len(source.classes):
                raise MtlError(f"{source.name}: {ways}-way episodes need {ways} classes, it has "
                               f"{len(source.classes)} {list(source.classes)}")
            for name, rows in source.rows.items():
                if len(rows) < shots + queries:
                    what = "sentences with entity type" if self.kind == "tags" else "examples of class"
                    raise MtlError(f"{source.name}: {len(rows)} {what} {name!r}, fewer than shots + queries = "
                                   f"{shots} + {queries}")
        self.sources = list(sources)
        self._batchers = [
            {part: Batcher(s.task.splits[s.split], batch_size=ways * n, max_length=max_length,
                           pad_token_id=pad_token_id, buckets=[max_length])
             for part, n in (("support", shots), ("query", queries))}
            for s in self.sources
        ]
        if self.kind == "tags":
            # Global tag id -> episode tag id, per (source, class order), built in `_relabel_tags`.
            self._types = [np.array([entity_type(t) or "" for t in s.task.labels]) for s in self.sources]
            self._begin = [np.array([t.startswith("B-") for t in s.task.labels]) for s in self.sources]

    @property
    def episode_labels(self) -> list[str]:
        """Label names inside an episode: ways "0".."N-1", or IOB2 tags over them for NER."""
        if self.kind == "class":
            return [str(i) for i in range(self.ways)]
        return ["O"] + [f"{p}-{i}" for i in range(self.ways) for p in ("B", "I")]

    def episode(self, index: int) -> dict:
        """Episode `index` ({"support": batch, "query": batch}): a pure function of (seed, index),
        so resuming at a step draws the episodes an uninterrupted run would have."""
        rng = np.random.default_rng([self.seed, index, 0xE715])
        s = int(rng.integers(len(self.sources)))
        source = self.sources[s]
        classes = [source.classes[i] for i in rng.choice(len(source.classes), self.ways, replace=False)]
        support, query, used = [], [], set()
        for c in classes:
            # NER sentences can hold several drawn types; each is used once per episode.
            candidates = np.array([r for r in source.rows[c] if r not in used]) if used else source.rows[c]
            if len(candidates) < self.shots + self.queries:
                raise MtlError(f"{source.name}: episode {index} has only {len(candidates)} unused sentences "
                               f"with entity type {c!r} left, fewer than shots + queries")
            picked = rng.choice(candidates, self.shots + self.queries, replace=False)
            used.update(picked.tolist())
            support.append(picked[: self.shots])
            query.append(picked[self.shots:])
        batchers = self._batchers[s]
        out = {"classes": classes, "source": source.name}
        for part, rows in (("support", support), ("query", query)):
            batch = batchers[part].batch(np.concatenate(rows))
            if self.kind == "class":
                batch["labels"] = np.repeat(np.arange(self.ways, dtype=np.int32), len(rows[0]))
            else:
                batch["labels"] = self._relabel_tags(s, classes, batch["labels"])
            out[part] = batch
        return out

    def _relabel_tags(self, s: int, classes: list[str], labels: np.ndarray) -> np.ndarray:
        types, begin = self._types[s], self._begin[s]
        table = np.zeros(len(types), np.int32)  # every type not drawn becomes O (0)
        for i, c in enumerate(classes):
            table[(types == c) & begin] = 1 + 2 * i
            table[(types == c) & ~begin] = 2 + 2 * i
        return np.where(labels == IGNORE, IGNORE, table[np.where(labels == IGNORE, 0, labels)]).astype(np.int32)

    def meta_batch(self, step: int, size: int, part: slice = slice(None)) -> dict:
        """Episodes step*size .. step*size + size - 1, stacked on a leading task axis; `part`:
        only those positions of the meta-batch (in a multi-process run, this process's tasks)."""
        episodes = [self.episode(step * size + i) for i in range(size)[part]]
        return {half: {k: np.stack([e[half][k] for e in episodes]) for k in episodes[0][half]}
                for half in ("support", "query")}


def check_disjoint(train: Sequence[EpisodeSource], test: Sequence[EpisodeSource]) -> None:
    """Meta-test classes of a task must not appear in its meta-train episodes."""
    for a in train:
        for b in test:
            if a.task.spec.name == b.task.spec.name:
                shared = sorted(set(a.classes) & set(b.classes))
                if shared:
                    raise MtlError(f"task {a.task.spec.name!r}: classes {shared} are in both meta-train and "
                                   "meta-test episodes; list disjoint classes for each")
