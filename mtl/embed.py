"""Sentence embeddings: mean-pooled encoder outputs, as sentence-transformers computes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl.models.encoder import Encoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average the hidden states of real tokens (mask 1), ignoring padding."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


def embed_sentences(encoder: Encoder, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str],
                    max_length: int = 128) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, [len(sentences), hidden]."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def run(state, input_ids, attention_mask, token_type_ids):
        out = nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids)
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

    types = batch.get("token_type_ids", np.zeros_like(batch["input_ids"]))
    return np.asarray(run(state, batch["input_ids"], batch["attention_mask"], types))
