"""Export is the exact inverse of import, and transformers loads what mtl writes, strictly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mtl import Encoder, EncoderConfig

from conftest import TINY_MODELS, padded_batch


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(nnx.to_pure_dict(nnx.state(a)))
    leaves_b, tree_b = jax.tree.flatten(nnx.to_pure_dict(nnx.state(b)))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


def _strict_hf_load(directory):
    model, info = transformers.AutoModel.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info.get("error_msgs")
    return model.eval()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_export_loads_strictly_in_transformers(tiny_hf, tmp_path, name):
    original, directory = tiny_hf[name]
    encoder = Encoder.from_pretrained(directory)
    encoder.save_pretrained(tmp_path)

    reloaded = _strict_hf_load(tmp_path)
    assert type(reloaded) is type(original)
    # Every tensor comes back bit for bit: export is the inverse of import.
    original_sd, reloaded_sd = original.state_dict(), reloaded.state_dict()
    assert original_sd.keys() == reloaded_sd.keys()
    for key in original_sd:
        torch.testing.assert_close(reloaded_sd[key], original_sd[key], rtol=0, atol=0)

    ids, mask, _ = padded_batch(original.config.pad_token_id)
    with torch.no_grad():
        expected = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = encoder(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("save_scanned,load_scanned", [(True, True), (True, False), (False, True)])
def test_save_then_load_gives_identical_params(tiny_hf, tmp_path, save_scanned, load_scanned):
    encoder = Encoder.from_pretrained(tiny_hf["bert"][1], scan_layers=save_scanned)
    encoder.save_pretrained(tmp_path)
    again = Encoder.from_pretrained(tmp_path, scan_layers=load_scanned)
    if save_scanned == load_scanned:
        _assert_trees_equal(encoder, again)
    else:
        reference = Encoder.from_pretrained(tiny_hf["bert"][1], scan_layers=load_scanned)
        _assert_trees_equal(reference, again)


def test_random_encoder_exports_a_valid_hf_checkpoint(tmp_path):
    """An encoder built from an EncoderConfig alone (no imported config.json) still exports."""
    config = EncoderConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=37, max_position_embeddings=64)
    encoder = Encoder(config, rngs=nnx.Rngs(0))
    encoder.save_pretrained(tmp_path)
    reloaded = _strict_hf_load(tmp_path)
    assert isinstance(reloaded, transformers.BertModel)
    ids, mask, types = padded_batch(0)
    with torch.no_grad():
        expected = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            token_type_ids=torch.tensor(types))
    out = encoder(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.pooler_output, expected.pooler_output.numpy(), atol=1e-5, rtol=0)


def test_task_checkpoint_with_prefix_and_heads_loads_the_encoder(tmp_path):
    """BertForMaskedLM keys carry `bert.` and an MLM head (`cls.*`): the encoder part loads."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**{k: v for k, v in TINY_MODELS["bert"][1].to_dict().items()
                                        if k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "intermediate_size",
                                                 "max_position_embeddings")})
    model = transformers.BertForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    encoder = Encoder.from_pretrained(tmp_path)
    ids, mask, _ = padded_batch(0)
    with torch.no_grad():
        expected = model.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = encoder(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.pooler_output, expected.pooler_output.numpy(), atol=1e-5, rtol=0)
