"""The BERT-family encoder in Flax NNX: BERT (and MiniLM), RoBERTa (and XLM-R), DistilBERT.

The three architectures share one post-LayerNorm transformer; they differ only in what
`EncoderConfig` records: how position ids are counted (RoBERTa skips padding), whether there are
token-type embeddings (DistilBERT has none) and whether there is a pooler. Reading and writing
Hugging Face checkpoints lives in `mtl.hf`; this module knows nothing of HF names.

Layers are a Python list by default. `scan_layers=True` stacks them along a leading axis and
runs them with `nnx.scan`, so compile time does not grow with depth; but the scanned backward
pass copies every layer's saved activations into and out of the stacked buffers, which made a
MiniLM train step 6-13% slower on CPU and a BERT-base step 41% slower on an H100 (README,
Benchmarks). Deep encoders whose compile time matters more are the case for scanning.
Dropout is driven by an explicit key: `dropout_rng=None` means deterministic. The module holds
parameters only (no RNG state), so a train step can be a pure function of `nnx.split` state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mtl.errors import MtlError


def at_least_float32(x: jax.Array) -> jax.Array:
    """x in float32, or wider if it already is (float64 gradient checks stay float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), as PyTorch computes it: 0.5 * x * (1 + erf(x / sqrt 2)) in float32
    (or wider), then cast back, so bf16 inputs round once as under torch.autocast.

    Its own gradient saves only the input: autodiff of jax.nn.gelu kept two more
    [tokens, intermediate] arrays per layer for the backward pass (BERT-base at batch 256 x 128
    on an H200: device memory peak 19.9 GB before, 15.2 GB after). XLA's erf is one rational
    polynomial, where the erfc of jax.nn.gelu evaluates two branches and a division: its forward
    kernel there took 313 us a layer, this one 158 us.
    """
    xf = at_least_float32(x)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


def _gelu_forward(x):
    return gelu(x), x


def _gelu_backward(x, grad):
    xf = at_least_float32(x)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    return ((at_least_float32(grad) * (cdf + xf * pdf)).astype(grad.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)

_DROPOUT_LEVELS = 1 << 16  # a dropout decision compares 16 random bits with a threshold
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al. 2011), bit for bit what
    `jax.random`'s default generator computes, written as uint32 array ops.

    JAX lowers its own threefry for CPU as a loop of five trips, each a pass over memory, and
    XLA cannot fuse a loop into the ops that use its output. Written out, the whole hash fuses
    into the op that consumes the bits: dropout then never stores a random array.
    """
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotate_left(x2, r) ^ x1
        x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _block_counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """A distinct 64-bit counter (hi, lo) for every position of `shape`: hi is the index along
    the first axis, lo the position within the rest. Built from iotas, so it shards like x."""
    if shape[0] >= 2**32 or math.prod(shape[1:]) >= 2**32:
        raise MtlError(f"dropout over an array of shape {shape} (in 4-element blocks): the first axis and the "
                       "product of the others must each be below 2**32")
    lo, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in range(len(shape) - 1, 0, -1):
        lo = lo + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    return jax.lax.broadcasted_iota(jnp.uint32, shape, 0), lo


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest up so the
    expectation is x. `key=None` (or rate 0) returns x unchanged.

    Drawing the random bits was most of dropout's cost: jax.random.bernoulli draws 32 bits an
    element, and on CPU through a loop XLA cannot fuse (a MiniLM train step on a 2-core CPU spent
    about 13% of its time in threefry, most of it for the [batch, heads, seq, seq] attention
    masks). Here each decision takes 16 bits, and one Threefry-2x32 block (64 bits) serves four
    consecutive elements of the last axis. The block's counter is its position in x; its key is
    64 bits drawn from `key`. The rate is used to the nearest 1/65536 (0.1 drops
    6554/65536 = 0.100006), and the scale is 1 / (1 - that rate), so the output stays unbiased.
    The mask depends only on the key and each element's position, so a sharded x gets the same
    mask as an unsharded one.
    """
    if key is None or rate == 0.0:
        return x
    if not 0.0 <= rate <= 1.0:
        raise MtlError(f"dropout rate {rate!r} must be in [0, 1]")
    threshold = round(rate * _DROPOUT_LEVELS)  # drop where the 16 bits are below it
    if threshold == 0:
        return x
    if threshold == _DROPOUT_LEVELS:
        return jnp.zeros_like(x)
    *lead, last = x.shape
    blocks = (*lead, (last + 3) // 4)
    seed = jax.random.bits(key, (2,), jnp.uint32)
    words = jnp.stack(threefry2x32(seed[0], seed[1], *_block_counters(blocks)), axis=-1)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    scale = _DROPOUT_LEVELS / (_DROPOUT_LEVELS - threshold)
    return jnp.where(bits >= threshold, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


# HF `hidden_act` names. "gelu" is the exact erf form; the tanh approximations go by several names.
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Names accepted by `remat_policy`, from jax.checkpoint_policies. "nothing_saveable" is full
# rematerialisation; the dots policies keep matmul outputs and recompute the cheap elementwise
# work, which usually buys most of the memory for little compute.
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


class Buffer(nnx.Variable):
    """A non-trainable array that is still part of the checkpoint (DistilBERT's sinusoids)."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture and run options of an encoder.

    The architecture fields mirror HF's config.json (names are normalised across BERT, RoBERTa
    and DistilBERT; `mtl.hf` maps them). The last four fields are run options: they change how
    the encoder computes, not which checkpoint fits it.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # RoBERTa counts positions from pad_token_id + 1 and gives padding the position pad_token_id.
    padding_aware_positions: bool = False
    sinusoidal_positions: bool = False  # DistilBERT option: fixed, untrained position table
    with_pooler: bool = True
    # Run options.
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16"; params stay in param_dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str | None = None  # one of REMAT_POLICIES, or None for no rematerialisation
    # The HF config.json this came from, kept so that export writes back what import read.
    hf_config: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise MtlError(
                f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_heads:
            raise MtlError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise MtlError(
                f"remat_policy {self.remat_policy!r} is unknown; known: {list(REMAT_POLICIES)}"
            )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise MtlError(f"{key} {getattr(self, key)!r} must be in [0, 1]")
        for key in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, key))
            except TypeError:
                raise MtlError(f"{key} {getattr(self, key)!r} is not a dtype") from None

    @property
    def head_dim(self) -> int:
        """Each attention head's width."""
        return self.hidden_size // self.num_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest input the position table allows (RoBERTa loses pad_token_id + 1 slots)."""
        if self.padding_aware_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with `changes` (dtype, dropout, scan_layers, ...); the config is frozen."""
        return dataclasses.replace(self, **changes)


@struct.dataclass
class EncoderOutput:
    """What the encoder returns (a pytree, so it can leave a jitted function).

    Attributes:
      last_hidden_state: [batch, seq, hidden].
      pooler_output: [batch, hidden] (tanh(dense(first token))), or None without a pooler.
      hidden_states: [num_layers + 1, batch, seq, hidden] (embeddings, then each layer) when
        requested, else None.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: jax.Array | None = None


def _dense(cfg: EncoderConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        rngs=rngs,
    )


def _norm(cfg: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] as PyTorch does; E[x^2]-mean^2 loses the parity.
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
    )


def _embed(cfg: EncoderConfig, rows: int, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        rows, cfg.hidden_size,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nnx.initializers.normal(cfg.initializer_range),
        rngs=rngs,
    )


def _lookup(table: nnx.Embed, ids: jax.Array, dtype: str, vocab: jax.Array | None = None) -> jax.Array:
    """Rows `ids` of a large table (the vocabulary), gathered in the parameter dtype, then cast.

    nnx.Embed casts the table to the compute dtype before its gather, so with bf16 compute the
    backward pass scatter-adds in bf16, which XLA:GPU emits as a compare-and-swap loop
    (openxla/xla#26371); gathering in fp32 keeps the scatter on native fp32 atomics.

    With `vocab` (ascending token ids, repeats allowed) the table holds only those tokens' rows,
    row i for token vocab[i]; a token's row is its first one.
    """
    rows = ids if vocab is None else jnp.searchsorted(vocab, ids)
    return jnp.take(table.embedding[...], rows, axis=0).astype(dtype)


def _lookup_small(table: nnx.Embed, ids: jax.Array, dtype: str) -> jax.Array:
    """Rows `ids` of a small table (token types, RoBERTa's positions) as a one-hot matmul.

    The gradient of a gather is a scatter-add, and with few rows nearly every token adds into the
    same row: on a GPU those atomics serialise (a BERT-base step at batch 256 spent 75 of its
    199 ms adding 32768 token-type gradients into row 0). A one-hot matmul's gradient is a
    reduction instead. HIGHEST precision keeps it an exact copy of the rows (no TF32 rounding).
    """
    rows = table.embedding[...]
    one_hot = jax.nn.one_hot(ids, rows.shape[0], dtype=rows.dtype)
    return jnp.matmul(one_hot, rows, precision=jax.lax.Precision.HIGHEST).astype(dtype)


def sinusoidal_table(rows: int, dim: int) -> np.ndarray:
    """DistilBERT's fixed position table: sin on even features, cos on odd.

    Computed in float64 as HF does: in float32 the angles (up to `rows`) lose ~1e-6 in sin/cos.
    """
    pos = np.arange(rows, dtype=np.float64)[:, None]
    angle = pos / np.power(10000.0, 2.0 * (np.arange(dim) // 2) / dim)[None, :]
    return np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


def _frozen_row(embedded: jax.Array, is_padding: jax.Array) -> jax.Array:
    """Block gradients into the padding row, as torch.nn.Embedding(padding_idx=...) does.

    HF's word embeddings (and RoBERTa's position embeddings) are built with padding_idx, so
    fine-tuning never moves the padding vector; without this the two frameworks' updates differ.
    """
    return jnp.where(is_padding[..., None], jax.lax.stop_gradient(embedded), embedded)


class Embeddings(nnx.Module):
    """Word + position (+ token type) embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word = _embed(cfg, cfg.vocab_size, rngs)
        self.position = _embed(cfg, cfg.max_position_embeddings, rngs)
        if cfg.sinusoidal_positions:
            table = sinusoidal_table(cfg.max_position_embeddings, cfg.hidden_size)
            self.position.embedding = Buffer(jnp.asarray(table, dtype=cfg.param_dtype))
        self.token_type = _embed(cfg, cfg.type_vocab_size, rngs) if cfg.type_vocab_size else None
        self.norm = _norm(cfg, rngs)

    def position_ids(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] position ids: 0..T-1 in every row, or counted past padding (RoBERTa)."""
        if self.cfg.padding_aware_positions:
            # RoBERTa: real tokens count up from pad_token_id + 1, padding sits at pad_token_id.
            not_pad = (input_ids != self.cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(not_pad, axis=1) * not_pad + self.cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None, dropout_rng: jax.Array | None,
                 vocab: jax.Array | None = None) -> jax.Array:
        """[B, T, H] embeddings: word + position (+ token type), normalised, dropped out with
        `dropout_rng`. `vocab`: the token ids whose rows the word table holds (see Encoder.embed)."""
        cfg = self.cfg
        x = _frozen_row(_lookup(self.word, input_ids, cfg.dtype, vocab), input_ids == cfg.pad_token_id)
        position_ids = self.position_ids(input_ids)
        if cfg.padding_aware_positions:
            positions = _lookup_small(self.position, position_ids, cfg.dtype)
            positions = _frozen_row(positions, position_ids == cfg.pad_token_id)
        else:  # 0..T-1 in every row: a slice of the table, whose gradient is a sum over the batch
            if input_ids.shape[1] > cfg.max_position_embeddings:
                raise MtlError(f"sequences of {input_ids.shape[1]} tokens exceed the encoder's "
                               f"max_position_embeddings {cfg.max_position_embeddings}")
            positions = self.position.embedding[: input_ids.shape[1]].astype(cfg.dtype)[None]
        x = x + positions
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + _lookup_small(self.token_type, token_type_ids, cfg.dtype)
        return dropout(self.norm(x), self.cfg.hidden_dropout, dropout_rng)


class Layer(nnx.Module):
    """One post-LN transformer layer: self-attention, add & norm, feed-forward, add & norm."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        self.query = _dense(cfg, h, h, rngs)
        self.key = _dense(cfg, h, h, rngs)
        self.value = _dense(cfg, h, h, rngs)
        self.attention_out = _dense(cfg, h, h, rngs)
        self.attention_norm = _norm(cfg, rngs)
        self.ffn_in = _dense(cfg, h, cfg.intermediate_size, rngs)
        self.ffn_out = _dense(cfg, cfg.intermediate_size, h, rngs)
        self.ffn_norm = _norm(cfg, rngs)

    def __call__(self, x: jax.Array, mask_bias: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        """[B, T, H] -> [B, T, H]; `mask_bias` [B, 1, 1, T] is 0 on tokens and very negative on padding."""
        cfg = self.cfg
        k_attn, k_out, k_ffn = (
            jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None, None, None)
        )
        b, t, _ = x.shape
        # Dense layers, norms and dropout see [tokens, hidden]: given [batch, seq, hidden], XLA:GPU
        # copied activations into [seq, hidden, batch] layouts for the LayerNorm statistics and
        # weight gradients (a BERT-base bf16 step on an H200: 61.3 ms flat, 62.8-64.2 ms in runs
        # of the 3-D shape). Row-major reshapes cost nothing.
        x = x.reshape(b * t, -1)

        def heads(y):  # [b * t, h] -> [b * heads, t, head_dim]
            y = y.reshape(b, t, cfg.num_heads, cfg.head_dim).transpose(0, 2, 1, 3)
            return y.reshape(b * cfg.num_heads, t, cfg.head_dim)

        # One flat leading batch axis: XLA's CPU batched matmul is ~3.5x faster on this layout
        # than on a [b, t, n, d] einsum (scripts/bench_encoder.py).
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # Softmax runs in float32 whatever the compute dtype: bf16 logits lose the small
        # differences attention depends on.
        logits = at_least_float32(jnp.matmul(q, k.transpose(0, 2, 1)))
        logits = logits.reshape(b, cfg.num_heads, t, t) * (1.0 / math.sqrt(cfg.head_dim)) + mask_bias
        probs = dropout(jax.nn.softmax(logits, axis=-1), cfg.attention_dropout, k_attn)
        probs = probs.astype(v.dtype).reshape(b * cfg.num_heads, t, t)
        context = jnp.matmul(probs, v).reshape(b, cfg.num_heads, t, cfg.head_dim)
        context = context.transpose(0, 2, 1, 3).reshape(b * t, -1)
        attn = dropout(self.attention_out(context), cfg.hidden_dropout, k_out)
        x = self.attention_norm(x + attn)
        y = self.ffn_out(ACTIVATIONS[cfg.hidden_act](self.ffn_in(x)))
        return self.ffn_norm(x + dropout(y, cfg.hidden_dropout, k_ffn)).reshape(b, t, -1)


class Encoder(nnx.Module):
    """A BERT-family encoder.

    Build one from a checkpoint with `Encoder.from_pretrained(name_or_dir)`, or at random with
    `Encoder(EncoderConfig(...), rngs=nnx.Rngs(0))`. Call it with token ids and an attention mask.
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        if config.scan_layers:
            # One Layer whose every parameter has a leading [num_layers] axis.
            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Layer(config, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.pooler = _dense(config, config.hidden_size, config.hidden_size, rngs) if config.with_pooler else None

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
        output_hidden_states: bool = False,
        frozen_below: int = 0,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
          input_ids: [batch, seq] token ids.
          attention_mask: [batch, seq], 1 for real tokens and 0 for padding; None means all 1.
          token_type_ids: [batch, seq] segment ids; None means all 0. Ignored by DistilBERT.
          dropout_rng: a PRNG key to apply dropout with; None runs deterministically (eval).
          output_hidden_states: also return every layer's output (a static choice).
          frozen_below: N > 0 makes the embeddings and layers 0..N-1 constants of any
            differentiation (static). The output is the same, but the backward pass stops at
            layer N's input. Looped layers would prune that backward anyway. A scanned stack
            cannot stop mid-scan, so it runs as two scans, and the lower one has no backward.
        """
        cfg = self.config
        if dropout_rng is not None:
            embed_rng, layers_rng = jax.random.split(dropout_rng)
            layer_rngs = jax.random.split(layers_rng, cfg.num_layers)
        else:
            embed_rng = layer_rngs = None
        embedded = self.embeddings(input_ids, token_type_ids, embed_rng)
        x, states = self.run_layers(embedded, attention_mask, layer_rngs=layer_rngs,
                                    output_hidden_states=output_hidden_states, frozen_below=frozen_below)
        if output_hidden_states:
            embedded = jax.lax.stop_gradient(embedded) if frozen_below else embedded
            hidden_states = jnp.concatenate([embedded[None], states], axis=0)
        else:
            hidden_states = None
        return EncoderOutput(x, self.pool(x), hidden_states)

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None, *,
              vocab: jax.Array | None = None) -> jax.Array:
        """The deterministic embedding output [batch, seq, hidden], the input of layer 0.

        `vocab`: when the word table holds only some tokens' rows (meta-learning adapts just an
        episode's rows, not a copy of the whole vocabulary per task), their ids, ascending.
        """
        return self.embeddings(input_ids, token_type_ids, None, vocab)

    def pool(self, x: jax.Array) -> jax.Array | None:
        """The pooler output of a last hidden state, or None without a pooler."""
        return jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None

    def run_layers(self, x: jax.Array, attention_mask: jax.Array | None, start: int = 0, stop: int | None = None,
                   *, layer_rngs: jax.Array | None = None, output_hidden_states: bool = False,
                   frozen_below: int = 0) -> tuple[jax.Array, jax.Array | None]:
        """Run layers start..stop-1 on hidden states x; returns (output, [stop - start, ...] per-layer
        outputs or None).

        Meta-learning that adapts only the top layers runs the frozen lower layers once and the
        top ones in its inner loop; `__call__` is this over all layers. `layer_rngs` holds one
        dropout key per layer in the range, or None for deterministic. `frozen_below`: as
        `__call__`'s; when it is above `start`, x and the layers below it are constants of
        differentiation.
        """
        cfg = self.config
        stop = cfg.num_layers if stop is None else stop
        if not 0 <= frozen_below <= cfg.num_layers:
            raise MtlError(f"frozen_below={frozen_below} is outside the encoder's 0..{cfg.num_layers} layers")
        if not 0 <= start <= stop <= cfg.num_layers:
            raise MtlError(f"layer range {start}..{stop} is outside the encoder's 0..{cfg.num_layers}")
        split = min(max(frozen_below, start), stop)
        if split == start:
            return self._run_range(x, attention_mask, start, stop, layer_rngs, output_hidden_states)
        # Two runs (two scans, for a scanned stack, which cannot stop its backward mid-scan);
        # each takes its own slice of the dropout keys, so the output is the same as one run's.
        low_rngs, high_rngs = (None, None) if layer_rngs is None else (layer_rngs[:split - start],
                                                                       layer_rngs[split - start:])
        x, low = jax.lax.stop_gradient(
            self._run_range(x, attention_mask, start, split, low_rngs, output_hidden_states))
        x, high = self._run_range(x, attention_mask, split, stop, high_rngs, output_hidden_states)
        return x, (jnp.concatenate([low, high], axis=0) if output_hidden_states else None)

    def _run_range(self, x: jax.Array, attention_mask: jax.Array | None, start: int, stop: int,
                   layer_rngs: jax.Array | None, output_hidden_states: bool):
        cfg = self.config
        if start == stop:
            return x, (jnp.zeros((0,) + x.shape, x.dtype) if output_hidden_states else None)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        # Additive mask over keys, as HF builds it: 0 where attended, float32 min where padding.
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)

        def apply(layer: Layer, x, rng):
            return layer(x, mask_bias, rng)

        if cfg.remat_policy is not None:
            apply = nnx.remat(apply, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))

        if cfg.scan_layers:
            layers = self.layers
            if (start, stop) != (0, cfg.num_layers):  # a view of the stacked parameters' rows
                graphdef, state = nnx.split(layers)
                layers = nnx.merge(graphdef, jax.tree.map(lambda p: p[start:stop], state))

            @nnx.scan(in_axes=(nnx.Carry, 0, 0 if layer_rngs is not None else None),
                      out_axes=(nnx.Carry, 0))
            def run(x, layer, rng):
                y = apply(layer, x, rng)
                return y, (y if output_hidden_states else None)

            return run(x, layers, layer_rngs)
        outs = []
        for i in range(start, stop):
            x = apply(self.layers[i], x, None if layer_rngs is None else layer_rngs[i - start])
            outs.append(x)
        return x, (jnp.stack(outs) if output_hidden_states else None)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **run_options: Any) -> Encoder:
        """Load a HF checkpoint (config.json + safetensors) by name or directory.

        `run_options` override EncoderConfig run fields (dtype, param_dtype, scan_layers,
        remat_policy). Resolution of names goes through `mtl.assets.resolve_model`; the
        conversion is `mtl.hf.load_encoder`.
        """
        from mtl import hf  # hf imports this module; the dependency points that way

        return hf.load_encoder(name_or_dir, **run_options)

    def save_pretrained(self, directory: str) -> None:
        """Write config.json and model.safetensors that transformers loads strictly."""
        from mtl import hf

        hf.save_encoder(self, directory)
