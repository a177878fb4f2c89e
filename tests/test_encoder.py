"""Encoder behaviour beyond forward parity: tracing, dropout, remat, bf16, gradients."""

import functools
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.extend.random import threefry2x32_p

from mtl import Encoder
from mtl.errors import MtlError
from mtl.hf import encoder_to_hf_tensors
from mtl.models.encoder import _block_counters, dropout, gelu, threefry2x32

from conftest import padded_batch


@pytest.fixture(scope="module")
def batch():
    return tuple(jnp.asarray(a) for a in padded_batch(0))


def _forward(encoder, **kwargs):
    """A jitted forward over split state, as training code runs it; counts its traces."""
    graphdef, state = nnx.split(encoder)
    traces = []

    @jax.jit
    def run(state, ids, mask, types, rng):
        traces.append(ids.shape)
        return nnx.merge(graphdef, state)(ids, mask, types, dropout_rng=rng, **kwargs).last_hidden_state

    return (lambda ids, mask, types, rng=None: run(state, ids, mask, types, rng)), traces


def test_jitted_forward_traces_once_per_shape(tiny_hf, batch):
    forward, traces = _forward(Encoder.from_pretrained(tiny_hf["bert"][1]))
    ids, mask, types = batch
    for shift in range(3):  # new values, same shape
        forward((ids + shift) % 99, mask, types)
    assert len(traces) == 1
    forward(ids[:, :8], mask[:, :8], types[:, :8])
    assert traces == [(3, 11), (3, 8)]


def test_dropout_is_driven_by_the_key(tiny_hf, batch):
    forward, _ = _forward(Encoder.from_pretrained(tiny_hf["bert"][1]))
    deterministic = forward(*batch)
    a = forward(*batch, jax.random.key(1))
    b = forward(*batch, jax.random.key(1))
    c = forward(*batch, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - deterministic).max() > 1e-2
    assert np.abs(a - c).max() > 1e-2


def test_dropout_drops_at_the_rate_and_keeps_the_mean():
    """Each element is dropped with the given probability (16-bit threshold, so 0.1 is 6554/65536)
    and the kept ones are scaled so the expectation is x; four elements share one 64-bit threefry
    block but not their decisions."""
    x = jnp.full((64, 128, 129), 2.0)  # 129 = 32 blocks of 4 and 1 element from a 33rd block
    y = np.asarray(dropout(x, 0.1, jax.random.key(0)))
    assert y.shape == x.shape
    kept = y != 0
    scale = 65536 / (65536 - 6554)
    np.testing.assert_array_equal(y[kept], np.float32(2.0 * scale))
    n = kept.size  # 1,056,768 decisions: the dropped fraction's std is sqrt(0.1 * 0.9 / n) = 2.9e-4
    assert abs((~kept).mean() - 6554 / 65536) < 1.5e-3
    assert abs(y.mean() - 2.0) < 5 * 2.0 * np.sqrt(0.1 / 0.9 / n)
    # The four 16-bit words of one block decide independently: any two of them agree as often as
    # chance says (262,144 blocks: the agreement's std is 7.5e-4).
    blocks = kept[..., :128].reshape(-1, 4)
    for i, j in itertools.combinations(range(4), 2):
        assert abs((blocks[:, i] == blocks[:, j]).mean() - (0.9**2 + 0.1**2)) < 3e-3, (i, j)
    np.testing.assert_array_equal(y, dropout(x, 0.1, jax.random.key(0)))
    assert (dropout(x, 0.1, jax.random.key(1)) != y).any()


def test_threefry_is_jax_threefry_and_every_block_has_its_own_counter():
    """Dropout's hash is bit for bit JAX's Threefry-2x32 primitive, and no two blocks of an array
    share a counter, so no two blocks share their bits."""
    keys = np.random.RandomState(0).randint(0, 2**32, size=(4, 1000), dtype=np.uint64).astype(np.uint32)
    k1, k2, x1, x2 = (jnp.asarray(a) for a in keys)
    ours = jax.jit(threefry2x32)(k1[0], k2[0], x1, x2)
    theirs = jax.jit(threefry2x32_p.bind)(k1[0], k2[0], x1, x2)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    for shape in [(7,), (3, 5), (2, 3, 4, 5)]:
        hi, lo = (np.asarray(c).ravel() for c in _block_counters(shape))
        assert len(set(zip(hi.tolist(), lo.tolist(), strict=True))) == math.prod(shape), shape
    too_long = jax.ShapeDtypeStruct((2, 2**32 * 4), jnp.float32)  # 2**32 blocks after the first axis
    with pytest.raises(MtlError, match=r"dropout over an array of shape \(2, 4294967296\)"):
        jax.eval_shape(lambda x: dropout(x, 0.1, jax.random.key(0)), too_long)


def test_dropout_edges_and_gradient():
    x = jnp.arange(1.0, 9.0).reshape(2, 4)
    assert dropout(x, 0.3, None) is x
    assert dropout(x, 0.0, jax.random.key(0)) is x
    np.testing.assert_array_equal(dropout(x, 1.0, jax.random.key(0)), np.zeros((2, 4)))
    with pytest.raises(MtlError, match=r"dropout rate 1.5 must be in \[0, 1\]"):
        dropout(x, 1.5, jax.random.key(0))
    key = jax.random.key(4)
    y = dropout(x, 0.5, key)
    grad = jax.grad(lambda x: dropout(x, 0.5, key).sum())(x)
    np.testing.assert_array_equal(grad, np.where(y != 0, 2.0, 0.0))
    half = dropout(jnp.ones((8, 8), jnp.bfloat16), 0.5, key)
    assert half.dtype == jnp.bfloat16 and set(np.unique(np.asarray(half, np.float32))) <= {0.0, 2.0}


def test_scan_and_loop_agree_with_dropout(tiny_hf, batch):
    """The same key drops the same units in both layer layouts (per-layer keys line up)."""
    key = jax.random.key(3)
    scanned, _ = _forward(Encoder.from_pretrained(tiny_hf["bert"][1], scan_layers=True))
    looped, _ = _forward(Encoder.from_pretrained(tiny_hf["bert"][1], scan_layers=False))
    np.testing.assert_allclose(scanned(*batch, key), looped(*batch, key), atol=1e-6, rtol=0)


def _assert_gradients_close(actual, expected, key):
    """Gradient equality up to float32 reassociation, measured against the tensor's scale.

    Embedding-row gradients are sums of terms up to ~150 that nearly cancel, so per-element
    relative error means nothing; against max|grad| the measured error is 1.4e-7 to 3e-7
    (1-2 ulps, for both remat and PyTorch); 1e-6 allows 8. The floor of 1.0 on the scale covers
    tensors whose exact gradient is zero (the key bias: softmax ignores a per-query constant),
    where both sides hold roundoff of ~1e-9.
    """
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(actual, expected, atol=1e-6 * scale, rtol=0, err_msg=key)


def _grads(encoder, batch, target):
    graphdef, params = nnx.split(encoder, nnx.Param)
    ids, mask, types = batch

    def loss(params):
        out = nnx.merge(graphdef, params)(ids, mask, types)
        pooled = 0.0 if out.pooler_output is None else jnp.sum(out.pooler_output)  # DistilBERT has no pooler
        return jnp.sum(out.last_hidden_state * target) + pooled

    return nnx.merge(graphdef, jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_layers_in_two_ranges_equal_the_whole_encoder(tiny_hf, batch, scan_layers):
    """Meta-learning runs the lower layers once and the top ones in its inner loop: the two
    ranges, and each range's per-layer outputs, equal one full forward."""
    encoder = Encoder.from_pretrained(tiny_hf["bert"][1], scan_layers=scan_layers)
    ids, mask, types = batch
    whole = encoder(ids, mask, types, output_hidden_states=True)
    lower, lower_states = encoder.run_layers(encoder.embed(ids, types), mask, 0, 1, output_hidden_states=True)
    top, top_states = encoder.run_layers(lower, mask, 1, output_hidden_states=True)
    np.testing.assert_allclose(top, whole.last_hidden_state, atol=1e-6, rtol=0)
    np.testing.assert_allclose(jnp.concatenate([lower_states, top_states]), whole.hidden_states[1:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.pool(top), whole.pooler_output, atol=1e-6, rtol=0)
    assert encoder.run_layers(top, mask, 2, 2)[0] is top
    with pytest.raises(MtlError, match="layer range 1..3 is outside the encoder's 0..2"):
        encoder.run_layers(top, mask, 1, 3)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_frozen_below_stops_the_gradient_and_changes_nothing_else(tiny_hf, batch, scan_layers):
    """frozen_below=1 (of 2): the same outputs, dropout included; exactly zero gradient for the
    embeddings and layer 0, even through the hidden states they output; layer 1 and the pooler
    get the gradient the whole encoder gives them."""
    encoder = Encoder.from_pretrained(tiny_hf["bert"][1], scan_layers=scan_layers)
    graphdef, params = nnx.split(encoder, nnx.Param)
    ids, mask, types = batch
    target = jax.random.normal(jax.random.key(0), (3, 11, 32))

    @functools.partial(jax.jit, static_argnums=1)
    def run(params, frozen_below):
        def loss(params):
            out = nnx.merge(graphdef, params)(ids, mask, types, dropout_rng=jax.random.key(4),
                                              output_hidden_states=True, frozen_below=frozen_below)
            return jnp.sum(out.last_hidden_state * target) + jnp.sum(out.pooler_output) + jnp.sum(out.hidden_states), out

        return jax.grad(loss, has_aux=True)(params)

    (whole_grads, whole), (grads, frozen) = run(params, 0), run(params, 1)
    whole_grads, grads = (encoder_to_hf_tensors(nnx.merge(graphdef, g)) for g in (whole_grads, grads))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert grads.keys() == whole_grads.keys()
    for key in grads:
        if key.startswith(("embeddings.", "encoder.layer.0.")):
            assert not np.any(grads[key]), key
            assert np.any(whole_grads[key]), key  # the whole encoder's is not zero
        else:
            _assert_gradients_close(grads[key], whole_grads[key], key)
    with pytest.raises(MtlError, match="frozen_below=3 is outside the encoder's 0..2 layers"):
        encoder(ids, mask, types, frozen_below=3)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_changes_memory_not_results(tiny_hf, batch, policy):
    target = jax.random.normal(jax.random.key(0), (3, 11, 32))
    plain = encoder_to_hf_tensors(_grads(Encoder.from_pretrained(tiny_hf["bert"][1]), batch, target))
    remat = encoder_to_hf_tensors(
        _grads(Encoder.from_pretrained(tiny_hf["bert"][1], remat_policy=policy), batch, target)
    )
    assert remat.keys() == plain.keys()
    for key in plain:
        _assert_gradients_close(remat[key], plain[key], key)


@pytest.mark.parametrize("arch, scan_layers", [("bert", True), ("bert", False), ("roberta", True),
                                               ("xlm-roberta", False), ("distilbert", False)],
                         ids=["bert-scan", "bert-loop", "roberta-scan", "xlm-roberta-loop", "distilbert-loop"])
def test_gradients_match_pytorch_autograd(tiny_hf, batch, arch, scan_layers):
    # RoBERTa's padding-aware positions and single token type go through the one-hot lookup;
    # DistilBERT has its own layer names, no token types and no pooler.
    model, directory = tiny_hf[arch]
    if arch in ("roberta", "xlm-roberta"):  # its pad id, and one token type
        ids, mask, _ = (jnp.asarray(a) for a in padded_batch(model.config.pad_token_id))
        batch = (ids, mask, jnp.zeros_like(ids))
    if arch == "distilbert":
        batch = (*batch[:2], None)
    target = np.random.RandomState(0).randn(3, 11, 32).astype(np.float32)
    encoder = Encoder.from_pretrained(directory, scan_layers=scan_layers)
    grads = encoder_to_hf_tensors(_grads(encoder, batch, jnp.asarray(target)))

    model.zero_grad()
    inputs = dict(zip(("input_ids", "attention_mask", "token_type_ids"), batch, strict=True))
    out = model(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items() if v is not None})
    pooled = torch.sum(out.pooler_output) if arch != "distilbert" else 0.0
    (torch.sum(out.last_hidden_state * torch.tensor(target)) + pooled).backward()
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    model.zero_grad()
    assert grads.keys() == torch_grads.keys()
    for key in grads:
        _assert_gradients_close(grads[key], torch_grads[key], key)


def test_bfloat16_compute_keeps_float32_params(tiny_hf, batch):
    directory = tiny_hf["bert"][1]
    fp32 = Encoder.from_pretrained(directory)(*batch).last_hidden_state
    encoder = Encoder.from_pretrained(directory, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
    bf16 = encoder(*batch).last_hidden_state
    assert bf16.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (relative 2^-8 = 0.004 per rounding); through two layers of
    # LayerNorm'd activations of unit scale the error stays a few hundredths.
    assert np.abs(np.asarray(bf16, np.float32) - np.asarray(fp32)).max() < 0.05


@pytest.mark.parametrize("arch", ["bert", "roberta"])  # two token types; padding-aware positions
def test_embedding_gradients_scatter_only_into_the_vocabulary_in_float32(tiny_hf, batch, arch):
    """A gather's gradient is a scatter-add; into a small table (token types, positions) nearly
    every token adds into the same row, which serialises on a GPU, and a bf16 scatter-add is a
    compare-and-swap loop there. So the one scatter-add left is the word table's, in fp32."""
    encoder = Encoder.from_pretrained(tiny_hf[arch][1], dtype="bfloat16")
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    if arch == "roberta":
        ids, mask, _ = batch
        batch = (ids, mask, jnp.zeros_like(ids))

    def loss(params, ids, mask, types):
        return nnx.merge(graphdef, params, rest)(ids, mask, types).last_hidden_state.astype(jnp.float32).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, *batch))
    scatters = [line.strip() for line in jaxpr.splitlines() if re.search(r"= scatter", line)]
    assert len(scatters) == 1, scatters
    assert scatters[0].split("=")[0].strip().endswith(":f32[99,32]"), scatters  # [vocab, hidden] in float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_matches_pytorch(dtype):
    # torch computes a bf16 GELU in float32 and rounds once (as under autocast); so does ours.
    x = np.asarray(jnp.asarray(np.random.RandomState(0).randn(4096) * 4, dtype).astype(jnp.float32))
    ours = np.asarray(gelu(jnp.asarray(x, dtype)).astype(jnp.float32))
    theirs = torch.nn.functional.gelu(torch.tensor(x).to(getattr(torch, dtype))).float().numpy()
    # Both take 0.5 * x * (1 + erf(x / sqrt 2)) in float32 with their own erf: below x = -3 the
    # sum 1 + erf cancels, so there the two differ by float32 steps of 1 (6e-8, times |x| / 2).
    body = x >= -3
    if dtype == "bfloat16":  # the same bf16 value, or the two sides of one rounding boundary
        np.testing.assert_array_equal(ours[body], theirs[body])
        np.testing.assert_allclose(ours[~body], theirs[~body], rtol=2**-7, atol=1e-6)
    else:  # a float32 step of the largest outputs (|x| < 16) is 1.9e-6
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)


def test_gelu_gradient_is_exact_and_saves_only_its_input():
    jax.config.update("jax_enable_x64", True)
    try:
        x = jnp.asarray(np.random.RandomState(0).randn(512) * 4)
        # Against autodiff of jax.nn.gelu in float64: the same derivative, to rounding.
        expected = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
        np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), expected, rtol=1e-13, atol=1e-15)
        # What the backward pass keeps alive: the vjp closure's arrays are the residuals.
        saved = [leaf for leaf in jax.tree.leaves(jax.vjp(gelu, x)[1]) if leaf.shape == x.shape]
        assert len(saved) == 1 and saved[0] is x
        autodiff = jax.vjp(lambda v: jax.nn.gelu(v, approximate=False), x)[1]
        assert len([leaf for leaf in jax.tree.leaves(autodiff) if leaf.shape == x.shape]) >= 2
    finally:
        jax.config.update("jax_enable_x64", False)


def test_sequences_longer_than_the_position_table_are_an_error(tiny_hf):
    encoder = Encoder.from_pretrained(tiny_hf["bert"][1])  # 64 positions
    ids = jnp.ones((1, 65), jnp.int32)
    with pytest.raises(MtlError, match="65 tokens exceed the encoder's max_position_embeddings 64"):
        encoder(ids, jnp.ones_like(ids))
