"""Meta-training and meta-testing: episodes in, the shared TrainLoop around the meta step.

`MetaTrainer(build_meta_experiment(config), workdir).run()` meta-trains a config with a `meta`
section; it checkpoints and resumes exactly like the multi-task Trainer (same loop, same
Checkpointer; an episode is a pure function of (seed, index), so the step is the position).

`meta_test(workdir)` adapts on M held-out episodes and reports the mean query accuracy (entity
F1 for NER) with a 95% confidence interval, beside two baselines that get the same episodes and
the same adaptation: (a) the pretrained encoder with no meta-training, (b) a multi-task
checkpoint with no meta-training (meta.baseline_from).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm
from typing_extensions import override

from mtl.assets import resolve_model
from mtl.checkpoint import require_kept
from mtl.config import ExperimentConfig, MetaSection, load_experiment
from mtl.data.episodes import EpisodeSampler, check_disjoint, make_source
from mtl.data.pipeline import TaskData
from mtl.errors import MtlError
from mtl.metrics import entity_metrics
from mtl.models.heads import IGNORE, build_head
from mtl.models.model import MultiTaskModel
from mtl.sharding import Layout, fit_mesh, initialize_distributed, make_mesh, primary_first
from mtl.tokenizer import load_tokenizer
from mtl.tracking import append_record, replace_whole
from mtl.train.experiment import build_encoder, load_experiment_data, transfer
from mtl.train.loop import TrainLoop
from mtl.train.meta import HEAD, AdaptPredict, MetaLearner, make_adapt_predict, make_meta_step
from mtl.train.optim import build_optimizer, frozen_mask
from mtl.train.state import TrainState

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MetaExperiment:
    """A config with a `meta` section made concrete: its tasks, the model, the episode samplers."""

    config: ExperimentConfig
    tokenizer: PreTrainedTokenizerBase
    tasks: dict[str, TaskData]
    model: MultiTaskModel  # the encoder and the "episode" head
    initial_params: nnx.State  # the model before any transfer: baseline (a)
    samplers: dict[str, EpisodeSampler]  # "train", "validation" (periodic eval), "test"


def _samplers(config: ExperimentConfig, tasks: dict[str, TaskData], pad_token_id: int,
              tested: tuple[MetaSection, str] | None = None) -> dict[str, EpisodeSampler]:
    """The episode samplers of config.meta: "train", "validation" (periodic evaluation), "test".

    Meta-test passes `tested`: (the meta section the workdir was trained with, the split it
    tests). Then config.meta's ways, shots and queries (the command line's) shape that split's
    episodes only; the others keep the trained shape, so that a source that meta-test does not
    read need not have the new number of classes or examples.
    """
    meta = config.meta
    # A source names a task as `tasks` lists it (a shipped name or a spec path); `tasks` is keyed
    # by the spec's name, in the same order.
    names = {entry.task: name for entry, name in zip(config.tasks, tasks, strict=True)}

    def sources(entries, default_split):
        return [make_source(tasks[names[e.task]], e.split or default_split, e.classes) for e in entries]

    train, test = sources(meta.train, "train"), sources(meta.test, "test")
    check_disjoint(train, test)
    evaluation = (sources(meta.eval, meta.eval_split) if meta.eval is not None
                  else [make_source(s.task, meta.eval_split, s.classes) for s in test])
    shape = {"ways": meta.ways, "shots": meta.shots, "queries": meta.queries, "max_length": meta.max_length,
             "pad_token_id": pad_token_id}
    shapes = dict.fromkeys(("train", "validation", "test"), shape)
    if tested is not None:
        trained, split = tested
        shapes = {part: shape if part == split else dict(shape, ways=trained.ways, shots=trained.shots,
                                                         queries=trained.queries) for part in shapes}
    seed = config.train.seed
    return {"train": EpisodeSampler(train, seed=seed, **shapes["train"]),
            "validation": EpisodeSampler(evaluation, seed=seed + 1, **shapes["validation"]),
            "test": EpisodeSampler(test, seed=seed + 2, **shapes["test"])}


def build_meta_experiment(config: ExperimentConfig, tested: tuple[MetaSection, str] | None = None) -> MetaExperiment:
    """Resolve the encoder, load the tasks (truncated to meta.max_length), build the episode
    samplers and the model; with model.init_from, transfer its encoder. `tested`: see _samplers."""
    if config.meta is None:
        raise MtlError(
            "this config has no `meta` section; mtl meta-train needs one (mtl train runs multi-task configs)")
    meta = config.meta
    directory = resolve_model(config.model.encoder)
    tokenizer = load_tokenizer(directory)
    encoder = build_encoder(config, directory, len(tokenizer))
    # Every episode is one fixed length: tokenize every task at meta.max_length.
    truncated = dataclasses.replace(config, tasks=[
        dataclasses.replace(e, overrides=[*e.overrides, f"max_length={meta.max_length}"]) for e in config.tasks])
    tasks = load_experiment_data(truncated, tokenizer, encoder.config.max_sequence_length)
    samplers = _samplers(config, tasks, tokenizer.pad_token_id, tested)
    kind = samplers["train"].kind
    labels = samplers[tested[1] if tested else "test"].episode_labels  # as wide as the episodes it is tested on
    options = {"pooling": meta.pooling, "dropout": 0.0} if kind == "class" else {"dropout": 0.0}
    head = build_head("classification" if kind == "class" else "token_classification", encoder.config.hidden_size,
                      labels, options, rngs=nnx.Rngs(config.train.seed + 1))
    model = MultiTaskModel(encoder, {HEAD: head})
    initial = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    if config.model.init_from is not None:
        transfer(model, config.model.init_from, {HEAD: labels}, config.model.reinit_heads,
                 config.model.init_checkpoint)
    return MetaExperiment(config, tokenizer, tasks, model, initial, samplers)


def learner_for(config: ExperimentConfig, model: MultiTaskModel,
                kind: str) -> tuple[MetaLearner, nnx.GraphDef, nnx.State]:
    """The MetaLearner the config's `meta` section describes over `model`, with the model split
    into its graphdef and params (the meta-parameters; the rest stays in the learner)."""
    meta = config.meta
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    learner = MetaLearner(graphdef, rest, model.encoder.config, algorithm=meta.algorithm, adapt=meta.adapt,
                          adapt_layers=meta.adapt_layers, inner_steps=meta.inner_steps, inner_lr=meta.inner_lr,
                          proto_init=meta.proto_init, remat=meta.remat, pooling=meta.pooling, kind=kind)
    return learner, graphdef, params


def _is_meta_workdir(workdir: Path) -> bool:
    config = workdir / "config.yaml"
    return config.is_file() and load_experiment(config).meta is not None


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def episode_scores(predict: AdaptPredict, meta_params: dict, sampler: EpisodeSampler, episodes: int, chunk: int,
                   layout: Layout, desc: str = "episodes") -> list[float]:
    """Per-episode query accuracy (class episodes) or entity F1 (NER) of `predict` (from
    `make_adapt_predict`), on episodes 0..episodes-1 of the sampler, split over `layout`'s mesh."""
    names = sampler.episode_labels
    scores: list[float] = []
    for start in tqdm(range(0, episodes, chunk), desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                      disable=None):
        # Always `chunk` episodes per call (one compile); the extras past `episodes` are dropped.
        stacked = sampler.meta_batch(start // chunk, chunk)
        predictions = np.asarray(layout.gather(predict(meta_params, layout.put_whole_batch(stacked))))
        for e in range(min(chunk, episodes - start)):
            labels = stacked["query"]["labels"][e]
            if sampler.kind == "class":
                scores.append(float(np.mean(predictions[e] == labels)))
            else:  # word-level tags: the first sub-token of every word (IOB2 over the episode's types)
                first = (labels != IGNORE) & (stacked["query"]["weights"][e][:, None] > 0)
                gold = [[names[t] for t in row[m]] for row, m in zip(labels, first, strict=True)]
                pred = [[names[t] for t in row[m]] for row, m in zip(predictions[e], first, strict=True)]
                scores.append(entity_metrics(gold, pred)["entity_f1"])
    return scores


class MetaTrainer(TrainLoop):
    """Meta-trains a MetaExperiment in `workdir`; see the module docstring."""

    def __init__(self, experiment: MetaExperiment, workdir: str | Path):
        self.experiment = experiment
        cfg = experiment.config
        self.samplers = experiment.samplers
        self.kind = self.samplers["train"].kind
        self.learner, self.graphdef, params = learner_for(cfg, experiment.model, self.kind)
        meta_params = self.learner.init_params(params)
        self.tx = build_optimizer(cfg.optim, meta_params, experiment.model.encoder.config, cfg.train.steps)
        # The meta-batch's episodes split over the mesh's data axes: each device adapts its own tasks.
        self.layout = Layout(make_mesh(cfg.mesh))
        self.layout.check_batch(cfg.meta.meta_batch, "meta.meta_batch")
        self.state = self.layout.put(TrainState.create(meta_params, self.tx, cfg.train.seed))
        shardings = self.layout.step_shardings(self.state)
        frozen = frozen_mask(meta_params, experiment.model.encoder.config, cfg.optim)
        self.train_steps = {"meta": make_meta_step(self.learner, self.tx, skip_nonfinite=cfg.train.nan_policy == "skip",
                                                   shardings=shardings, frozen=frozen)}
        self.metric = "accuracy" if self.kind == "class" else "entity_f1"
        # One jitted adapt-and-predict: every evaluation and meta-test row reuses its compilation.
        self.predict = make_adapt_predict(self.learner, cfg.meta.test_inner_steps or cfg.meta.inner_steps, shardings)
        super().__init__(cfg, workdir)  # last: opens the checkpoint manager

    @override
    def next_batch(self, step: int) -> tuple[str, dict]:
        size = self.config.meta.meta_batch  # each process samples only its own tasks
        episodes = self.samplers["train"].meta_batch(step, size, part=self.layout.process_rows(size))
        return "meta", self.layout.put_batch(episodes, size)

    @override
    def selectable_metrics(self) -> list[str]:
        return ["aggregate", self.metric]

    @override
    def progress(self) -> dict:
        # The episode of step s is a pure function of (seed, s): the step is the data position.
        return {"sources": [s.name for s in self.samplers["train"].sources],
                "labels": {HEAD: self.samplers["train"].episode_labels}}

    @override
    def restore_progress(self, meta: dict) -> None:
        mine = self.progress()
        if meta.get("sources") != mine["sources"] or meta.get("labels") != mine["labels"]:
            raise MtlError(f"{self.workdir}: its checkpoints were meta-trained on {meta.get('sources')} with episode "
                           f"labels {meta.get('labels')}, not this config's; use a new --workdir")

    def scores(self, split: str, meta_params: dict | None = None, episodes: int | None = None) -> list[float]:
        """One score per episode of `split` (accuracy, or entity F1 for NER), each adapted from
        `meta_params` (default: the current state's); `episodes` defaults to the config's count."""
        meta = self.config.meta
        episodes = episodes or (meta.eval_episodes if split == "validation" else meta.test_episodes)
        return episode_scores(self.predict, meta_params or self.state.params, self.samplers[split], episodes,
                              meta.meta_batch, self.layout, desc=f"{split} episodes")

    @override
    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Mean query score over the split's episodes (held-out classes), with its 95% CI."""
        mean, ci = _mean_ci(self.scores(split))
        return {self.metric: mean, f"{self.metric}_ci95": ci, "aggregate": mean}


def meta_train(config: ExperimentConfig, workdir: str | Path) -> dict[str, float]:
    """Meta-train a config in `workdir` (resuming if possible); multi-process as mtl.train.loop.train."""
    initialize_distributed(config.distributed)
    with primary_first("build the meta experiment"):
        experiment = build_meta_experiment(config)
    return MetaTrainer(experiment, workdir).run()


def meta_test(workdir: str | Path, *, split: str = "test", episodes: int | None = None, ways: int | None = None,
              shots: int | None = None, queries: int | None = None,
              baseline_from: str | None = None, checkpoint: str | int = "best") -> dict[str, dict[str, float]]:
    """Meta-test a workdir's best checkpoint (or `checkpoint`: latest, a saved step) beside
    baselines (a) and (b); see the module doc.

    Returns {row: {metric, metric_ci95, episodes}} for rows "meta-trained", "pretrained (no
    meta-training)" and, with a baseline workdir, "multi-task (no meta-training)"; also writes
    them to workdir/meta_test.json. `ways` may differ from training only where the head is not
    meta-learned (protonet, or proto_init without meta_sgd): the encoder is what transfers.
    """
    workdir = Path(workdir)
    if episodes is not None and episodes < 1:
        raise MtlError(f"episodes must be at least 1, got {episodes}")
    if not (workdir / "config.yaml").is_file() or not (workdir / "checkpoints").is_dir():
        raise MtlError(
            f"{workdir}: not a meta-training workdir (no config.yaml and checkpoints/); run mtl meta-train first")
    trained = load_experiment(workdir / "config.yaml")
    if trained.meta is None:
        raise MtlError(f"{workdir}: was trained by mtl train, not mtl meta-train; meta-test needs a meta workdir")
    overrides = [f"meta.{k}={v}" for k, v in (("ways", ways), ("shots", shots), ("queries", queries)) if v is not None]
    config = load_experiment(workdir / "config.yaml", overrides)
    config = dataclasses.replace(config, mesh=fit_mesh(config.mesh))
    new_ways = config.meta.ways != trained.meta.ways
    algorithm = config.meta.algorithm
    head_is_learned = not (algorithm == "protonet" or (config.meta.proto_init and algorithm != "meta_sgd"))
    if new_ways and head_is_learned:
        raise MtlError(f"{workdir}: its {config.meta.algorithm} head was meta-learned for {trained.meta.ways} ways; "
                       f"--ways {config.meta.ways} needs protonet or proto_init")
    # Baseline (b)'s encoder comes from a multi-task checkpoint; load it before anything runs.
    baseline_from = baseline_from or config.meta.baseline_from
    if baseline_from is not None and _is_meta_workdir(Path(baseline_from)):
        raise MtlError(f"{baseline_from}: is a meta-learning workdir; baseline (b) is a multi-task one (mtl train), "
                       "whose encoder saw no episodes")
    require_kept(workdir, checkpoint)  # before the model and data load
    # Built without model.init_from: its initial params are baseline (a), the pretrained encoder as
    # it was; the workdir's meta-trained params are loaded below.
    fresh = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=None))
    experiment = build_meta_experiment(fresh, tested=(trained.meta, split))
    trainer = MetaTrainer(experiment, workdir)
    try:
        initial = trainer.state.params
        labels = trainer.samplers[split].episode_labels
        if new_ways:  # the saved head has another shape: take the meta-trained encoder only
            model = nnx.merge(trainer.graphdef, experiment.initial_params, trainer.learner.rest)
            step = transfer(model, str(workdir), {HEAD: labels}, [HEAD], checkpoint)
            trained_params = trainer.learner.init_params(nnx.state(model, nnx.Param))
        else:
            step = trainer.restore(checkpoint)
            trained_params = trainer.state.params
        rows = {"meta-trained": trained_params, "pretrained (no meta-training)": initial}
        if baseline_from is not None:
            model = nnx.merge(trainer.graphdef, experiment.initial_params, trainer.learner.rest)
            transfer(model, baseline_from, {HEAD: labels}, [HEAD])
            rows["multi-task (no meta-training)"] = trainer.learner.init_params(nnx.state(model, nnx.Param))
        count = episodes if episodes is not None else config.meta.test_episodes
        results = {}
        for name, params in rows.items():
            mean, ci = _mean_ci(trainer.scores(split, params, count))
            results[name] = {trainer.metric: mean, f"{trainer.metric}_ci95": ci, "episodes": count}
    finally:
        trainer.checkpointer.close()
    meta = config.meta
    report = {"step": step, "split": split, "ways": meta.ways, "shots": meta.shots, "queries": meta.queries,
              "algorithm": meta.algorithm, "inner_steps": meta.test_inner_steps or meta.inner_steps,
              "baseline_from": baseline_from, "results": results}
    try:
        replace_whole(workdir / "meta_test.json", json.dumps(report, indent=2))  # a cut write keeps the last report
    except OSError as e:  # the caller prints the report: a read-only workdir or a full disk loses nothing
        log.warning("%s: cannot write it (%s); the results are printed only", workdir / "meta_test.json", e.strerror)
    append_record(workdir, step, f"meta_test/{split}",
                  {f"{row}/{k}": v for row, r in results.items() for k, v in r.items()})
    return report
