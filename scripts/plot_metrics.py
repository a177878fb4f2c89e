"""Plot a workdir's metrics.jsonl: one PNG per task with its train loss and validation scores.

    python scripts/plot_metrics.py workdirs/multitask        # writes workdirs/multitask/plots/*.png

Needs matplotlib (pip install matplotlib); mtl itself does not.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from mtl.tracking import read_metrics

SCORES = ("accuracy", "macro_f1", "entity_f1", "pearson", "micro_f1")


def curves(records: list[dict]) -> tuple[dict, dict]:
    """({task: {step: train loss}}, {task: {metric: {step: validation score}}}).

    A resumed run logs again the steps it replays from its last checkpoint; the later record
    of a step wins, so a curve never runs backwards.
    """
    losses, scores = defaultdict(dict), defaultdict(lambda: defaultdict(dict))
    for r in records:
        for key, value in r.items():
            if key.count("/") != 1:
                continue
            task, metric = key.split("/")
            if r["kind"] == "train" and metric == "loss":
                losses[task][r["step"]] = value
            elif r["kind"] == "eval" and metric in SCORES:
                scores[task][metric][r["step"]] = value
    return losses, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--out", help="directory for the PNGs (default: WORKDIR/plots)")
    args = parser.parse_args()
    try:
        records = read_metrics(args.workdir)
    except ValueError as err:  # a corrupt line: one message naming file and line
        raise SystemExit(str(err)) from None
    if not records:
        raise SystemExit(f"{args.workdir}: no metrics.jsonl records")
    import matplotlib  # only once there is something to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, scores = curves(records)
    out = Path(args.out or Path(args.workdir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    for task in sorted(set(losses) | set(scores)):
        fig, left = plt.subplots(figsize=(7, 4))
        if losses[task]:
            left.plot(*zip(*sorted(losses[task].items()), strict=True), color="tab:blue", label="train loss")
        left.set_xlabel("step")
        left.set_ylabel("train loss")
        right = left.twinx()
        right.set_prop_cycle(color=plt.rcParams["axes.prop_cycle"].by_key()["color"][1:])  # blue is the loss's
        for metric, points in scores[task].items():
            right.plot(*zip(*sorted(points.items()), strict=True), marker="o", label=f"validation {metric}")
        right.set_ylabel("validation score")
        left.set_title(task)
        fig.legend(loc="lower center", ncol=3, frameon=False)  # under the axes, clear of both curves
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.savefig(out / f"{task}.png", dpi=100)
        plt.close(fig)
        print(out / f"{task}.png")


if __name__ == "__main__":
    main()
