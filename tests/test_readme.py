"""The README's code examples run as written, and its reference tables name every config key,
task-spec key, command-line option and module there is."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import default_codegen_env

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(starting_with: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if b.startswith(starting_with)]
    assert len(matches) == 1, f"README should have one python block starting with {starting_with!r}"
    return matches[0]


def test_how_to_add_a_head_example(tmp_path, monkeypatch):
    (tmp_path / "my_heads.py").write_text(_python_block("# my_heads.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    from mtl.models.encoder import EncoderOutput
    from mtl.models.heads import HEADS, build_head

    try:
        head = build_head("my_heads:OrdinalHead", 8, ["low", "mid", "high"], {"dropout": 0.0}, rngs=nnx.Rngs(0))
        assert "ordinal" in HEADS
        encoded = EncoderOutput(jax.random.normal(jax.random.key(0), (4, 5, 8)))
        batch = {"labels": jnp.array([0, 1, 2, 1]), "weights": jnp.array([1.0, 1.0, 1.0, 0.0])}
        graphdef, params = nnx.split(head)
        loss_fn = jax.jit(lambda p: nnx.merge(graphdef, p).loss(nnx.merge(graphdef, p)(encoded, batch), batch))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        assert np.isfinite(loss) and all(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
        predictions = {k: np.asarray(v) for k, v in head.predict(head(encoded, batch), batch).items()}
        decoded = head.decode(predictions, {k: np.asarray(v) for k, v in batch.items()})
        assert len(decoded) == 3 and all(0 <= d <= 2 for d in decoded)
        assert set(head.score(decoded, [0, 1, 2])) >= {"accuracy", "macro_f1"}
    finally:
        HEADS.pop("ordinal", None)
        sys.modules.pop("my_heads", None)


# Appended to the encoder example: its jitted forward computes what the eager call did, at every
# token the mask keeps. Padding positions are computed but read by nothing (attention, pooling and
# the heads all mask them), and there the two may part further: on a Zen 3 EPYC (AVX2, no
# AVX-512), the padding position of "Hello world" came out of the jitted encoder 1.9e-5 from a
# float64 run (out of the eager one, 7.4e-7), while every real token stayed within 1.6e-6. The gap
# comes from XLA:CPU's YNNPACK dot kernels (--xla_cpu_experimental_ynn_fusion_type without
# individual_dot brought the jitted output to 4.2e-6 or less) and follows the padding position
# wherever it sits in the batch.
ENCODER_EXAMPLE_CHECK = """
import numpy as np
assert out.last_hidden_state.shape == (2, 5, 384)
jitted = forward(state, batch["input_ids"], batch["attention_mask"], None)
tokens = batch["attention_mask"].astype(bool)
assert not tokens.all()  # the example's batch has padding, so the mask below selects
np.testing.assert_allclose(np.asarray(jitted)[tokens], np.asarray(out.last_hidden_state)[tokens], atol=1e-5)
"""


@pytest.mark.slow
def test_encoder_example(tmp_path, minilm_dir):
    # A script in a process of its own, as a user runs it, with XLA's default code generation:
    # the comparison is of float32 rounding, which the tests' fast compile changes.
    (tmp_path / "example.py").write_text(_python_block("import jax, jax.numpy as jnp") + ENCODER_EXAMPLE_CHECK)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=default_codegen_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_from_python_example(tmp_path, monkeypatch, minilm_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTL_CACHE", str(Path.home() / ".cache" / "mtl"))  # the shared data cache
    block = _python_block("from mtl.config import load_experiment")
    block = block.replace('"configs/tiny.yaml"', repr(str(README.parent / "configs" / "tiny.yaml")))
    namespace: dict = {}
    exec(block, namespace)
    assert int(namespace["trainer"].state.step) == 1
    assert np.isfinite(float(namespace["metrics"]["loss"]))


# ------------------------------------------------------------- the reference tables are whole

def _fields(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> type of each field of a schema dataclass, nested dataclasses walked
    (through `X | None` and `list[X]`)."""
    import dataclasses
    import typing

    keys, hints = {}, typing.get_type_hints(cls)  # the modules' annotations are strings
    for field in dataclasses.fields(cls):
        key, kind = f"{prefix}{field.name}", hints[field.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        inner = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in inner]
        nested = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        keys[key] = kind
        if nested is not None:
            keys.update(_fields(nested, f"{key}."))
    return keys


def _documented_config_keys() -> dict[str, str]:
    """Dotted key -> its row, from the README's experiment-config tables. A row's first cell
    lists keys of one section: `train.eval_every`, `eval_split`."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = line.split("|")
        if not line.startswith("| `") or len(cells) < 4:
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        if not names:  # a command row: its `...` holds an escaped \|
            continue
        section = names[0].split(".")[0] if "." in names[0] else None
        if section not in {"model", "optim", "train", "meta", "mesh", "distributed"} and names[0] not in {"tasks", "meta"}:
            continue
        for name in names:
            rows[name if "." in name or section is None else f"{section}.{name}"] = line
    return rows


def test_every_experiment_config_key_is_in_the_readme():
    from mtl.config import ExperimentConfig

    schema = _fields(ExperimentConfig)
    rows = _documented_config_keys()
    # Each section.key has a row, and so do `tasks` and `meta`; the fields of a list's items
    # (tasks, meta.train) and of model.random_init are named in their parent's row.
    own_rows = {k for k in schema if k.count(".") == 1 and not k.startswith("tasks.")} | {"tasks", "meta"}
    assert sorted(own_rows - rows.keys()) == [], "keys the README's config tables leave out"
    assert sorted(rows.keys() - schema.keys()) == [], "README config rows for keys the schema lacks"
    for key in schema.keys() - own_rows:
        parent, _, name = key.rpartition(".")
        if parent in rows:  # not a section (model, optim, ...) nor one itself
            assert re.search(rf"\b{name}\b", rows[parent]), f"the README's row for {parent} does not name {name}"


def test_every_task_spec_key_is_in_the_readme_schema():
    import yaml

    from mtl.tasks import LOADER_KEYS, TaskSpec

    block = re.search(r"### Task-spec schema\n\n```yaml\n(.*?)```", README.read_text(), flags=re.S).group(1)

    def keys(node, prefix=""):
        found = set()
        for key, value in node.items():
            found.add(f"{prefix}{key}")
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict) and key not in {"splits", "head_options", "file_sha256"}:  # free-form maps
                    found |= keys(item, f"{prefix}{key}.")
        return found

    schema = set(_fields(TaskSpec)) - set(LOADER_KEYS)
    assert keys(yaml.safe_load(block)) == schema


def test_every_example_task_spec_in_the_readme_loads(tmp_path):
    """The worked task specs (a task on pairs, a multiple-choice one, ...) pass the spec's checks
    as written; their data is not read."""
    from mtl.tasks import load_task

    examples = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
                if b.startswith("name: ") and "\nhead: " in b and "# required" not in b]
    assert len(examples) >= 2, examples
    for i, block in enumerate(examples):
        (tmp_path / f"example{i}.yaml").write_text(block)
        spec = load_task(tmp_path / f"example{i}.yaml")
        assert block.startswith(f"name: {spec.name}\n")


def test_every_command_line_option_is_in_the_readme():
    """Each subcommand's options appear in its usage (`mtl evaluate --workdir DIR [...]`, in a
    table row or the text), and each global option as `mtl --option COMMAND`."""
    import argparse

    from mtl.cli import build_parser

    text = README.read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        usage = " ".join(re.findall(rf"`mtl {name}\b([^`]*)`", text))
        for action in command._actions:
            longest = max(action.option_strings, key=len, default=None)
            if longest not in (None, "--help"):
                assert longest in usage, f"the README's usage of mtl {name} leaves out {longest}"
    for action in parser._actions:
        if action.option_strings and "--help" not in action.option_strings:
            assert any(f"`mtl {o} COMMAND`" in text for o in action.option_strings), action.option_strings


def test_every_module_is_in_the_architecture_table():
    text = README.read_text()
    table = text[text.index("## Architecture"):text.index("## Quality")]
    package = README.parent / "mtl"
    modules = {str(p.relative_to(README.parent)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    rows = set(re.findall(r"^\| `(mtl/[^`]+\.py)` \|", table, flags=re.M))
    assert rows == modules
