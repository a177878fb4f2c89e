"""Numerical parity with HF PyTorch on tiny random models of every supported architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mtl import Encoder

from conftest import TINY_MODELS, padded_batch

TOL = 1e-5  # fp32 on CPU: both sides do the same float32 ops in a different order.


def _hf_outputs(model, ids, mask, token_types):
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    if model.config.model_type != "distilbert":
        kwargs["token_type_ids"] = torch.tensor(token_types)
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_matches_hf_pytorch(tiny_hf, name, scan_layers):
    model, directory = tiny_hf[name]
    ids, mask, token_types = padded_batch(model.config.pad_token_id)
    # RoBERTa-style models have a single segment.
    if getattr(model.config, "type_vocab_size", 2) < 2:
        token_types = np.zeros_like(token_types)
    expected = _hf_outputs(model, ids, mask, token_types)

    encoder = Encoder.from_pretrained(directory, scan_layers=scan_layers)
    out = encoder(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types), output_hidden_states=True)

    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=TOL, rtol=0)
    if name == "distilbert":
        assert out.pooler_output is None
    else:
        np.testing.assert_allclose(out.pooler_output, expected.pooler_output.numpy(), atol=TOL, rtol=0)
    hf_hidden = np.stack([h.numpy() for h in expected.hidden_states])
    assert out.hidden_states.shape == hf_hidden.shape == (3, 3, 11, 32)
    np.testing.assert_allclose(out.hidden_states, hf_hidden, atol=TOL, rtol=0)


def test_roberta_positions_skip_padding(tiny_hf):
    """RoBERTa positions start at pad_token_id + 1 and padding keeps pad_token_id."""
    encoder = Encoder.from_pretrained(tiny_hf["roberta"][1])
    ids = jnp.array([[5, 6, 7, 1, 1]])  # pad_token_id is 1
    np.testing.assert_array_equal(encoder.embeddings.position_ids(ids), [[2, 3, 4, 1, 1]])
    assert encoder.config.max_sequence_length == 64 - 2


def test_sinusoidal_distilbert_matches_hf(tmp_path):
    """DistilBERT with fixed sinusoidal positions: table and outputs match, and it is no Param."""
    import transformers
    from flax import nnx

    from mtl.models.encoder import Buffer

    config = transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99,
        max_position_embeddings=64, sinusoidal_pos_embds=True,
    )
    torch.manual_seed(0)
    model = transformers.DistilBertModel(config).eval()
    model.save_pretrained(tmp_path)
    encoder = Encoder.from_pretrained(tmp_path)
    ids, mask, _ = padded_batch(0)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = encoder(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(out.last_hidden_state, expected.last_hidden_state.numpy(), atol=TOL, rtol=0)
    assert isinstance(encoder.embeddings.position.embedding, Buffer)
    params = nnx.state(encoder, nnx.Param)
    assert "position" not in params["embeddings"]

    random_init = Encoder(encoder.config, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        random_init.embeddings.position.embedding[...],
        model.embeddings.position_embeddings.weight.detach().numpy(), atol=0, rtol=0,
    )


def test_jit_matches_eager(tiny_hf):
    from flax import nnx

    encoder = Encoder.from_pretrained(tiny_hf["bert"][1])
    ids, mask, types = (jnp.asarray(a) for a in padded_batch(0))
    graphdef, state = nnx.split(encoder)
    jitted = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a).last_hidden_state)
    np.testing.assert_allclose(jitted(state, ids, mask, types), encoder(ids, mask, types).last_hidden_state, atol=1e-6)


def test_multiple_choice_matches_bert_for_multiple_choice(tmp_path):
    """The model flattens [B, K, T] choices into B*K encoder rows and the multiple_choice head
    regroups their scores: logits and loss equal transformers' BertForMultipleChoice."""
    import transformers
    from flax import nnx

    from mtl.models.heads import MultipleChoiceHead
    from mtl.models.model import MultiTaskModel

    from conftest import BERT_LIKE

    torch.manual_seed(0)
    hf = transformers.BertForMultipleChoice(transformers.BertConfig(**BERT_LIKE)).eval()
    hf.save_pretrained(tmp_path)
    ids, mask, token_types = (np.stack([a, np.roll(a, 1, axis=0)]) for a in padded_batch(hf.config.pad_token_id))
    labels = np.array([2, 0])  # two examples of three choices each, some padded
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      token_type_ids=torch.tensor(token_types), labels=torch.tensor(labels))

    head = MultipleChoiceHead(32, ["a", "b", "c"], rngs=nnx.Rngs(0))
    head.out.kernel[...] = jnp.asarray(hf.classifier.weight.detach().numpy().T)
    head.out.bias[...] = jnp.asarray(hf.classifier.bias.detach().numpy())
    model = MultiTaskModel(Encoder.from_pretrained(tmp_path), {"choose": head})
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
             "token_type_ids": jnp.asarray(token_types), "labels": jnp.asarray(labels), "weights": jnp.ones(2)}
    loss, logits = model.loss("choose", batch)
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(loss, expected.loss.numpy(), atol=TOL, rtol=0)
