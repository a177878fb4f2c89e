"""The README's code examples run as written."""

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


# Appended to the encoder example: its jitted forward computes what the eager call did.
ENCODER_EXAMPLE_CHECK = """
import numpy as np
assert out.last_hidden_state.shape == (2, 5, 384)
jitted = forward(state, batch["input_ids"], batch["attention_mask"], None)
np.testing.assert_allclose(jitted, out.last_hidden_state, atol=1e-5)
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
