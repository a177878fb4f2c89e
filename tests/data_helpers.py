"""Small task files written by tests: a spec plus its data, in a temporary directory."""

import textwrap
from pathlib import Path

import yaml


def write_task(directory: Path, spec: dict, files: dict[str, str | bytes]) -> Path:
    """Write data files and `task.yaml` (named after spec['name']) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


CSV_SPEC = {
    "name": "toy_csv",
    "head": "classification",
    "metric": "accuracy",
    "labels": ["neg", "pos"],
    "source": {"format": "csv", "files": ["data.csv"]},
    "columns": {"text": "review", "label": "stars"},
    "split": {"seed": 0, "train": 0.5, "validation": 0.25, "test": 0.25},
}

CSV_DATA = """
review,stars
great film,pos
"dull, slow
and long",neg
loved it,pos
hated it,neg
fine,pos
awful,neg
superb,pos
boring,neg
"""

CONLL_SPEC = {
    "name": "toy_ner",
    "head": "token_classification",
    "metric": "entity_f1",
    "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    "source": {"format": "conll", "splits": {"train": ["train.txt"], "validation": ["dev.txt"]}},
}

CONLL_TRAIN = """
John B-PER
Smith I-PER
visited O
Paris B-LOC

-DOCSTART- O

Mary B-PER
lives O
in O
New B-LOC
York I-LOC
"""

CONLL_DEV = """
Anne B-PER
left O
"""
