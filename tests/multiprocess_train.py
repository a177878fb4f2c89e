"""One process of a (possibly multi-process) `mtl train` run, for tests/test_multihost.py.

    python tests/multiprocess_train.py ROWS_FILE train CONFIG [key=value ...] --workdir DIR

It is `mtl train` exactly, except that each training batch this process builds is recorded in
ROWS_FILE as one JSON line {"stream": seed, "step": position, "rows": [split rows]}, so the test
can check that a process built only its own part of each batch.
"""

import json
import sys

from mtl.cli import main
from mtl.data.batching import TrainStream

if __name__ == "__main__":
    rows_file = open(sys.argv[1], "a", buffering=1)
    build = TrainStream.batch

    def recorded(self, step, part=slice(None)):
        batch = build(self, step, part)
        rows = batch["index"][batch["weights"] > 0].tolist()
        rows_file.write(json.dumps({"stream": self.seed, "step": step, "rows": rows}) + "\n")
        return batch

    TrainStream.batch = recorded
    sys.exit(main(sys.argv[2:]))
