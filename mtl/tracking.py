"""Where a run's numbers go: metrics.jsonl always, TensorBoard event files when available.

(Named tracking, not logging, so that no module here shadows the standard library's logging.)
Each JSONL line is {"step": s, "kind": "train" | "eval" | "test", ...flat float metrics}.
In a multi-process run every process computes the same numbers and process 0 alone writes them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = self._tb = None
        if jax.process_index() != 0:  # one writer per run
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
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
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
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


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
