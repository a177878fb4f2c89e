"""Where a run's numbers go: metrics.jsonl always, TensorBoard event files when available, and
what the run shows as it goes (`Progress`); and a profiler trace of the steps asked for
(`StepProfiler`).

(Named tracking, not logging, so that no module here shadows the standard library's logging.)
Each JSONL line is {"step": s, "kind": "train" | "eval" | "test", ...flat float metrics}.
In a multi-process run every process computes the same numbers and process 0 alone writes them.

A record is one append of one whole line, so a reader running beside the writer, or a run killed
mid-write, can leave at most an unfinished last line: readers skip it, and the next writer cuts it
off before appending.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from mtl.errors import MtlError

log = logging.getLogger(__name__)

# The per-task metrics a run and `mtl evaluate` print, beside every unprefixed one (aggregate,
# a meta-test's accuracy); metrics.jsonl keeps them all, per class too.
HEADLINE_METRICS = ("accuracy", "macro_f1", "entity_f1", "entity_precision", "entity_recall", "pearson", "spearman",
                    "micro_f1", "polarity_mae", "mse")


def headline(results: dict[str, float], primary: Collection[str] = ()) -> dict[str, float]:
    """The results worth printing: "aggregate"-style keys, "task/metric" for the metrics above,
    and the `primary` keys, each task's selected metric (a CoLA task's "mcc", say)."""
    def shown(key: str) -> bool:
        parts = key.split("/")
        return len(parts) == 1 or (len(parts) == 2 and parts[1] in HEADLINE_METRICS) or key in primary

    return {key: value for key, value in results.items() if shown(key)}


class RecordNotWritten(MtlError):
    """metrics.jsonl could not take a record (a full disk, say)."""


class MetricsWriter:
    """Appends a run's records to metrics.jsonl, and to TensorBoard event files beside it when
    tensorboardX is installed.

    The events are written in the calling thread (tensorboardX's record format and protos), not
    by its SummaryWriter's background thread: that thread died when the disk filled, its queue
    filled up behind it, and the run hung at its next log. Here a failed event write turns TensorBoard
    off with one warning, and metrics.jsonl, the record that counts, carries on; a failed append
    to it stops the run with one line.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = self._events = None
        if jax.process_index() != 0:  # one writer per run
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_unfinished_line(self.path)
            # Unbuffered, so each record reaches the file in one write() however long its line is.
            self._file = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise RecordNotWritten(f"{self.path}: cannot append to it ({e.strerror})") from None
        if tensorboard:
            self._events = _TensorBoardEvents.open(Path(workdir) / "events")

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        """Append one record {"step", "kind", **values}; a write that fails is RecordNotWritten."""
        if self._file is None:
            return
        record = {"step": int(step), "kind": kind}
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        line = memoryview((json.dumps(record, allow_nan=True) + "\n").encode())
        try:
            while line:  # a raw write may take less than it was given
                line = line[self._file.write(line):]
        except OSError as e:  # a cut line is dropped by the next writer (_drop_unfinished_line)
            raise RecordNotWritten(f"{self.path}: cannot append the step {step} record ({e.strerror})") from None
        if self._events is not None and not self._events.write(step, kind, values):
            self._events = None

    def close(self) -> None:
        """Close metrics.jsonl and the TensorBoard events."""
        if self._file is None:
            return
        self._file.close()
        if self._events is not None:
            self._events.close()


def append_record(workdir: str | Path, step: int, kind: str, values: dict[str, float]) -> None:
    """Append one record to workdir/metrics.jsonl from a command that is not a run (mtl evaluate,
    meta-test). Its caller prints the scores too, so a workdir that cannot take the record
    (read-only, a full disk) gets a warning instead of an error that would lose them."""
    try:
        writer = MetricsWriter(workdir, tensorboard=False)
        try:
            writer.write(step, kind, values)
        finally:
            writer.close()
    except RecordNotWritten as e:
        log.warning("%s; the scores are printed only", e)


def replace_whole(path: Path, text: str) -> None:
    """Write `path` as a new file, then swap it in: a reader sees the old file or the new one, and a
    write cut short (a full disk, a kill) leaves the old one, never half of the new. Raises the
    OSError, after removing the part written."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


class _TensorBoardEvents:
    """One TensorBoard event file of scalars, written and flushed in the caller's thread. After
    a failed write it warns once and closes the file; `write` then returns False."""

    FLUSH_SECONDS = 10.0  # how stale TensorBoard's view of a running run may get

    def __init__(self, directory: Path, records: Any):
        self.directory, self._records, self._flushed = directory, records, time.monotonic()

    @classmethod
    def open(cls, directory: Path) -> _TensorBoardEvents | None:
        try:
            from tensorboardX.record_writer import RecordWriter
        except ImportError:
            log.info("tensorboardX is not installed; writing metrics.jsonl only")
            return None
        from tensorboardX.proto.event_pb2 import Event

        # The name TensorBoard looks for; a resumed run starts a file of its own, as TensorBoard expects.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        try:
            directory.mkdir(exist_ok=True)
            events = cls(directory, RecordWriter(str(directory / name)))
        except OSError as e:
            log.warning("%s: cannot write TensorBoard events (%s); writing metrics.jsonl only", directory, e.strerror)
            return None
        return events if events._append(Event(wall_time=time.time(), file_version="brain.Event:2")) else None

    def write(self, step: int, kind: str, values: dict[str, float]) -> bool:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        summary = Summary(value=[scalar(f"{kind}/{key}", value).value[0] for key, value in values.items()
                                 if isinstance(value, (int, float)) and math.isfinite(value)])
        return self._append(Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        try:
            self._records.close()  # flushes first
        except OSError as e:
            self._failed(e)

    def _append(self, event: Any) -> bool:
        try:
            self._records.write(event.SerializeToString())
            if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
                self._records.flush()
                self._flushed = time.monotonic()
        except OSError as e:
            self._failed(e)
            return False
        return True

    def _failed(self, e: OSError) -> None:
        log.warning("%s: cannot write TensorBoard events (%s); TensorBoard stops here, metrics.jsonl goes on",
                    self.directory, e.strerror)
        with contextlib.suppress(OSError):
            self._records.close()  # closes the file even where its last flush fails: nothing is left to retry


def _drop_unfinished_line(path: Path) -> None:
    """Cut a last line that has no newline: the record a run was writing when it was killed or
    its disk filled up."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last record (%d bytes) left by a run that stopped mid-write", path,
                    len(data) - keep)
        os.truncate(path, keep)


def read_metrics(workdir: str | Path) -> list[dict]:
    """Every finished record of workdir/metrics.jsonl, in order; an unfinished last line is skipped."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    *finished, _unfinished = path.read_text().split("\n")
    records = []
    for lineno, line in enumerate(finished, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not a JSON record ({err.msg})") from None
    return records


# Whether runs show progress on stderr; `mtl -q` turns it off (metrics.jsonl has every record).
SHOW_PROGRESS = True


class Progress:
    """What a run shows on stderr as it goes.

    On a terminal, tqdm's bar with the latest losses. Where stderr is a file (a batch job's log,
    nohup, CI) a bar is carriage returns, so tqdm turns itself off and each logged step prints
    one line instead: step, losses, steps/s and ETA. Every evaluation prints one line in both.
    `enabled=False` (the other processes of a multi-process run), or SHOW_PROGRESS False, shows
    nothing. An evaluation line shows `headline`'s results, with `primary` its extra keys.
    """

    def __init__(self, total: int, initial: int, *, enabled: bool = True, primary: Collection[str] = (),
                 clock: Callable[[], float] = time.perf_counter):
        enabled = enabled and SHOW_PROGRESS
        self.total, self.enabled, self.primary = total, enabled, primary
        self.initial, self.clock, self.started = initial, clock, clock()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=None if enabled else True, file=sys.stderr)
        self.lines = enabled and self.bar.disable  # tqdm's own test: stderr is not a terminal

    def step(self) -> None:
        """One more step done (the bar moves; lines print only at `logged`)."""
        self.bar.update(1)

    def logged(self, step: int, losses: dict[str, float], steps_per_second: float) -> None:
        """A logged step's losses and rate: on the bar, or as one line where stderr is a file."""
        self.bar.set_postfix({name: f"{value:.4f}" for name, value in losses.items()}, refresh=False)
        if self.lines:
            # The ETA runs at the mean rate since the start, which counts the compiles and evaluations
            # still to come in their share; one window's rate swings with them.
            seconds_per_step = (self.clock() - self.started) / max(step - self.initial, 1)
            eta = tqdm.format_interval((self.total - step) * seconds_per_step)
            shown = ", ".join(f"{name} {losses[name]:.4f}" for name in sorted(losses)) or "none finite (skipped)"
            self._print(f"step {step}/{self.total}: loss {shown}; {steps_per_second:.2f} steps/s, ETA {eta}")

    def evaluated(self, step: int, split: str, results: dict[str, float]) -> None:
        """One line of an evaluation's headline scores."""
        if self.enabled:
            shown = ", ".join(f"{key} {value:.4f}" for key, value in headline(results, self.primary).items())
            self._print(f"step {step}/{self.total}: {split}: {shown}")

    def _print(self, line: str) -> None:
        # tqdm.write clears and redraws a live bar around the line. It writes the text and `end`
        # in two calls, and a Ctrl-C between them glued the interrupt warning onto the line.
        tqdm.write(line + "\n", file=sys.stderr, end="")

    def close(self) -> None:
        """Take the bar down."""
        self.bar.close()


class StepProfiler:
    """A `jax.profiler` trace of steps `start + 1` to `start + count` of a run (`train.profile_start`
    and `train.profile_steps`), for xprof, TensorBoard's profile plugin or Perfetto.

    The trace starts before the first of those steps is dispatched and stops once its last step's
    device work is done, so it holds whole steps: the host's batch building and dispatch, and each
    device op. A run that resumes inside the range traces the rest of it; one that ends inside it
    (an early stop, Ctrl-C) writes what it traced. A trace that cannot start or be written (another
    trace already running in the process, a full disk) is a warning: it never stops the run.
    """

    def __init__(self, directory: Path, start: int, count: int):
        self.directory, self.start, self.end = directory, start, start + count
        self.tracing, self.first = False, start + 1

    def before_step(self, step: int) -> None:
        """Call before dispatching 0-based step `step`."""
        if self.tracing or not self.start <= step < self.end:
            return
        try:
            jax.profiler.start_trace(str(self.directory))
        except (RuntimeError, OSError) as e:
            log.warning("no profile taken: %s", e)
            self.end = self.start  # not tried again at the next step
            return
        self.tracing, self.first = True, step + 1

    def after_step(self, done: int, outputs: Any) -> None:
        """Call after dispatching a step, with `done` steps taken and the step's outputs."""
        if self.tracing and done >= self.end:
            self.stop(done, outputs)

    def stop(self, done: int, outputs: Any = None) -> None:
        """Stop a trace in progress, after `outputs` (the last traced step's) are computed."""
        if not self.tracing:
            return
        self.tracing = False
        try:
            jax.block_until_ready(outputs)
        finally:  # an interrupted wait still ends the trace, so the process can start another
            try:
                jax.profiler.stop_trace()
            except (RuntimeError, OSError) as e:
                log.warning("the profile of steps %d-%d was not written: %s", self.first, done, e)
            else:
                log.info("profile of steps %d-%d written under %s", self.first, done, self.directory)
