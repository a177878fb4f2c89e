"""Use a trained workdir: predict on raw texts, or export it for transformers.

`Predictor.from_workdir(dir)` rebuilds the model from the workdir's config.yaml and its best
checkpoint. Each task's labels, head, head options and max length come from the checkpoint's
metadata, so predicting reads neither the training data nor the task specs: a workdir copied
to another machine predicts there.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import save_file

from mtl.assets import resolve_model
from mtl.checkpoint import load_trained
from mtl.config import load_experiment
from mtl.data.batching import bucket_lengths
from mtl.data.pipeline import first_subtoken_words, padded_choices
from mtl.errors import MtlError
from mtl.metrics import entity_spans
from mtl.models.heads import build_head, decode_real_rows, get_head, head_option_defaults
from mtl.models.model import MultiTaskModel
from mtl.params import flatten
from mtl.tasks import TaskHead, load_tasks
from mtl.tokenizer import load_tokenizer
from mtl.train.experiment import assign_params, build_encoder
from mtl.train.multitask import make_predict_steps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Predictor:
    """Predicts a trained model's tasks on raw texts.

    Texts go through in batches of `batch_size` rows, shortest first (a batch pads to its
    longest text, rounded up to a length bucket), through one jitted function per task. So a
    batch shape (rows, bucket) compiles once, and memory stays one batch's whatever the number
    of texts. The jitted functions read the model's parameters as they are when the Predictor
    is made.
    """

    model: MultiTaskModel
    tokenizer: Any
    tasks: dict[str, TaskHead]  # each task's head, options and max_length, as trained
    labels: dict[str, list[str]]
    step: int
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise MtlError(f"batch_size must be positive, got {self.batch_size}")
        graphdef, self._params, rest = nnx.split(self.model, nnx.Param, ...)
        self._steps = make_predict_steps(graphdef, rest, list(self.tasks))
        self._said_cut: set[str] = set()  # tasks whose truncated texts were reported

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, which: str | int = "best", batch_size: int = 64) -> Predictor:
        """The model of a workdir's best or latest checkpoint, or step `which`'s, rebuilt from its
        config.yaml with every task's head and labels; the optimizer state is not read."""
        workdir = Path(workdir)
        if not (workdir / "config.yaml").is_file():
            raise MtlError(f"{workdir}: not a training workdir (no config.yaml); run mtl train first")
        config = load_experiment(workdir / "config.yaml")
        if config.meta is not None:
            raise MtlError(f"{workdir}: is a meta-learning workdir, whose head is learned for episodes, not for a "
                           "task: adapt it with mtl meta-test, or start a task from its encoder with model.init_from")
        saved, meta, step = load_trained(workdir, which)
        directory = resolve_model(config.model.encoder)
        tokenizer = load_tokenizer(directory)
        encoder = build_encoder(config, directory, len(tokenizer))
        if "heads" in meta:  # the checkpoint says what each head is: no spec file needed
            tasks = {name: TaskHead(**record) for name, record in meta["heads"].items()}
        else:  # a checkpoint from before mtl saved its heads
            specs = load_tasks([t.task for t in config.tasks], [t.overrides for t in config.tasks])
            tasks = {spec.name: TaskHead.of(spec) for spec in specs}
        rngs = nnx.Rngs(0)
        heads = {name: build_head(task.head, encoder.config.hidden_size, meta["labels"][name], task.head_options,
                                  rngs=rngs)
                 for name, task in tasks.items()}
        model = MultiTaskModel(encoder, heads)
        where = f"{workdir}: checkpoint {step} does not fit config.yaml (edited since?)"
        assign_params(model, flatten(saved["model"]), where=where)
        return cls(model, tokenizer, tasks, meta["labels"], step, batch_size)

    def _label_kind(self, task: str) -> str:
        if task not in self.tasks:
            raise MtlError(f"task {task!r} is not in this workdir; tasks: {sorted(self.tasks)}")
        return get_head(self.tasks[task].head).label_kind

    def takes_tokens(self, task: str) -> bool:
        """Whether `task` tags words, and so may be given texts as lists of words."""
        return self._label_kind(task) == "tags"

    def takes_pairs(self, task: str) -> bool:
        """Whether `task` reads pairs of texts (its spec's `columns.text_pair`)."""
        self._label_kind(task)  # an unknown task is an error
        return self.tasks[task].text_pair

    def num_choices(self, task: str) -> int:
        """How many choices `task` picks one of: K for a multiple-choice head, else 0."""
        return len(self.labels[task]) if self._label_kind(task) == "choice" else 0

    def predict(self, task: str, texts: Sequence[str | Sequence[str]]) -> list[dict[str, Any]]:
        """One result dict per text, in order: label (+probabilities, score), tags and entity spans, ...

        A token task also takes a text as its list of words (tokenized as its training data was,
        e.g. with punctuation apart); a string is split at whitespace. A task on pairs of texts
        takes each input as a (text, text_pair) pair, a multiple-choice task as (text, [choice, ...])
        with 1 to K choices, K its number of labels.
        """
        kind = self._label_kind(task)
        texts = list(texts)
        if not texts:
            return []
        trained, head = self.tasks[task], self.model.head(task)
        pairs = choices = None
        if kind == "choice":
            k = len(self.labels[task])
            if not all(isinstance(t, Sequence) and not isinstance(t, str) and len(t) == 2 and isinstance(t[0], str)
                       and isinstance(t[1], Sequence) and not isinstance(t[1], str) and 0 < len(t[1]) <= k
                       and all(isinstance(c, str) for c in t[1]) for t in texts):
                raise MtlError(f"task {task!r} picks one of up to {k} choices: give each input as (text, [1 to {k} "
                               "choice texts])")
            texts, choices = [t[0] for t in texts], [list(t[1]) for t in texts]
        elif trained.text_pair:
            if not all(isinstance(t, Sequence) and not isinstance(t, str) and len(t) == 2
                       and all(isinstance(x, str) for x in t) for t in texts):
                raise MtlError(f"task {task!r} reads pairs of texts: give each input as (text, text_pair)")
            texts, pairs = [t[0] for t in texts], [t[1] for t in texts]
        elif kind != "tags" and not all(isinstance(t, str) for t in texts):
            raise MtlError(f"task {task!r} reads whole texts: give strings, not lists of words")
        words = [t.split() if isinstance(t, str) else list(t) for t in texts] if kind == "tags" else None
        texts = [t if isinstance(t, str) else " ".join(t) for t in texts]
        if words is not None:
            enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=trained.max_length)
        elif choices is not None:  # each choice is a pair with the text, as in training
            enc = self.tokenizer([t for t, cs in zip(texts, choices, strict=True) for _ in cs],
                                 [c for cs in choices for c in cs], truncation=True, max_length=trained.max_length)
        else:  # a pair is cut as its training data was (longest text first)
            enc = self.tokenizer(texts, pairs, truncation=True, max_length=trained.max_length)
        owner = np.repeat(np.arange(len(texts)), [len(cs) for cs in choices] if choices else 1)  # input of a row
        cut = len({owner[i] for i, e in enumerate(enc.encodings) if e.overflowing})
        sequences = 1
        if choices is not None:  # K rows an input: its choices, then empty ones (no choice), as in training
            sequences, counts = len(self.labels[task]), [len(cs) for cs in choices]
            enc = {key: [row for rows in padded_choices(enc[key], counts, sequences) for row in rows]
                   for key in ("input_ids", "attention_mask", "token_type_ids") if key in enc}
        if cut and task not in self._said_cut:  # once per task: a stream of chunks would repeat it
            self._said_cut.add(task)
            if choices is not None:
                log.warning("%d of %d inputs have a choice that, with the text, is longer than task %r's max_length "
                            "of %d tokens; each such pair is cut to %d, the longer text first (said once per task)",
                            cut, len(texts), task, trained.max_length, trained.max_length)
            elif pairs is not None:
                log.warning("%d of %d pairs are longer than task %r's max_length of %d tokens; each is cut to %d, "
                            "the longer text first (said once per task)", cut, len(texts), task, trained.max_length,
                            trained.max_length)
            else:
                log.warning("%d of %d texts are longer than task %r's max_length of %d tokens; only their first %d "
                            "are read%s (said once per task)", cut, len(texts), task, trained.max_length,
                            trained.max_length, ", later words tagged O" if kind == "tags" else "")
        rows = self.batch_size if len(texts) >= self.batch_size else 1 << (len(texts) - 1).bit_length()
        lengths = np.asarray([len(ids) for ids in enc["input_ids"]]).reshape(len(texts), sequences).max(axis=1)
        order = np.argsort(lengths, kind="stable")
        results: list[dict[str, Any]] = [{}] * len(texts)
        for start in range(0, len(texts), rows):
            chosen = order[start:start + rows]
            batch = self._batch(trained.max_length, enc, chosen, rows, words, sequences if choices else None)
            predictions = self.predict_batch(task, batch)
            probs = predictions.get("probs")
            for row, (i, item) in enumerate(zip(chosen, decode_real_rows(task, head, predictions, batch), strict=True)):
                second = pairs[i] if pairs is not None else choices[i] if choices is not None else None
                results[i] = self._result(task, kind, texts[i], second, words[i] if words else None, item,
                                          probs[row] if probs is not None else None)
        return results

    def predict_batch(self, task: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`task`'s head's predictions ({name: [B, ...]}, on the host) for one padded batch, as
        `mtl.data.batching.Batcher` builds them."""
        return jax.device_get(self._steps[task](self._params, batch))

    def _batch(self, max_length: int, enc, chosen: np.ndarray, rows: int, words: list[list[str]] | None,
               choices: int | None = None) -> dict[str, np.ndarray]:
        """Inputs `chosen` of the tokenized texts as one padded batch of `rows` rows (the rest weight
        0); with `choices` K, input i is sequences i*K..i*K+K-1 and the batch [rows, K, length]."""
        k = choices or 1
        longest = max(len(enc["input_ids"][i * k + j]) for i in chosen for j in range(k))
        length = min(b for b in bucket_lengths(max_length) if b >= longest)
        shape = (rows, k, length) if choices else (rows, length)
        out = {key: np.zeros(shape, np.int32) for key in ("input_ids", "attention_mask", "token_type_ids")}
        out["input_ids"][:] = self.tokenizer.pad_token_id
        out["weights"] = (np.arange(rows) < len(chosen)).astype(np.float32)
        out["word_index"] = np.full((rows, length), -1, np.int32)
        out["num_words"] = np.zeros((rows,), np.int32)
        flat = {key: out[key].reshape(rows * k, length) for key in ("input_ids", "attention_mask", "token_type_ids")}
        for row, i in enumerate(chosen):
            for key, target in flat.items():
                for j in range(k):
                    values = enc[key][i * k + j] if key in enc else [0] * len(enc["input_ids"][i * k + j])
                    target[row * k + j, : len(values)] = values
            if words is not None:
                index = first_subtoken_words(enc.word_ids(int(i)))
                out["word_index"][row, : len(index)] = index
                out["num_words"][row] = len(words[i])
        return out

    def _result(self, task: str, kind: str, text: str, second: str | list[str] | None, words: list[str] | None,
                item: Any, probs: np.ndarray | None) -> dict[str, Any]:
        """The JSON-able result of one input: `second` is its text_pair or its choices, `item` its
        head's decoded prediction, `probs` its class probabilities (classification heads)."""
        result: dict[str, Any] = {"text": text}
        if second is not None:
            result["choices" if kind == "choice" else "text_pair"] = second
        if kind == "tags":
            result["tokens"] = words
        choices = second if kind == "choice" else None
        return dict(result, **render_prediction(kind, self.labels[task], item, probs, words, choices))


def render_prediction(kind: str, labels: Sequence[str], item: Any, probs: np.ndarray | None = None,
                      words: Sequence[str] | None = None, choices: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON-able form of one decoded prediction (or a reference in the same form): `item` as
    a head of label kind `kind` decodes it, `probs` its class probabilities where the head gives
    them, `words` the words a token task tagged (for its entity spans), `choices` a multiple-choice
    input's choices (the chosen one's text is its "answer")."""
    result: dict[str, Any] = {}
    if kind == "tags":
        tags = [labels[t] for t in item]
        result["tags"] = tags
        result["entities"] = [{"type": type_, "start": start, "end": end, "text": " ".join(words[start:end])}
                              for type_, start, end in entity_spans(tags)]
        return result
    if kind == "scalar":
        return {"score": item}
    if kind in ("class", "choice"):
        result["label"] = labels[item[0] if isinstance(item, tuple) else item]
        if choices is not None:
            result["answer"] = choices[item]
    else:
        result["labels"] = [label for label, on in zip(labels, item, strict=True) if on]
    if probs is not None:
        if choices is not None:  # the input's own choices: padding past them has none
            labels, probs = labels[:len(choices)], probs[:len(choices)]
        result["probs"] = {label: round(float(p), 4) for label, p in zip(labels, probs, strict=True)}
    if isinstance(item, tuple):  # sentiment: (label, signed score)
        result["score"] = round(item[1], 4)
    return result


# Where an export is written before it replaces OUT's files: inside OUT, so on its filesystem
# (OUT may be a mount point) and never beside it, where the user may not be able to write.
_STAGING_PREFIX = ".export-"


def export(workdir: str | os.PathLike, out: str | os.PathLike, which: str | int = "best") -> Path:
    """Write a workdir's model for use without mtl.

    out/config.json + model.safetensors: the encoder, which `transformers.AutoModel` loads;
    out/tokenizer files; out/heads.safetensors: each head's parameters as "task.path.to.param";
    out/tasks.json: every task's head type, options (defaults filled in), max_length and labels
    in id order. scripts/torch_predict.py reads all of it in PyTorch.

    Every file is written into a staging directory first and moved into OUT only once all of
    them are written: an export that fails (a full disk, Ctrl-C) leaves an earlier export in OUT
    as it was, and a new OUT is removed again.
    """
    out = Path(out)
    created, earlier = not out.exists(), (out / "tasks.json").is_file()
    if out.exists() and not out.is_dir():  # before the model loads
        raise MtlError(f"{out}: is a file; --out names the directory to export into")
    # Checked first: save_pretrained would overwrite another model's config.json and weights.
    if out.is_dir() and not earlier:
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(_STAGING_PREFIX))
        if others:
            raise MtlError(f"{out}: holds files that are not an mtl export ({', '.join(others[:5])}"
                           f"{', ...' if len(others) > 5 else ''}); export into a new or empty directory, or one "
                           "an earlier mtl export wrote")
    predictor = Predictor.from_workdir(workdir, which)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
    except OSError as e:
        raise MtlError(f"{out}: cannot write the export there ({e.strerror})") from None
    done = False
    try:
        _write_export(predictor, staging)
        # tasks.json last: the file that makes a directory an mtl export.
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "tasks.json"):
            os.replace(path, out / path.name)
        done = True
        for killed in out.glob(_STAGING_PREFIX + "*"):  # left by an export killed before it could clean up
            shutil.rmtree(killed, ignore_errors=True)
    except (OSError, SafetensorError) as e:
        kept = "the earlier export in it is kept" if earlier else "nothing was left there"
        raise MtlError(f"{out}: the export could not be written ({_io_cause(e)}); {kept}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            shutil.rmtree(out, ignore_errors=True)
    return out


def _io_cause(e: Exception) -> str:
    """The cause of a failed write in a few words: "No space left on device", say."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    # safetensors says "Error while serializing: I/O error: No space left on device (os error 28)".
    return re.sub(r" \(os error \d+\)$", "", str(e).rpartition("I/O error: ")[2]) or type(e).__name__


def _write_export(predictor: Predictor, directory: Path) -> None:
    predictor.model.encoder.save_pretrained(directory)
    predictor.tokenizer.save_pretrained(str(directory))
    heads = flatten(nnx.to_pure_dict(nnx.state(predictor.model.heads, nnx.Param)))
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in heads.items()}, str(directory / "heads.safetensors"))
    tasks = {}
    for name, task in predictor.tasks.items():
        # Every option as the head ran, defaults included: a reader outside mtl need not know them.
        defaults = {k: v for k, v in head_option_defaults(task.head).items() if v is not inspect.Parameter.empty}
        tasks[name] = dict(dataclasses.asdict(task), head_options={**defaults, **task.head_options},
                           labels=predictor.labels[name])
    (directory / "tasks.json").write_text(
        json.dumps({"step": predictor.step, "tasks": tasks}, indent=2, default=str) + "\n")
