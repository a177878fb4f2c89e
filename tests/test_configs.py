"""The shipped experiment configs load as they stand, name what exists, and say how to run them."""

from pathlib import Path

import pytest

from mtl.config import load_experiment
from mtl.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _classes(labels: list[str]) -> set[str]:
    """What an episode source's `classes` may name: the labels, or for IOB2 tags the entity types."""
    return {label[2:] for label in labels if label != "O"} if "O" in labels else set(labels)


def test_the_configs_are_the_ones_the_readme_lists():
    readme = (ROOT / "README.md").read_text()
    assert len(CONFIGS) == 8
    for path in CONFIGS:
        assert f"`configs/{path.name}`" in readme or f"`{path.name}`" in readme, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_loads_and_says_how_to_run_it(path):
    config = load_experiment(path)
    specs = {spec.name: spec for spec in load_tasks([t.task for t in config.tasks], [t.overrides for t in config.tasks])}
    command = "meta-train" if config.meta is not None else "train"
    assert f"\n#   mtl {command} configs/{path.name} --workdir workdirs/{path.stem}\n" in path.read_text()
    if config.meta is not None:
        for source in config.meta.train + config.meta.test + (config.meta.eval or []):
            spec = specs[Path(source.task).stem if source.task.endswith(".yaml") else source.task]
            assert spec.labels is not None, f"{source.task}: classes can only be checked against declared labels"
            assert set(source.classes or []) <= _classes(spec.labels), (path.name, source)
