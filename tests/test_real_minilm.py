"""The real all-MiniLM-L6-v2 (resolved through mtl.assets) against HF's BertModel."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mtl import Encoder, load_tokenizer

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
