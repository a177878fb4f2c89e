"""Use a trained workdir: predict on raw texts, or export it for transformers.

`Predictor.from_workdir(dir)` rebuilds the model from the workdir's config.yaml and its best
checkpoint. The label vocabularies come from the checkpoint's metadata, so predicting never
reads the training data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mtl.assets import resolve_model
from mtl.checkpoint import load_trained
from mtl.config import load_experiment
from mtl.data.batching import bucket_lengths
from mtl.data.pipeline import first_subtoken_words
from mtl.errors import MtlError
from mtl.models.heads import build_head, get_head
from mtl.models.model import MultiTaskModel
from mtl.tasks import TaskSpec, load_tasks
from mtl.tokenizer import load_tokenizer
from mtl.params import flatten
from mtl.train.experiment import assign_params, build_encoder


@dataclasses.dataclass
class Predictor:
    model: MultiTaskModel
    tokenizer: Any
    specs: dict[str, TaskSpec]
    labels: dict[str, list[str]]
    step: int

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, which: str = "best") -> Predictor:
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
        specs = {s.name: s for s in load_tasks([t.task for t in config.tasks], [t.overrides for t in config.tasks])}
        rngs = nnx.Rngs(0)
        heads = {name: build_head(spec.head, encoder.config.hidden_size, meta["labels"][name], spec.head_options, rngs=rngs)
                 for name, spec in specs.items()}
        model = MultiTaskModel(encoder, heads)
        where = f"{workdir}: checkpoint {step} does not fit config.yaml (edited since?)"
        assign_params(model, flatten(saved["model"]), where=where)
        return cls(model, tokenizer, specs, meta["labels"], step)

    def _batch(self, spec: TaskSpec, texts: Sequence[str], words: list[list[str]] | None) -> dict[str, np.ndarray]:
        if words is not None:
            enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=spec.max_length)
        else:
            enc = self.tokenizer(list(texts), truncation=True, max_length=spec.max_length)
        n = len(texts)
        longest = max(len(x) for x in enc["input_ids"])
        length = min(b for b in bucket_lengths(spec.max_length) if b >= longest)
        out = {k: np.zeros((n, length), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
        out["input_ids"][:] = self.tokenizer.pad_token_id
        out["weights"] = np.ones((n,), np.float32)
        out["word_index"] = np.full((n, length), -1, np.int32)
        out["num_words"] = np.array([len(w) for w in words] if words is not None else [0] * n, np.int32)
        for i in range(n):
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                values = enc[key][i] if key in enc else [0] * len(enc["input_ids"][i])
                out[key][i, : len(values)] = values
            if words is not None:
                index = first_subtoken_words(enc.word_ids(i))
                out["word_index"][i, : len(index)] = index
        return out

    def predict(self, task: str, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One result dict per text: label (+probabilities, score), tags and entity spans, ..."""
        if task not in self.specs:
            raise MtlError(f"task {task!r} is not in this workdir; tasks: {sorted(self.specs)}")
        if not texts:
            return []
        spec, head = self.specs[task], self.model.head(task)
        kind, labels = get_head(spec.head).label_kind, self.labels[task]
        words = [t.split() for t in texts] if kind == "tags" else None
        batch = self._batch(spec, texts, words)
        predictions = jax.device_get(head.predict(self.model(task, batch), batch))
        decoded = head.decode(predictions, batch)
        results = []
        for i, (text, item) in enumerate(zip(texts, decoded)):
            result: dict[str, Any] = {"text": text}
            if kind == "tags":
                from seqeval.metrics.sequence_labeling import get_entities

                tags = [labels[t] for t in item]
                result["tokens"], result["tags"] = words[i], tags
                result["entities"] = [{"type": kind_, "start": s, "end": e + 1, "text": " ".join(words[i][s:e + 1])}
                                      for kind_, s, e in get_entities(tags)]
            elif kind == "class":
                label = item[0] if isinstance(item, tuple) else item
                result["label"] = labels[label]
                result["probs"] = {l: round(float(p), 4) for l, p in zip(labels, predictions["probs"][i])}
                if isinstance(item, tuple):
                    result["score"] = round(item[1], 4)
            elif kind == "scalar":
                result["score"] = item
            else:
                result["labels"] = [l for l, on in zip(labels, item) if on]
            results.append(result)
        return results


def export(workdir: str | os.PathLike, out: str | os.PathLike, which: str = "best") -> Path:
    """Write a workdir's model for use without mtl.

    out/config.json + model.safetensors: the encoder, which `transformers.AutoModel` loads;
    out/tokenizer files; out/heads.safetensors: each head's parameters as "task.path.to.param";
    out/tasks.json: every task's head type, options, max_length and labels in id order.
    """
    predictor = Predictor.from_workdir(workdir, which)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictor.model.encoder.save_pretrained(out)
    predictor.tokenizer.save_pretrained(str(out))
    heads = flatten(nnx.to_pure_dict(nnx.state(predictor.model.heads, nnx.Param)))
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in heads.items()}, str(out / "heads.safetensors"))
    tasks = {name: {"head": spec.head, "head_options": spec.head_options, "max_length": spec.max_length,
                    "labels": predictor.labels[name]} for name, spec in predictor.specs.items()}
    (out / "tasks.json").write_text(json.dumps({"step": predictor.step, "tasks": tasks}, indent=2) + "\n")
    return out
