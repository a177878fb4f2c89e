"""A head defined in a test module, named by dotted path in a spec, trains through a jitted step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtl import Encoder, EncoderConfig, load_tokenizer
from mtl.data import Batcher, TrainStream, load_task_data
from mtl.errors import MtlError
from mtl.models import MultiTaskModel, build_head
from mtl.models.heads import decode_real_rows
from mtl.tasks import load_task

from data_helpers import write_task
from user_heads import MeanPoolRegression


def test_user_head_trains(tmp_path, isolated_cache, minilm_dir):
    rows = "\n".join(json.dumps({"text": "good " * (i % 5 + 1), "y": i % 5}) for i in range(40))
    spec = {"name": "toy_score", "head": "user_heads:MeanPoolRegression", "metric": "mse",
            "head_options": {"scale": 2.0}, "source": {"format": "jsonl", "files": ["d.jsonl"]},
            "columns": {"text": "text", "label": "y"}, "max_length": 16,
            "split": {"seed": 0, "train": 0.8, "validation": 0.2, "test": 0.0}}
    spec = load_task(write_task(tmp_path, spec, {"d.jsonl": rows}))
    tokenizer = load_tokenizer(minilm_dir)
    data = load_task_data(spec, tokenizer)

    config = EncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=37, max_position_embeddings=64)
    rngs = nnx.Rngs(0)
    head = build_head(spec.head, config.hidden_size, data.labels, spec.head_options, rngs=rngs)
    model = MultiTaskModel(Encoder(config, rngs=rngs), {spec.name: head})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    traces = []

    @jax.jit
    def train_step(params, opt_state, batch, rng):
        traces.append(1)

        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(spec.name, batch, dropout_rng=rng)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = TrainStream(Batcher(data.splits["train"], batch_size=8, max_length=16, pad_token_id=0), seed=0).batch(0)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    before = jax.tree.map(np.asarray, params)
    losses = []
    for step in range(20):
        params, opt_state, loss = train_step(params, opt_state, batch, jax.random.fold_in(jax.random.key(0), step))
        losses.append(float(loss))
    assert len(traces) == 1
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    flat_before = dict(nnx.to_flat_state(before))
    unchanged = sorted(".".join(map(str, path)) for path, value in nnx.to_flat_state(params)
                       if np.array_equal(np.asarray(value[...]), np.asarray(flat_before[path][...])))
    # Everything moved but the pooler, which this mean-pooling head never reads.
    assert unchanged == ["encoder.pooler.bias", "encoder.pooler.kernel"]


class DecodesEveryRow(MeanPoolRegression):
    """A user's mistake: decodes the padding rows as well as the real ones."""

    def decode(self, predictions, batch):
        return [float(score) for score in predictions["score"]]


def test_decode_must_give_one_item_per_real_row():
    batch = {"weights": np.array([1, 1, 1, 0], np.float32)}  # the last row pads the batch
    predictions = {"score": np.array([0.5, 1.5, 2.5, 9.0], np.float32)}
    assert decode_real_rows("toy_score", MeanPoolRegression(32, [], rngs=nnx.Rngs(0)), predictions, batch) == [
        0.5, 1.5, 2.5]
    with pytest.raises(MtlError) as error:
        decode_real_rows("toy_score", DecodesEveryRow(32, [], rngs=nnx.Rngs(0)), predictions, batch)
    assert str(error.value) == ("task 'toy_score': DecodesEveryRow.decode returned 4 items for a batch of 3 real rows "
                                "(weights > 0); it must return one per real row, in batch order")
