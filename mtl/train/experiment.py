"""Assemble what an experiment config describes: tokenizer, task data, and the model.

`build_experiment(config)` is the one place that turns an ExperimentConfig into objects, for the
trainer, the CLI and research scripts alike.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flax import nnx

from mtl.assets import resolve_model
from mtl.config import ExperimentConfig
from mtl.data.pipeline import TaskData, load_task_data
from mtl.errors import MtlError
from mtl.models.encoder import Encoder, EncoderConfig
from mtl.models.heads import build_head
from mtl.models.model import MultiTaskModel
from mtl.tasks import load_tasks
from mtl.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
    config: ExperimentConfig
    encoder_dir: Path
    tokenizer: object
    tasks: dict[str, TaskData]  # in config order
    model: MultiTaskModel

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)


def _encoder(config: ExperimentConfig, directory: Path, vocab_size: int) -> Encoder:
    m = config.model
    run = dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat_policy=m.remat_policy)
    if m.random_init is None:
        return Encoder.from_pretrained(directory, **run)
    r = m.random_init
    encoder_config = EncoderConfig(vocab_size=vocab_size, hidden_size=r.hidden_size, num_layers=r.num_layers,
                                   num_heads=r.num_heads, intermediate_size=r.intermediate_size,
                                   max_position_embeddings=r.max_position_embeddings, **run)
    return Encoder(encoder_config, rngs=nnx.Rngs(config.train.seed))


def _sliced(data: TaskData, max_train: int | None, max_eval: int | None) -> TaskData:
    """The first N examples of each (already shuffled) split."""
    splits = {}
    for name, split in data.splits.items():
        limit = max_train if name == "train" else max_eval
        splits[name] = split.select(range(min(limit, len(split)))) if limit is not None else split
    stats = dict(data.stats, examples={n: len(s) for n, s in splits.items()})
    return dataclasses.replace(data, splits=splits, stats=stats)


def load_experiment_data(config: ExperimentConfig, tokenizer, max_positions: int) -> dict[str, TaskData]:
    specs = load_tasks([entry.task for entry in config.tasks])
    out = {}
    for entry, spec in zip(config.tasks, specs):
        data = load_task_data(spec, tokenizer, max_positions=max_positions)
        out[spec.name] = _sliced(data, entry.max_train_examples, entry.max_eval_examples)
    return out


def build_experiment(config: ExperimentConfig) -> Experiment:
    """Resolve the encoder, load every task's data, and build the model (fresh heads)."""
    directory = resolve_model(config.model.encoder)
    tokenizer = load_tokenizer(directory)
    encoder = _encoder(config, directory, len(tokenizer))
    if len(tokenizer) > encoder.config.vocab_size:
        raise MtlError(f"{directory}: the tokenizer has {len(tokenizer)} tokens, the encoder only {encoder.config.vocab_size}")
    tasks = load_experiment_data(config, tokenizer, encoder.config.max_sequence_length)
    rngs = nnx.Rngs(config.train.seed + 1)
    heads = {
        name: build_head(data.spec.head, encoder.config.hidden_size, data.labels, data.spec.head_options, rngs=rngs)
        for name, data in tasks.items()
    }
    return Experiment(config, directory, tokenizer, tasks, MultiTaskModel(encoder, heads))
