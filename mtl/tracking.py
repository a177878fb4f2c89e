"""Where a run's numbers go: metrics.jsonl always, TensorBoard event files when available, and
what the run shows as it goes (`Progress`).

(Named tracking, not logging, so that no module here shadows the standard library's logging.)
Each JSONL line is {"step": s, "kind": "train" | "eval" | "test", ...flat float metrics}.
In a multi-process run every process computes the same numbers and process 0 alone writes them.

A record is one append of one whole line, so a reader running beside the writer, or a run killed
mid-write, can leave at most an unfinished last line: readers skip it, and the next writer cuts it
off before appending.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
from tqdm import tqdm

log = logging.getLogger(__name__)

# The per-task metrics a run and `mtl evaluate` print, beside every unprefixed one (aggregate,
# a meta-test's accuracy); metrics.jsonl keeps them all, per class too.
HEADLINE_METRICS = ("accuracy", "macro_f1", "entity_f1", "entity_precision", "entity_recall", "pearson", "spearman",
                    "micro_f1", "polarity_mae", "mse")


def headline(results: dict[str, float]) -> dict[str, float]:
    """The results worth printing: "aggregate"-style keys and "task/metric" for the metrics above."""
    def shown(key: str) -> bool:
        parts = key.split("/")
        return len(parts) == 1 or (len(parts) == 2 and parts[1] in HEADLINE_METRICS)

    return {key: value for key, value in results.items() if shown(key)}


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = self._tb = None
        if jax.process_index() != 0:  # one writer per run
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_unfinished_line(self.path)
        # Unbuffered, so each record reaches the file in one write() however long its line is.
        self._file = open(self.path, "ab", buffering=0)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("tensorboardX is not installed; writing metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(Path(workdir) / "events"))

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if self._file is None:
            return
        record = {"step": int(step), "kind": kind}
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        line = memoryview((json.dumps(record, allow_nan=True) + "\n").encode())
        while line:  # a raw write may take less than it was given
            line = line[self._file.write(line):]
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _drop_unfinished_line(path: Path) -> None:
    """Cut a last line that has no newline: the record a killed run was writing."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last record (%d bytes) left by a killed run", path,
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
    nothing.
    """

    def __init__(self, total: int, initial: int, *, enabled: bool = True, clock: Callable[[], float] = time.perf_counter):
        enabled = enabled and SHOW_PROGRESS
        self.total, self.enabled = total, enabled
        self.initial, self.clock, self.started = initial, clock, clock()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=None if enabled else True, file=sys.stderr)
        self.lines = enabled and self.bar.disable  # tqdm's own test: stderr is not a terminal

    def step(self) -> None:
        self.bar.update(1)

    def logged(self, step: int, losses: dict[str, float], steps_per_second: float) -> None:
        self.bar.set_postfix({name: f"{value:.4f}" for name, value in losses.items()}, refresh=False)
        if self.lines:
            # The ETA runs at the mean rate since the start, which counts the compiles and evaluations
            # still to come in their share; one window's rate swings with them.
            seconds_per_step = (self.clock() - self.started) / max(step - self.initial, 1)
            eta = tqdm.format_interval((self.total - step) * seconds_per_step)
            shown = ", ".join(f"{name} {losses[name]:.4f}" for name in sorted(losses)) or "none finite (skipped)"
            self._print(f"step {step}/{self.total}: loss {shown}; {steps_per_second:.2f} steps/s, ETA {eta}")

    def evaluated(self, step: int, split: str, results: dict[str, float]) -> None:
        if self.enabled:
            shown = ", ".join(f"{key} {value:.4f}" for key, value in headline(results).items())
            self._print(f"step {step}/{self.total}: {split}: {shown}")

    def _print(self, line: str) -> None:
        # tqdm.write clears and redraws a live bar around the line. It writes the text and `end`
        # in two calls, and a Ctrl-C between them glued the interrupt warning onto the line.
        tqdm.write(line + "\n", file=sys.stderr, end="")

    def close(self) -> None:
        self.bar.close()
