"""The real all-MiniLM-L6-v2 (resolved through mtl.assets) against HF's BertModel."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mtl import Encoder, load_tokenizer

from conftest import default_codegen_env

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market crashed today.",
]


@pytest.fixture(scope="module")
def batch(minilm_dir):
    return load_tokenizer(minilm_dir)(SENTENCES, padding=True, return_tensors="np")


@pytest.fixture(scope="module")
def mtl_out(minilm_dir, batch):
    encoder = Encoder.from_pretrained(minilm_dir)
    return encoder(*(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))


def test_matches_hf_bert_model(minilm_dir, batch, mtl_out):
    model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        expected = model(**{k: torch.tensor(v) for k, v in batch.items()})
    np.testing.assert_allclose(mtl_out.last_hidden_state, expected.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(mtl_out.pooler_output, expected.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_sentence_similarities(batch, mtl_out):
    """Mean-pooled cosine similarity, as sentence-transformers computes it for this model."""
    mask = batch["attention_mask"][..., None]
    emb = (np.asarray(mtl_out.last_hidden_state) * mask).sum(1) / mask.sum(1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] == pytest.approx(0.755, abs=0.005)
    assert abs(emb[0] @ emb[2]) < 0.05


def test_jitted_forward_and_gradients_match_pytorch_as_users_compile(minilm_dir):
    """The comparison above runs eagerly, at the tests' fast compile; this one is the jitted
    forward and backward that training runs, at XLA's default code generation, in a process of
    its own (tests/minilm_parity.py says what it checks and the errors measured)."""
    script = Path(__file__).with_name("minilm_parity.py")
    proc = subprocess.run([sys.executable, str(script), str(minilm_dir)], env=default_codegen_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "looped:" in proc.stdout and "scanned:" in proc.stdout, proc.stdout
