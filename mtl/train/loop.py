"""The host loop: take a step, log, evaluate, checkpoint, stop; and the multi-task Trainer.

`TrainLoop` is the loop both trainers share (mtl.train.meta_trainer.MetaTrainer is the other):
they differ only in their pure steps, their batch source and their evaluation.

`Trainer(experiment, workdir).run()` trains a multi-task experiment; pointed at a workdir that already has
checkpoints, it resumes from the latest one exactly (same params, optimizer state, data
positions and RNG), so an interrupted run and an uninterrupted one produce the same losses.

A workdir holds config.yaml (the resolved config), metrics.jsonl, events/ (TensorBoard) and
checkpoints/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from typing_extensions import override

from mtl.checkpoint import SELECTION, Checkpointer, require_kept
from mtl.config import ExperimentConfig, config_changes, schema_defaults, to_yaml
from mtl.data.batching import Batcher, TrainStream, eval_batches
from mtl.data.pipeline import TaskData, column, load_task_data
from mtl.errors import MtlError
from mtl.models.heads import Head, decode_real_rows, real_rows
from mtl.sharding import Layout, fit_mesh, initialize_distributed, is_primary, make_mesh, primary_first
from mtl.tasks import TaskHead, primary_metrics
from mtl.tracking import (
    MetricsWriter,
    Progress,
    RecordNotWritten,
    StepProfiler,
    append_record,
    read_metrics,
    replace_whole,
)
from mtl.train.experiment import Experiment
from mtl.train.multitask import TaskSampler, make_predict_steps, make_train_steps
from mtl.train.optim import build_optimizer, frozen_mask, learning_rate_at
from mtl.train.state import TrainState, TrainStep

log = logging.getLogger(__name__)

# Metrics where smaller is better; selection (aggregate, best checkpoint) negates them.
LOWER_IS_BETTER = ("mse", "polarity_mae")


class NonFiniteLossError(MtlError):
    """Training produced a NaN or infinite loss or gradient."""


def selection_value(metric: str, value: float) -> float:
    """`value` as a score where higher is better: negated for the metrics in LOWER_IS_BETTER."""
    return -value if metric.split("/")[-1] in LOWER_IS_BETTER else value


def _command(meta_section: Any) -> str:
    """The command that trains a config with this `meta` section (a MetaSection, its YAML, or None)."""
    return "mtl train" if meta_section is None else "mtl meta-train"


# Held by the process training in a workdir (process 0 of a multi-process run).
LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive_workdir(workdir: Path) -> Iterator[None]:
    """Train in `workdir` alone. A second run into it (another terminal, a job resubmitted while
    the first still runs) would interleave its checkpoints and metrics with the first's. The OS
    drops the lock when its process ends, SIGKILL included, so a killed run never blocks its resume.
    """
    if not is_primary():
        yield
        return
    lock = filelock.FileLock(workdir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise MtlError(f"{workdir}: another process is training in this workdir (it holds {workdir / LOCK_FILE}); "
                       "wait for it to end, or use another --workdir") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], None]]:
    """Ctrl-C (SIGINT) stops the loop between steps, never inside one; yields the check to call
    between steps, which raises the KeyboardInterrupt.

    A KeyboardInterrupt raised wherever Python happened to be can land inside a library. Once
    (CI's Ctrl-C test) it left tensorboardX's event-writer thread waiting for a shutdown signal
    that never reached it, and the run hung at close. A second Ctrl-C interrupts at once.
    Where Python's own handler is not installed (a thread, an embedding application), this
    changes nothing.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: None
        return
    requested = False

    def on_sigint(signum, frame):
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        # os.write: safe in a signal handler, where logging's locks may be held.
        os.write(2, b"mtl: stopping after this step (Ctrl-C again to stop now)\n")

    def check() -> None:
        if requested:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class TrainLoop:
    """The host loop both trainers share; subclasses supply the batches, steps and evaluation.

    A subclass sets `layout`, `state` and `train_steps` ({name: jitted step}) in its
    constructor, then calls `super().__init__(config, workdir)` last (it opens the checkpoint
    manager); it implements `next_batch`, `evaluate`, `selectable_metrics` and the progress
    hooks. Everything else (logging, the non-finite policy, evaluation cadence, early stopping,
    checkpoints, exact resume) lives here once. In a multi-process run every process runs this loop in lockstep;
    process 0 alone writes the workdir's files, and orbax has each process save its shards.
    """

    config: ExperimentConfig
    workdir: Path
    layout: Layout
    state: TrainState
    train_steps: dict[str, TrainStep]
    checkpointer: Checkpointer

    def __init__(self, config: ExperimentConfig, workdir: str | Path) -> None:
        self.config = config
        self.workdir = Path(workdir)
        # Checked now, not at the first evaluation train.eval_every steps into the run (and before
        # a workdir is made: a refused config leaves nothing behind).
        if config.train.best_metric not in self.selectable_metrics():
            raise MtlError(f"key 'train.best_metric': {config.train.best_metric!r} is not one of "
                           f"{self.selectable_metrics()}")
        if self.workdir.exists() and not self.workdir.is_dir():
            raise MtlError(f"{self.workdir}: is a file; --workdir names the run's directory")
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MtlError(f"{self.workdir}: cannot create the workdir ({e.strerror})") from None
        # Checkpoints saved after an evaluation carry its selection score; the best one is kept.
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=config.train.keep_checkpoints)
        self.best: float | None = None
        self.evals_without_improvement = 0
        self.skipped_steps = 0

    # ----------------------------------------------------------------- subclass hooks

    def next_batch(self, step: int) -> tuple[str, Any]:
        """(name of the train step to run, its batch on the mesh) for `step`; advances the data
        position. Each process builds only its own rows (`layout.process_rows`)."""
        raise NotImplementedError

    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Scores on `split`, keyed as `selectable_metrics` names them."""
        raise NotImplementedError

    def progress(self) -> dict:
        """JSON-able data positions, saved in every checkpoint's meta."""
        raise NotImplementedError

    def restore_progress(self, meta: dict) -> None:
        """Check a checkpoint's meta fits this run (an MtlError if not), then restore positions."""
        raise NotImplementedError

    def log_extras(self) -> dict[str, float]:
        """Extra scalars for each train log record."""
        return {}

    def selectable_metrics(self) -> list[str]:
        """The evaluation results train.best_metric may name."""
        raise NotImplementedError

    def primary_metrics(self) -> list[str]:
        """Evaluation results to print beside the headline ones (`mtl.tracking.headline`)."""
        return []

    # ----------------------------------------------------------------------- state

    def meta(self) -> dict:
        """What a checkpoint keeps beside the state: data positions, best score, counters, config."""
        return dict(self.progress(), best=self.best, evals_without_improvement=self.evals_without_improvement,
                    skipped_steps=self.skipped_steps, config=to_yaml(self.config))

    def resume(self) -> int:
        """Restore the latest checkpoint if there is one; returns the step to continue from."""
        step = self.checkpointer.latest_step()
        if step is None:
            return 0
        meta = self.checkpointer.restore_meta(step)
        command, trained_by = _command(self.config.meta), _command(yaml.safe_load(meta["config"]).get("meta"))
        if trained_by != command:
            raise MtlError(f"{self.workdir}: was trained by {trained_by}, which {command} cannot resume; use a new "
                           "--workdir (model.init_from starts from its encoder)")
        self.restore_progress(meta)
        # `distributed` says which process this is, not what the run is: it differs between processes.
        changes = config_changes(meta["config"], to_yaml(self.config), ignore=("distributed",),
                                 defaults=schema_defaults())
        if changes:  # deliberate (more steps, say) or not, the run is no longer the one it resumes
            log.warning("%s: resuming step %d under a changed config: %s", self.workdir, step, "; ".join(changes))
        self.state, meta = self.checkpointer.restore(step, self.state)
        self.best = meta["best"]
        self.evals_without_improvement = int(meta["evals_without_improvement"])
        self.skipped_steps = int(meta["skipped_steps"])
        log.info("resumed %s at step %d", self.workdir, step)
        return step

    def restore(self, which: str | int = "best") -> int:
        """Load the best or latest checkpoint's state, or step `which`'s, for evaluation; returns its step."""
        def read(step: int) -> TrainState:
            self.restore_progress(self.checkpointer.restore_meta(step))  # the same tasks and labels as trained
            return self.checkpointer.restore(step, self.state)[0]

        step, self.state = self.checkpointer.read_chosen(which, read)
        return step

    def _selection(self, results: dict[str, float]) -> float:
        key = self.config.train.best_metric
        return selection_value(key, results[key])

    # -------------------------------------------------------------------------- loop

    def _read_step(self, step: int, task: str, metrics: dict, window: dict[str, list[float]]) -> None:
        """Bring step `step`'s loss to the host: into `window` (the losses to log) if finite;
        else stop the run, or count the step as skipped (train.nan_policy)."""
        loss = float(metrics["loss"])
        if bool(metrics["finite"]):
            window.setdefault(task, []).append(loss)
        elif self.config.train.nan_policy == "stop":
            last = self.checkpointer.latest_step()
            kept = "No checkpoint was saved yet." if last is None else f"The last checkpoint ({last}) is intact."
            raise NonFiniteLossError(
                f"step {step + 1}, task {task!r}: the loss or its gradient is not finite (loss {loss}); stopped. "
                f"{kept} Set train.nan_policy=skip to skip such steps instead."
            )
        else:
            self.skipped_steps += 1

    def run(self) -> dict[str, float]:
        """Train to train.steps (or early stop) and return the last evaluation's results."""
        try:
            with exclusive_workdir(self.workdir):
                return self._run()  # it closes the checkpointer: a save in flight ends before the lock does
        finally:
            self.checkpointer.close()  # a no-op now, unless the workdir was refused

    def profile_directory(self) -> Path:
        """Where `train.profile_steps` traces go: workdir/profile, a directory per process in a
        multi-process run (jax names a trace file after its host, which processes may share)."""
        directory = self.workdir / "profile"
        return directory if jax.process_count() == 1 else directory / f"process_{jax.process_index()}"

    def _write_config(self) -> None:
        """config.yaml, replaced whole: evaluate, predict and export read it, perhaps while this
        run starts, and a write cut short (a full disk) must leave the previous one."""
        path = self.workdir / "config.yaml"
        try:
            replace_whole(path, to_yaml(self.config))
        except OSError as e:
            kept = "; the previous one is kept" if path.is_file() else ""
            raise MtlError(f"{path}: cannot write the run's config ({e.strerror}){kept}. Once the cause is fixed, "
                           "run the same command again") from None

    def _run(self) -> dict[str, float]:
        cfg = self.config.train
        start = self.resume()
        if is_primary():  # after resume's checks: a refused run leaves the workdir's config as it was
            self._write_config()
        patience = cfg.early_stopping_patience
        stopped_early = patience is not None and self.evals_without_improvement >= patience
        if start >= cfg.steps or stopped_early:  # a finished run, rerun: say so, and give its last scores again
            log.info("%s: already %s at step %d; nothing to do", self.workdir,
                     "stopped early" if stopped_early else "trained", start)
            self.checkpointer.close()
            evals = [r for r in read_metrics(self.workdir) if r["kind"] == "eval"]
            return {k: v for k, v in evals[-1].items() if k not in ("step", "kind", "selection")} if evals else {}
        writer = MetricsWriter(self.workdir, tensorboard=cfg.tensorboard)
        window: dict[str, list[float]] = {}
        results: dict[str, float] = {}
        progress = Progress(cfg.steps, start, enabled=is_primary(), primary=self.primary_metrics())
        profiler = StepProfiler(self.profile_directory(), cfg.profile_start, cfg.profile_steps)
        tick, tick_step = time.perf_counter(), start
        done = start
        interrupts = contextlib.ExitStack()  # a with-block, closed in the finally below
        try:
            stop_if_interrupted = interrupts.enter_context(interrupts_between_steps())
            unread = None  # (step, task, metrics) of the step dispatched last, not yet read on the host
            for step in range(start, cfg.steps):
                stop_if_interrupted()  # a Ctrl-C during the step before (a finished run ignores it)
                profiler.before_step(step)
                name, batch = self.next_batch(step)
                self.state, metrics = self.train_steps[name](self.state, batch)
                # The step before is read only now that this one is queued behind it: while the
                # host waits for its loss the device has work, and it builds the next batch while
                # this step runs. Reading each step's own loss at once would idle the device
                # for the host's share of every step (batch building and dispatch).
                if unread is not None:
                    self._read_step(*unread, window)
                unread = (step, name, metrics)
                done = step + 1
                profiler.after_step(done, (self.state, metrics))
                progress.step()
                logs = done % cfg.log_every == 0 or done == cfg.steps
                evaluates = done % cfg.eval_every == 0 or done == cfg.steps
                saves = done % cfg.checkpoint_every == 0 or done == cfg.steps  # or an early stop, below
                if logs or evaluates or saves:
                    # Nothing is logged or saved before its steps are read: a non-finite step
                    # stops the run before its state can reach a checkpoint.
                    self._read_step(*unread, window)
                    unread = None
                if logs:
                    now = time.perf_counter()
                    losses = {t: float(np.mean(v)) for t, v in window.items()}
                    record = {f"{t}/loss": value for t, value in losses.items()}
                    record.update(lr=learning_rate_at(self.config.optim, cfg.steps, done),
                                  steps_per_second=(done - tick_step) / max(now - tick, 1e-9),
                                  grad_norm=float(metrics["grad_norm"]), skipped_steps=self.skipped_steps)
                    record.update(self.log_extras())
                    writer.write(done, "train", record)
                    progress.logged(done, losses, record["steps_per_second"])
                    window, tick, tick_step = {}, now, done
                stop = False
                save_metrics = None
                if evaluates:
                    results = self.evaluate(cfg.eval_split)
                    selection = self._selection(results)
                    if self.best is None or selection > self.best:
                        self.best, self.evals_without_improvement = selection, 0
                    else:
                        self.evals_without_improvement += 1
                    writer.write(done, "eval", dict(results, selection=selection))
                    progress.evaluated(done, cfg.eval_split, results)
                    save_metrics = {SELECTION: selection}
                    stop = patience is not None and self.evals_without_improvement >= patience
                if saves or stop:
                    self.checkpointer.save(done, self.state, self.meta(), metrics=save_metrics)
                if stop:
                    log.info("early stop at step %d: no improvement in %d evaluations", done,
                             cfg.early_stopping_patience)
                    break
            best = self.checkpointer.best_step()
            if best is not None:  # the printed results are the last evaluation's, which need not be the best
                log.info("the best checkpoint by train.best_metric (%s) is step %d, the one later commands read "
                         "unless given --checkpoint", cfg.best_metric, best)
            profiler.stop(done, self.state)  # a run that ends inside the traced range
        except KeyboardInterrupt:
            progress.close()
            self.checkpointer.wait()  # a save in flight completes: it is where a rerun resumes
            log.warning("%s: interrupted after step %d; the same command %s", self.workdir, done,
                        self.checkpointer.rerun_resumes())
            raise
        except RecordNotWritten as e:
            self.checkpointer.wait()  # as above; a save that fails too is the error said instead
            raise MtlError(
                f"{e}; once the cause is fixed, the same command {self.checkpointer.rerun_resumes()}") from None
        finally:
            profiler.stop(done)  # on an error, without waiting on a state a failed step may have donated
            interrupts.close()
            progress.close()
            writer.close()
            self.checkpointer.close()
        return results


class Trainer(TrainLoop):
    """Multi-task training of an Experiment in `workdir`; see the module docstring."""

    def __init__(self, experiment: Experiment, workdir: str | Path):
        self.experiment = experiment
        cfg = experiment.config
        self.tasks = experiment.task_names
        eval_split = cfg.train.eval_split  # mtl evaluate sets it to its --split
        unscored = {name: sorted(data.splits) for name, data in experiment.tasks.items()
                    if eval_split not in data.splits}
        if len(unscored) == len(self.tasks):
            raise MtlError(f"{workdir}: no task has a {eval_split!r} split to evaluate on (train.eval_split); "
                           f"their splits: {unscored}")
        if unscored:
            log.warning("%s: %s have no %r split; evaluations leave them out", workdir, list(unscored), eval_split)
        pad = experiment.tokenizer.pad_token_id
        eval_rows = cfg.train.eval_batch_size or cfg.train.batch_size
        self.batchers = {
            split: {
                name: Batcher(data.splits[split], batch_size=cfg.train.batch_size if split == "train" else eval_rows,
                              max_length=data.spec.max_length, pad_token_id=pad, buckets=cfg.train.buckets)
                for name, data in experiment.tasks.items() if split in data.splits
            }
            for split in ("train", "validation", "test")
        }
        self.streams = {
            name: TrainStream(self.batchers["train"][name], seed=cfg.train.seed * 1000 + i, name=f"{name}/train")
            for i, name in enumerate(self.tasks)
        }
        self.sampler = TaskSampler([self.batchers["train"][n].size for n in self.tasks],
                                   strategy=cfg.train.sampling, temperature=cfg.train.temperature, seed=cfg.train.seed,
                                   rates=[t.rate for t in cfg.tasks] if cfg.train.sampling == "rates" else None)

        self.layout = Layout(make_mesh(cfg.mesh))
        self.layout.check_batch(cfg.train.batch_size, "train.batch_size")
        self.layout.check_batch(eval_rows, "train.eval_batch_size" if cfg.train.eval_batch_size else "train.batch_size")
        self.graphdef, params, self.rest = nnx.split(experiment.model, nnx.Param, ...)
        train_params = {"model": params, "log_vars": jnp.zeros((len(self.tasks),), jnp.float32)}
        self.tx = build_optimizer(cfg.optim, train_params, experiment.model.encoder.config, cfg.train.steps)
        self.state = self.layout.put(TrainState.create(train_params, self.tx, cfg.train.seed))
        shardings = self.layout.step_shardings(self.state)
        self.train_steps = make_train_steps(
            self.graphdef, self.rest, self.tx, self.tasks, [t.weight for t in cfg.tasks],
            weighting=cfg.train.loss_weighting, skip_nonfinite=cfg.train.nan_policy == "skip",
            dropout=cfg.train.dropout, shardings=shardings,
            frozen=frozen_mask(train_params, experiment.model.encoder.config, cfg.optim),
        )
        self.predict_steps = make_predict_steps(self.graphdef, self.rest, self.tasks, shardings)
        self.positions = {name: 0 for name in self.tasks}
        super().__init__(cfg, workdir)  # last: opens the checkpoint manager

    @override
    def next_batch(self, step: int) -> tuple[str, dict]:
        task = self.tasks[self.sampler.task_at(step)]
        rows = self.config.train.batch_size
        batch = self.streams[task].batch(self.positions[task], part=self.layout.process_rows(rows))
        self.positions[task] += 1
        return task, self.layout.put_batch(batch, rows)

    @override
    def selectable_metrics(self) -> list[str]:
        heads = self.experiment.model.heads
        listed = [f"{task}/{metric}" for task in self.tasks for metric in heads[task].metric_names]
        return ["aggregate", *dict.fromkeys(listed + self.primary_metrics())]  # a label's metric, if a task selects one

    @override
    def primary_metrics(self) -> list[str]:
        return primary_metrics(data.spec for data in self.experiment.tasks.values())

    @override
    def progress(self) -> dict:
        tasks = self.experiment.tasks.items()
        return {"positions": self.positions, "tasks": self.tasks,
                "labels": {name: data.labels for name, data in tasks},
                "heads": {name: dataclasses.asdict(TaskHead.of(data.spec)) for name, data in tasks}}

    @override
    def restore_progress(self, meta: dict) -> None:
        if meta.get("tasks") != self.tasks:
            raise MtlError(f"{self.workdir}: its checkpoints were trained on tasks {meta.get('tasks')}, not this "
                           f"config's {self.tasks}; use a new --workdir, or model.init_from to transfer")
        for name, data in self.experiment.tasks.items():
            if meta["labels"][name] != data.labels:  # a head's outputs mean these labels, in this order
                raise MtlError(
                    f"{self.workdir}: task {name!r} was trained with labels {meta['labels'][name]}, and its spec and "
                    f"data now give {data.labels}; put them back, or use a new --workdir (model.init_from "
                    f"transfers the encoder)"
                )
            # Checkpoints written before "heads" was saved go unchecked.
            saved, now = meta.get("heads", {}).get(name), TaskHead.of(data.spec)
            if saved is not None and saved.get("text_pair", False) != now.text_pair:
                reads = {True: "pairs of texts", False: "single texts"}
                raise MtlError(
                    f"{self.workdir}: task {name!r} was trained on {reads[saved.get('text_pair', False)]}, and its "
                    f"spec now gives {reads[now.text_pair]} (columns.text_pair); put it back, or use a new "
                    f"--workdir (model.init_from transfers the encoder)"
                )
            if saved is not None and (saved["head"], saved["head_options"]) != (now.head, now.head_options):
                # Same shapes, other meaning (pooling: cls for mean, say): the weights would be read wrongly.
                raise MtlError(
                    f"{self.workdir}: task {name!r} was trained with head {saved['head']!r} and head_options "
                    f"{saved['head_options']}, and its spec now gives {now.head!r} and {now.head_options}; put them "
                    f"back, or use a new --workdir (model.init_from transfers the encoder)"
                )
        self.positions = {name: int(meta["positions"][name]) for name in self.tasks}

    @override
    def log_extras(self) -> dict[str, float]:
        if self.config.train.loss_weighting != "uncertainty":
            return {}
        log_vars = np.asarray(self.state.params["log_vars"])
        return {f"{t}/log_var": float(v) for t, v in zip(self.tasks, log_vars, strict=True)}

    @override
    def evaluate(self, split: str = "validation") -> dict[str, float]:
        """Every task's metrics on `split` ("task/metric"), plus "aggregate": the mean of each
        task's primary metric (negated where lower is better)."""
        return self.score(self.predict(split), split)

    def predict(self, split: str) -> dict[str, SplitPredictions]:
        """Each task's predictions for every row of `split` (tasks without the split left out).
        Every process builds each batch whole, runs its part, and decodes the gathered predictions."""
        out = {}
        model_params = self.state.params["model"]
        for name in self.tasks:
            if split not in self.experiment.tasks[name].splits:
                continue

            def run(batch: dict[str, np.ndarray], name: str = name) -> dict[str, Any]:
                return self.layout.gather(self.predict_steps[name](model_params, self.layout.put_whole_batch(batch)))

            out[name] = predict_split(name, self.experiment.model.head(name), self.batchers[split][name], run)
        return out

    def score(self, predictions: dict[str, SplitPredictions], split: str) -> dict[str, float]:
        """`evaluate`'s metrics of predictions `predict(split)` made."""
        return score_splits(self.data_and_heads(predictions), predictions, split)

    def data_and_heads(self, names: Iterable[str]) -> dict[str, tuple[TaskData, Head]]:
        """{name: (its tokenized data, its head)} for the tasks `names`."""
        return {name: (self.experiment.tasks[name], self.experiment.model.head(name)) for name in names}


@dataclasses.dataclass
class SplitPredictions:
    """One task's predictions on a split, by row: each row's decoded item (`Head.decode`), and
    each row's class probabilities where the head gives them (else None)."""

    items: list[Any]
    probs: np.ndarray | None


def predict_split(name: str, head: Head, batcher: Batcher,
                  run: Callable[[dict[str, np.ndarray]], dict[str, Any]]) -> SplitPredictions:
    """Task `name`'s predictions for every row of `batcher`'s split; `run` maps a batch to its
    head's predictions on the host."""
    items, probs = [None] * batcher.size, None  # by row of the split: the batches come shortest first
    for batch in eval_batches(batcher):
        predictions = run(batch)
        real = real_rows(batch)
        rows = batch["index"][real]
        for row, item in zip(rows, decode_real_rows(name, head, predictions, batch), strict=True):
            items[row] = item
        if "probs" in predictions:
            if probs is None:
                probs = np.zeros((batcher.size, predictions["probs"].shape[-1]), np.float32)
            probs[rows] = np.asarray(predictions["probs"])[real]
    return SplitPredictions(items, probs)


def score_splits(tasks: dict[str, tuple[TaskData, Head]], predictions: dict[str, SplitPredictions],
                 split: str) -> dict[str, float]:
    """Every task's metrics ("task/metric") of its `predictions` on `split`, against the split's
    references, and "aggregate": the mean of each task's primary metric (negated where lower is
    better)."""
    results: dict[str, float] = {}
    primaries = []
    for name, predicted in predictions.items():
        data, head = tasks[name]
        references = column(data.splits[split], "tags" if head.label_kind == "tags" else "labels")
        scores = head.score(predicted.items, references)
        results.update({f"{name}/{k}": v for k, v in scores.items()})
        primaries.append(selection_value(data.spec.metric, scores[data.spec.metric]))
    results["aggregate"] = float(np.mean(primaries)) if primaries else float("nan")
    return results


def train(config: ExperimentConfig, workdir: str | Path) -> dict[str, float]:
    """Build the experiment a config describes and train it in `workdir` (resuming if possible).

    With a `distributed` config (or its environment variables), this process first joins the
    multi-process run; every process calls `train` with the same config and workdir.
    """
    from mtl.train.experiment import build_experiment

    if config.meta is not None:
        raise MtlError("this config has a `meta` section: run it with mtl meta-train")
    initialize_distributed(config.distributed)
    with primary_first("build the experiment"):
        experiment = build_experiment(config)
    return Trainer(experiment, workdir).run()


def evaluate(workdir: str | Path, split: str = "validation", checkpoint: str | int = "best",
             batch_size: int | None = None, predictions_file: str | Path | None = None) -> dict[str, float]:
    """Restore a workdir's best or latest checkpoint, or the one saved at step `checkpoint`, and
    evaluate it on `split`, in batches of `batch_size` rows (default: the config's
    train.eval_batch_size). With `predictions_file`, also write each row's prediction there as
    JSON lines (see `write_predictions`)."""
    from mtl.config import load_experiment
    from mtl.train.experiment import build_experiment

    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file() or not (workdir / "checkpoints").is_dir():
        raise MtlError(f"{workdir}: not a training workdir (no config.yaml and checkpoints/); run mtl train first")
    if predictions_file is not None:  # before the model loads and runs: a typo should not cost the evaluation
        _check_writable(Path(predictions_file))
    config = load_experiment(workdir / "config.yaml")
    if config.meta is not None:
        raise MtlError(f"{workdir}: is a meta-learning workdir; evaluate it with mtl meta-test")
    require_kept(workdir, checkpoint)  # before the model and data load
    config = dataclasses.replace(config, mesh=fit_mesh(config.mesh),
                                 train=dataclasses.replace(config.train, eval_split=split,
                                                           eval_batch_size=batch_size or config.train.eval_batch_size))
    trainer = Trainer(build_experiment(config), workdir)
    step = trainer.restore(checkpoint)
    predictions = trainer.predict(split)
    results = trainer.score(predictions, split)
    trainer.checkpointer.close()
    append_record(workdir, step, split, results)
    if predictions_file is not None:
        try:
            write_predictions(Path(predictions_file), trainer.data_and_heads(predictions), split, predictions)
        except OSError as e:
            raise MtlError(f"{predictions_file}: cannot write the predictions ({e.strerror}); the scores are in "
                           f"{workdir / 'metrics.jsonl'}") from None
    return dict(results, checkpoint_step=step)


def evaluate_on(workdir: str | Path, spec_path: str | Path, task: str | None = None, split: str = "validation",
                checkpoint: str | int = "best", batch_size: int | None = None,
                predictions_file: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict[str, float]:
    """Score one trained task's head on the data of another task spec: a new domain, another
    dataset with the task's labels, a test set of one's own. Nothing is trained: the workdir's
    encoder and head read the spec's `split` and are scored by the spec's head's metrics.

    `task` names the trained task whose head reads the data; by default the one of the spec's
    name, or a workdir's only task. The spec must use the same head and read pairs of texts if
    the task did; its labels are encoded as the task's (every one must be among them) and its
    texts cut at the task's max_length. It need not give a train split. Results are keyed by the
    spec's name ("name/metric", plus "aggregate" and "checkpoint_step"); they are printed, not
    appended to the workdir's metrics.jsonl, which records its own tasks. With
    `predictions_file`, each row's prediction is written as `evaluate` writes them; `overrides`
    are dotted overrides of the spec, as a config's tasks[].overrides."""
    from mtl.config import load_experiment
    from mtl.inference import Predictor
    from mtl.tasks import load_task

    workdir = Path(workdir)
    if predictions_file is not None:
        _check_writable(Path(predictions_file))
    spec = load_task(spec_path, overrides, training=False)
    if not (workdir / "config.yaml").is_file() or not (workdir / "checkpoints").is_dir():
        raise MtlError(f"{workdir}: not a training workdir (no config.yaml and checkpoints/); run mtl train first")
    config = load_experiment(workdir / "config.yaml")
    predictor = Predictor.from_workdir(workdir, checkpoint)
    trained = sorted(predictor.tasks)
    if task is None:
        if spec.name not in predictor.tasks and len(trained) > 1:
            raise MtlError(f"{workdir}: has no task named {spec.name!r}, as {spec.origin} is; name the task whose head "
                           f"should read it with --task, one of {trained}")
        task = spec.name if spec.name in predictor.tasks else trained[0]
    if task not in predictor.tasks:
        raise MtlError(f"{workdir}: has no task {task!r}; its tasks: {trained}")
    head_of = predictor.tasks[task]
    if spec.head != head_of.head:
        raise MtlError(f"{spec.origin}: head {spec.head!r}, but task {task!r} of {workdir} was trained with head "
                       f"{head_of.head!r}; its head can only score data of that kind")
    if (spec.columns.text_pair is not None) != head_of.text_pair:
        reads = "pairs of texts" if head_of.text_pair else "one text"
        raise MtlError(f"{spec.origin}: task {task!r} of {workdir} reads {reads} an example; columns.text_pair must "
                       f"{'name' if head_of.text_pair else 'not name'} a column here")
    head = predictor.model.head(task)
    if spec.metric not in (*head.metric_names, *head.label_metrics(predictor.labels[task])):
        raise MtlError(f"{spec.at('metric')}: {spec.metric!r} names a label task {task!r} of {workdir} was not "
                       f"trained on; its labels: {predictor.labels[task]}")
    spec = dataclasses.replace(spec, max_length=head_of.max_length)
    data = load_task_data(spec, predictor.tokenizer, labels=(
        predictor.labels[task], f"the labels task {task!r} of {workdir} was trained on"))
    if split not in data.splits:
        raise MtlError(f"{spec.origin}: has no {split!r} split to score (it has {sorted(data.splits)}); choose one "
                       "with --split")
    batcher = Batcher(data.splits[split], batch_size=batch_size or config.train.eval_batch_size
                      or config.train.batch_size, max_length=head_of.max_length,
                      pad_token_id=predictor.tokenizer.pad_token_id, buckets=config.train.buckets)
    predictions = {spec.name: predict_split(spec.name, head, batcher, lambda b: predictor.predict_batch(task, b))}
    results = score_splits({spec.name: (data, head)}, predictions, split)
    if predictions_file is not None:
        try:
            write_predictions(Path(predictions_file), {spec.name: (data, head)}, split, predictions)
        except OSError as e:
            raise MtlError(f"{predictions_file}: cannot write the predictions ({e.strerror})") from None
    return dict(results, checkpoint_step=predictor.step)


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise MtlError(f"{path}: is a directory; give a file to write the predictions to")
    parent = path.parent
    if not parent.is_dir():
        raise MtlError(f"{path}: no directory {parent} to write the predictions in")
    if not os.access(parent, os.W_OK):
        raise MtlError(f"{path}: cannot write in {parent} (permission denied)")


def write_predictions(path: Path, tasks: dict[str, tuple[TaskData, Head]], split: str,
                      predictions: dict[str, SplitPredictions]) -> None:
    """One JSON line per row of `split` and task, in the split's row order, tasks in `predictions`' order:
    {"task", "row", "origin" (the file and line, or hub split and row, it was read from), the
    input ("text" and "text_pair" or "choices", or "tokens"), the prediction as `mtl predict` prints it, and
    "gold": the reference in the same form}. The file is replaced whole once every line is built."""
    from mtl.data.pipeline import load_raw_splits
    from mtl.inference import render_prediction

    lines = []
    for name, predicted in predictions.items():
        data, head = tasks[name]
        tokenized = data.splits[split]
        raw = load_raw_splits(data.spec, need_train=False)[0][split]
        raw = raw.select(range(len(tokenized)))  # validation may be cut to the config's max_eval_examples
        origins = column(tokenized, "origin")
        if column(raw, "origin") != origins:  # both come from the same files, read the same way
            raise MtlError(f"{data.spec.origin}: the {split} rows read again differ from those evaluated; "
                           "did the data change during the evaluation?")
        kind, labels = head.label_kind, data.labels
        references = column(tokenized, "tags" if kind == "tags" else "labels")
        inputs = ({"tokens": column(raw, "tokens")} if kind == "tags" else
                  {c: column(raw, c) for c in ("text", "text_pair", "choices") if c in raw.column_names})
        for row, (item, reference) in enumerate(zip(predicted.items, references, strict=True)):
            words = inputs["tokens"][row] if kind == "tags" else None
            choices = inputs["choices"][row] if kind == "choice" else None
            probs = predicted.probs[row] if predicted.probs is not None else None
            record = {"task": name, "row": row, "origin": origins[row], **{c: v[row] for c, v in inputs.items()},
                      **render_prediction(kind, labels, item, probs, words, choices),
                      "gold": render_prediction(kind, labels, reference, None, words, choices)}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    replace_whole(path, "".join(lines))
