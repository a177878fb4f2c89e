"""Assemble what an experiment config describes: tokenizer, task data, and the model.

`build_experiment(config)` is the one place that turns an ExperimentConfig into objects, for the
trainer, the CLI and research scripts alike.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

from mtl.assets import resolve_model
from mtl.checkpoint import load_trained
from mtl.config import ExperimentConfig
from mtl.data.pipeline import TaskData, column, load_task_data
from mtl.errors import MtlError
from mtl.models.encoder import Encoder, EncoderConfig
from mtl.models.heads import Head, build_head
from mtl.models.model import MultiTaskModel
from mtl.params import flatten, stack_layers, unflatten, unstack_layers
from mtl.tasks import load_tasks
from mtl.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experiment:
    """A config made concrete: the encoder's files and tokenizer, each task's data, the model."""

    config: ExperimentConfig
    encoder_dir: Path
    tokenizer: PreTrainedTokenizerBase
    tasks: dict[str, TaskData]  # in config order
    model: MultiTaskModel

    @property
    def task_names(self) -> list[str]:
        """The tasks' names, in config order (the order of their heads and their loss weights)."""
        return list(self.tasks)


def build_encoder(config: ExperimentConfig, directory: Path, vocab_size: int) -> Encoder:
    """The pretrained encoder in `directory`, or a random one of `model.random_init`'s shape, with
    the config's run options (dtypes, scanned layers, remat)."""
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
    """The first N examples of the (already shuffled) train and validation splits."""
    splits = {}
    for name, split in data.splits.items():
        limit = {"train": max_train, "validation": max_eval}.get(name)
        splits[name] = split.select(range(min(limit, len(split)))) if limit is not None else split
    stats = dict(data.stats, examples={n: len(s) for n, s in splits.items()})
    return dataclasses.replace(data, splits=splits, stats=stats)


def load_experiment_data(config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase,
                         max_positions: int) -> dict[str, TaskData]:
    """{task name: tokenized data} for the config's tasks, in config order, with each entry's
    overrides applied and its splits cut to `max_train_examples` / `max_eval_examples`."""
    specs = load_tasks([entry.task for entry in config.tasks], [entry.overrides for entry in config.tasks])
    out = {}
    for entry, spec in zip(config.tasks, specs, strict=True):
        data = load_task_data(spec, tokenizer, max_positions=max_positions)
        out[spec.name] = with_balanced_class_weights(_sliced(data, entry.max_train_examples,
                                                             entry.max_eval_examples))
    return out


def with_balanced_class_weights(data: TaskData) -> TaskData:
    """`data` with its spec's `head_options.class_weights: balanced` turned into numbers, n / (K *
    n_k) for label k of K with n_k of the n train examples the run uses (scikit-learn's
    "balanced"), so that the checkpoint keeps them and predict and export rebuild the head
    without the data. Other data is returned as it is."""
    spec = data.spec
    if data.label_kind != "class" or spec.head_options.get("class_weights") != "balanced":
        return data
    from sklearn.utils.class_weight import compute_class_weight

    ids = np.asarray(column(data.splits["train"], "labels"), np.int64)
    missing = [label for i, label in enumerate(data.labels) if not np.any(ids == i)]
    if missing:
        raise MtlError(f"{spec.at('head_options.class_weights')}: 'balanced' weighs each label by its train "
                       f"examples, and {missing} have none")
    weights = compute_class_weight("balanced", classes=np.arange(len(data.labels)), y=ids).tolist()
    log.info("%s: class_weights balanced from the train counts: %s", spec.name,
             ", ".join(f"{label} {w:.3f}" for label, w in zip(data.labels, weights, strict=True)))
    return dataclasses.replace(data, spec=dataclasses.replace(spec, head_options={**spec.head_options,
                                                                                   "class_weights": weights}))


def build_experiment(config: ExperimentConfig) -> Experiment:
    """Resolve the encoder, load every task's data, and build the model (fresh heads)."""
    directory = resolve_model(config.model.encoder)
    tokenizer = load_tokenizer(directory)
    encoder = build_encoder(config, directory, len(tokenizer))
    if len(tokenizer) > encoder.config.vocab_size:
        raise MtlError(f"{directory}: the tokenizer has {len(tokenizer)} tokens, "
                       f"the encoder only {encoder.config.vocab_size}")
    tasks = load_experiment_data(config, tokenizer, encoder.config.max_sequence_length)
    rngs = nnx.Rngs(config.train.seed + 1)
    heads = {name: _task_head(data, encoder.config.hidden_size, rngs) for name, data in tasks.items()}
    model = MultiTaskModel(encoder, heads)
    if config.model.init_from is not None:
        transfer(model, config.model.init_from, {n: d.labels for n, d in tasks.items()}, config.model.reinit_heads,
                 config.model.init_checkpoint)
    return Experiment(config, directory, tokenizer, tasks, model)


def _task_head(data: TaskData, hidden_size: int, rngs: nnx.Rngs) -> Head:
    """The task's head; an option it refuses (a user head's own checks too) names the spec."""
    try:
        return build_head(data.spec.head, hidden_size, data.labels, data.spec.head_options, rngs=rngs)
    except (MtlError, TypeError, ValueError) as e:
        raise MtlError(f"{data.spec.at('head_options')}: {e}") from None


def assign_params(model: nnx.Module, flat: dict[str, Any], where: str = "the checkpoint") -> None:
    """Set the model's Params from {"encoder.layers.query.kernel": array, ...}: every one given,
    in its shape (an MtlError names the first that is not, and `where` it came from)."""
    state = nnx.state(model, nnx.Param)
    for name, value in flatten(nnx.to_pure_dict(state)).items():
        found = np.shape(flat[name]) if name in flat else None
        if found != np.shape(value):
            raise MtlError(f"{where}: parameter {name!r} is {'missing' if found is None else found} in the checkpoint, "
                           f"{tuple(np.shape(value))} in this model")
    nnx.replace_by_pure_dict(state, unflatten({n: np.asarray(v) for n, v in flat.items()}))
    nnx.update(model, state)


def transfer(model: MultiTaskModel, workdir: str, labels: dict[str, list[str]], reinit: list[str],
             which: str | int = "best") -> int:
    """Initialise `model` from a trained workdir's best checkpoint (or `which`: latest, a step),
    logging what happened to each part; returns the step of the checkpoint read.

    The encoder must match parameter for parameter (the first mismatch is an error naming it).
    A head of the same name loads if its label vocabulary is unchanged; a changed one is an
    error unless the head is listed in `reinit` (model.reinit_heads); other heads start fresh.
    """
    unknown = [name for name in reinit if name not in labels]
    if unknown:
        raise MtlError(f"key 'model.reinit_heads': {unknown} are not among this run's heads {list(labels)}")
    if not (Path(workdir) / "checkpoints").is_dir():
        # A model directory (an mtl export, a downloaded checkpoint) is a likely mix-up: it goes elsewhere.
        hint = ("; it holds a config.json: a Hugging Face model directory, such as an mtl export, goes in model.encoder"
                if (Path(workdir) / "config.json").is_file() else "")
        raise MtlError(f"key 'model.init_from': {workdir} is not a training workdir (no checkpoints/){hint}")
    saved, meta, step = load_trained(workdir, which)
    # Compared and copied per layer: a run may scan its layers where the checkpoint's looped them.
    source = unstack_layers(flatten(saved["model"]), "encoder.layers.")
    state = nnx.state(model, nnx.Param)
    target = unstack_layers(flatten(nnx.to_pure_dict(state)), "encoder.layers.")
    where = f"model.init_from {workdir} (step {step})"
    report = {}
    for name, value in target.items():
        if not name.startswith("encoder."):
            continue
        if name not in source:
            raise MtlError(f"{where}: this model has encoder parameter {name!r} {tuple(np.shape(value))}, "
                           "which the checkpoint lacks: not the same architecture")
        if np.shape(source[name]) != np.shape(value):
            raise MtlError(f"{where}: encoder parameter {name!r} is {np.shape(source[name])} in the checkpoint, "
                           f"{tuple(np.shape(value))} in this model: not the same architecture")
    extra = next((n for n in source if n.startswith("encoder.") and n not in target), None)
    if extra is not None:
        raise MtlError(f"{where}: the checkpoint has encoder parameter {extra!r}, which this model lacks: "
                       "not the same architecture")
    report["encoder"] = "loaded"
    for task, task_labels in labels.items():
        prefix = f"heads.{task}."
        saved_labels = meta["labels"].get(task)
        if task in reinit or saved_labels is None:
            report[task] = "reinitialised" if task in reinit else "new head (not in the checkpoint)"
            continue
        if saved_labels != task_labels:
            raise MtlError(f"{where}: head {task!r} was trained on labels {saved_labels}, this task has "
                           f"{task_labels}; list it in model.reinit_heads to start it fresh")
        for name, value in target.items():
            if name.startswith(prefix) and (name not in source or np.shape(source[name]) != np.shape(value)):
                raise MtlError(f"{where}: head parameter {name!r} does not fit; list {task!r} in model.reinit_heads")
        report[task] = "loaded"
    loaded = {n: (source[n] if n.startswith("encoder.") or report.get(n.split(".")[1]) == "loaded" else v)
              for n, v in target.items()}
    assign_params(model, stack_layers(loaded, "encoder.layers.") if model.encoder.config.scan_layers else loaded)
    for part, what in report.items():
        log.info("%s: %s", part, what)
    return step
