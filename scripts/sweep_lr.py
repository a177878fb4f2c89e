"""Sweep the learning rate with mtl's Python API (no CLI): a custom loop over the trainer's step.

    python scripts/sweep_lr.py configs/tiny.yaml --rates 3e-4 1e-3 3e-3 --steps 30

For each rate: build the experiment once per rate (same seed, so the same initialisation and
data order), run the jitted train step in this script's own loop, evaluate, and print a table.
Workdirs go under workdirs/sweep/ and are not resumed (each rate starts from step 0).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mtl.assets import enable_compilation_cache
from mtl.config import load_experiment
from mtl.hostmem import reexec_with_huge_pages
from mtl.train.experiment import build_experiment
from mtl.train.loop import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--rates", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", default="workdirs/sweep")
    args = parser.parse_args()
    # As every mtl command: this script starts again with malloc asking for huge pages, so that a
    # CPU step's fresh temporaries cost a few thousand page faults, not hundreds of thousands.
    reexec_with_huge_pages()
    # Each rate's Trainer jits its steps anew; from the cache, the rates after the first load the
    # gradient programs (which the rate does not change) instead of compiling them again.
    enable_compilation_cache()

    rows = []
    for rate in args.rates:
        config = load_experiment(args.config, [f"optim.learning_rate={rate}", f"train.steps={args.steps}"])
        workdir = Path(args.workdir) / f"lr{rate:g}"
        shutil.rmtree(workdir, ignore_errors=True)
        trainer = Trainer(build_experiment(config), workdir)
        losses = {}
        for step in range(args.steps):  # the script's own loop over the pure step
            task = trainer.tasks[trainer.sampler.task_at(step)]
            batch = trainer.streams[task].batch(trainer.positions[task])
            trainer.positions[task] += 1
            trainer.state, metrics = trainer.train_steps[task](trainer.state, batch)
            losses[task] = float(metrics["loss"])
        results = trainer.evaluate("validation")
        trainer.checkpointer.close()
        rows.append((rate, results["aggregate"], losses))
        print(f"lr {rate:g}: aggregate {results['aggregate']:.4f}, last losses "
              + ", ".join(f"{t} {v:.3f}" for t, v in losses.items()))
    best = max(rows, key=lambda r: r[1])
    print(f"best learning rate: {best[0]:g} (aggregate {best[1]:.4f})")


if __name__ == "__main__":
    main()
