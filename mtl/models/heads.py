"""Task heads and their registry.

A head turns the encoder's output into a task's logits, and owns everything task-specific about
them: the loss, on-device predictions, host-side decoding of a batch into per-example
predictions, and the metrics (through `mtl.metrics`). The data pipeline encodes labels the way
the head's `label_kind` says.

Heads are registered by name with `@register_head("name")`. A task spec may also name a head
by dotted path, "my_package.my_module:MyHead" (or "my_package.my_module.MyHead"); the module is
imported, so a user's head needs no change to mtl. A new head is one class:

    @register_head("my_head")
    class MyHead(Head):
        label_kind = "class"
        metric_names = ("accuracy",)
        def __init__(self, hidden_size, labels, *, rngs, my_option=1.0): ...
        def __call__(self, encoded, batch, *, dropout_rng=None): ...   # -> logits
        def loss(self, logits, batch): ...                             # -> scalar
        def predict(self, logits, batch): ...                          # -> {name: [B, ...]}
        def decode(self, predictions, batch): ...                      # -> one item per real row
        def score(self, predicted, references): ...                    # -> {metric: float}
        @classmethod
        def label_metrics(cls, labels): ...  # optional: per-label keys of score's a task may select

`Head` below gives each method's types.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from typing_extensions import override

from mtl import metrics
from mtl.errors import MtlError
from mtl.models.encoder import EncoderOutput, at_least_float32, dropout

Batch = Mapping[str, jax.Array]  # a device batch, as the jitted steps see it
HostBatch = Mapping[str, np.ndarray]  # the same batch on the host, as `decode` sees it

# How the data pipeline encodes a task's labels, by the head's `label_kind`:
#   "class":  one label id per example             -> labels int32 [B]
#   "tags":   one tag per word (token tasks)        -> labels int32 [B, T], -100 off first sub-tokens
#   "scalar": one number per example               -> labels float32 [B]
#   "multi":  a set of labels per example          -> labels float32 [B, num_labels] (multi-hot)
#   "choice": the right one of K choices            -> labels int32 [B]; the inputs are [B, K, T],
#             each choice encoded with the example's text as a pair (multiple choice)
LABEL_KINDS = ("class", "tags", "scalar", "multi", "choice")
IGNORE = -100  # label id of tokens that carry no loss (special tokens, later sub-tokens, padding)

HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make a Head available to task specs under `name`."""

    def decorate(cls: type[Head]) -> type[Head]:
        if name in HEADS:
            raise MtlError(
                f"head {name!r} is already registered (by {HEADS[name].__module__}.{HEADS[name].__qualname__})"
            )
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise MtlError(f"register_head({name!r}): {cls!r} is not a subclass of mtl.models.heads.Head")
        if cls.label_kind not in LABEL_KINDS:
            raise MtlError(f"head {name!r}: label_kind {cls.label_kind!r} is not one of {LABEL_KINDS}")
        HEADS[name] = cls
        return cls

    return decorate


def get_head(name: str) -> type[Head]:
    """The head class registered as `name`, or imported from a dotted path."""
    if name in HEADS:
        return HEADS[name]
    if ":" in name or "." in name:
        module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise MtlError(f"head {name!r}: cannot import module {module_name!r} ({e})") from None
        if name in HEADS:  # the module registered it under its dotted name
            return HEADS[name]
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Head)):
            raise MtlError(f"head {name!r}: {module_name} has no Head subclass named {attr!r}")
        return cls
    raise MtlError(f"head {name!r} is unknown; known: {sorted(HEADS)} (or a dotted path 'module:Class')")


def head_option_defaults(name: str) -> dict[str, Any]:
    """The options a head's constructor takes (its keyword-only parameters), with their defaults."""
    params = inspect.signature(get_head(name).__init__).parameters
    return {p: v.default for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p != "rngs"}


def build_head(name: str, hidden_size: int, labels: Sequence[str], options: Mapping[str, Any], *,
               rngs: nnx.Rngs) -> Head:
    """Instantiate a head; an option its constructor does not take is an error naming it."""
    known = list(head_option_defaults(name))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MtlError(f"head {name!r}: unknown head_options {unknown}; known: {known}")
    return get_head(name)(hidden_size, list(labels), rngs=rngs, **options)


class Head(nnx.Module):
    """Base class of task heads; see the module docstring for the contract."""

    label_kind: ClassVar[str] = "class"
    metric_names: ClassVar[tuple[str, ...]] = ()
    # True when the order of `labels` means something, so they cannot be inferred from data.
    needs_declared_labels: ClassVar[bool] = False

    @classmethod
    def label_metrics(cls, labels: Sequence[str]) -> tuple[str, ...]:
        """The per-label metrics `score` reports for these labels, "metric/label" (none by default):
        a task may select on one, as GLUE's MRPC and QQP do on the F1 of their positive class."""
        return ()

    def __call__(self, encoded: EncoderOutput, batch: Batch, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """The task's logits from the encoder's output; dropout only when `dropout_rng` is given."""
        raise NotImplementedError

    def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """The scalar training loss of a batch; padding rows (weight 0) count for nothing."""
        raise NotImplementedError

    def predict(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """On-device predictions, {name: [B, ...]}, which `decode` reads on the host."""
        raise NotImplementedError

    def decode(self, predictions: HostBatch, batch: HostBatch) -> list[Any]:
        """Per-example predictions of the batch's real rows (weights > 0), in batch order."""
        raise NotImplementedError

    def score(self, predicted: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        """Metrics over a split: `references` is the split's `labels` column (`tags` for token tasks)."""
        raise NotImplementedError


def decode_real_rows(task: str, head: Head, predictions: HostBatch, batch: HostBatch) -> list[Any]:
    """`head.decode`, checked to give one item per real row: a user's head that decodes the
    padding rows too, or skips some, would otherwise pair predictions with the wrong examples."""
    items = list(head.decode(predictions, batch))
    real = len(real_rows(batch))
    if len(items) != real:
        raise MtlError(f"task {task!r}: {type(head).__name__}.decode returned {len(items)} items for a batch "
                       f"of {real} real rows (weights > 0); it must return one per real row, in batch order")
    return items


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    # max(.., 1e-9): an all-padding batch (weights all 0) gives loss 0, not NaN.
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def real_rows(batch: HostBatch) -> np.ndarray:
    """Positions of the batch's real rows (weights > 0), in order: what `decode` gives an item for."""
    return np.flatnonzero(np.asarray(batch["weights"]) > 0)


POOLINGS = ("pooler", "cls", "mean")


def pool(encoded: EncoderOutput, attention_mask: jax.Array, how: str) -> jax.Array:
    """One vector per example: the encoder's pooler, the first token, or the masked mean."""
    if how == "pooler":
        if encoded.pooler_output is None:
            raise MtlError("pooling 'pooler' needs an encoder with a pooler; use 'cls' or 'mean'")
        return encoded.pooler_output
    if how == "cls":
        return encoded.last_hidden_state[:, 0]
    mask = attention_mask[..., None].astype(encoded.last_hidden_state.dtype)
    return (encoded.last_hidden_state * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def _fraction(option: str, value: float) -> float:
    """`value` of a head option that must lie in [0, 1) (dropout, label_smoothing)."""
    if not 0.0 <= value < 1.0:
        raise MtlError(f"{option} {value!r} must be in [0, 1)")
    return value


def _smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float, row_weights: jax.Array,
                            class_weights: jax.Array | None = None) -> jax.Array:
    """torch's cross_entropy with `label_smoothing` (and `weight`): each row's loss is
    (1 - e) w[y] (-log p_y) + e/K sum_k w_k (-log p_k), summed over rows by `row_weights` (0 for
    filler and ignored positions) and divided by their sum of w[y]. Without class weights, w = 1:
    cross-entropy against (1 - e) one_hot(y) + e/K."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    spread = -jnp.mean(log_p if class_weights is None else log_p * class_weights, axis=-1)
    label_weights = row_weights if class_weights is None else row_weights * class_weights[labels]
    total = jnp.sum((1.0 - smoothing) * nll * label_weights + smoothing * spread * row_weights)
    return total / jnp.maximum(jnp.sum(label_weights), 1e-9)


def _dense(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class _PicksOne(Head):
    """Shared by the heads whose logits score the labels of which one is right: they predict the
    softmax over the last axis and its argmax, and decode each real row's label id."""

    @override
    def predict(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        probs = jax.nn.softmax(at_least_float32(logits), axis=-1)
        return {"label": jnp.argmax(probs, axis=-1), "probs": probs}

    @override
    def decode(self, predictions: HostBatch, batch: HostBatch) -> list[int]:
        return [int(predictions["label"][i]) for i in real_rows(batch)]


class _PooledHead(Head):
    """Shared by the heads that read one pooled vector per example."""

    def __init__(self, hidden_size: int, outputs: int, pooling: str, dropout: float, *, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise MtlError(f"pooling {pooling!r} is unknown; known: {list(POOLINGS)}")
        self.pooling = pooling
        self.dropout = _fraction("dropout", dropout)
        self.out = _dense(hidden_size, outputs, rngs)

    @override
    def __call__(self, encoded: EncoderOutput, batch: Batch, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        pooled = at_least_float32(pool(encoded, batch["attention_mask"], self.pooling))
        return self.out(dropout(pooled, self.dropout, dropout_rng))


@register_head("classification")
class ClassificationHead(_PooledHead, _PicksOne):
    """Single-label classification: softmax over `labels`, cross-entropy loss.

    Options: pooling ("pooler", "cls" or "mean"), dropout, class_weights (one weight per label,
    to counter imbalance: the loss is sum(w[y] * CE) / sum(w[y]), as torch's weighted CE),
    label_smoothing (e in [0, 1): the target puts 1 - e on the label and e/K on every class, as
    torch's `label_smoothing`, with class weights as torch weighs them too).
    """

    label_kind = "class"
    metric_names = ("accuracy", "macro_f1", "weighted_f1", "mcc")

    @override
    @classmethod
    def label_metrics(cls, labels: Sequence[str]) -> tuple[str, ...]:
        return tuple(f"{metric}/{label}" for metric in ("precision", "recall", "f1") for label in labels)

    def __init__(
        self, hidden_size: int, labels: Sequence[str], *, rngs: nnx.Rngs,
        pooling: str = "pooler", dropout: float = 0.1, class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__(hidden_size, len(labels), pooling, dropout, rngs=rngs)
        self.labels = tuple(labels)
        self.label_smoothing = _fraction("label_smoothing", label_smoothing)
        if class_weights is not None:
            if len(class_weights) != len(labels) or any(w < 0 for w in class_weights):
                raise MtlError(
                    f"class_weights needs {len(labels)} non-negative numbers (one per label), got {list(class_weights)}"
                )
            self.class_weights = nnx.Variable(jnp.asarray(class_weights, jnp.float32))
        else:
            self.class_weights = None

    @override
    def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        labels, logits = batch["labels"], at_least_float32(logits)
        class_weights = self.class_weights[...] if self.class_weights is not None else None
        if self.label_smoothing:
            return _smoothed_cross_entropy(logits, labels, self.label_smoothing, batch["weights"], class_weights)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        weights = batch["weights"]
        if class_weights is not None:
            weights = weights * class_weights[labels]
        return _weighted_mean(ce, weights)

    @override
    def score(self, predicted: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        return metrics.classification_metrics(references, predicted, self.labels)


@register_head("sentiment")
class SentimentHead(ClassificationHead):
    """Classification over an ordered polarity scale, plus a signed score.

    Unlike `classification`, the label order is part of the task: labels run from most negative
    to most positive (e.g. [negative, neutral, positive]), so they must be declared in the spec,
    never inferred. Label i has polarity -1 + 2i/(n-1), and `predict` also returns `score`, the
    expected polarity under the predicted distribution (in [-1, 1]), for users who want a number.
    Training is plain cross-entropy; `polarity_mae` reports how far the scores fall from the
    gold polarities.
    """

    needs_declared_labels = True
    metric_names = ClassificationHead.metric_names + ("polarity_mae",)

    def __init__(
        self, hidden_size: int, labels: Sequence[str], *, rngs: nnx.Rngs,
        pooling: str = "pooler", dropout: float = 0.1, class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ):
        if len(labels) < 2:
            raise MtlError(f"sentiment needs at least 2 ordered labels, got {list(labels)}")
        super().__init__(hidden_size, labels, rngs=rngs, pooling=pooling, dropout=dropout, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self.polarity = nnx.Variable(jnp.linspace(-1.0, 1.0, len(labels)))

    @override
    def predict(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        out = super().predict(logits, batch)
        out["score"] = out["probs"] @ self.polarity[...]
        return out

    @override
    def decode(self, predictions: HostBatch, batch: HostBatch) -> list[tuple[int, float]]:
        return [(int(predictions["label"][i]), float(predictions["score"][i])) for i in real_rows(batch)]

    @override
    def score(self, predicted: Sequence[tuple[int, float]], references: Sequence[int]) -> dict[str, float]:
        labels = [p[0] for p in predicted]
        out = super().score(labels, references)
        gold_polarity = np.linspace(-1.0, 1.0, len(self.labels))[np.asarray(references)]
        out["polarity_mae"] = float(np.mean(np.abs(np.array([p[1] for p in predicted]) - gold_polarity)))
        return out


@register_head("token_classification")
class TokenClassificationHead(Head):
    """Per-word tags (NER) in IOB2: a softmax over tags at every token.

    Only the first sub-token of each word carries a label and a loss (the pipeline marks the
    rest IGNORE). `decode` returns one tag id per word, read from the first sub-token; words cut
    off by truncation are predicted "O" (or the first label if there is no "O"), so scores are
    always over every gold word. Metrics are seqeval's strict IOB2 entity scores. Options:
    dropout, label_smoothing (as `classification`'s, over the labelled sub-tokens).
    """

    label_kind = "tags"
    metric_names = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")

    @override
    @classmethod
    def label_metrics(cls, labels: Sequence[str]) -> tuple[str, ...]:
        return tuple(f"entity_f1/{kind}" for kind in entity_types(labels))

    def __init__(self, hidden_size: int, labels: Sequence[str], *, rngs: nnx.Rngs, dropout: float = 0.1,
                 label_smoothing: float = 0.0):
        self.labels = tuple(labels)
        self.dropout = _fraction("dropout", dropout)
        self.label_smoothing = _fraction("label_smoothing", label_smoothing)
        self.out = _dense(hidden_size, len(labels), rngs)

    @override
    def __call__(self, encoded: EncoderOutput, batch: Batch, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        hidden = at_least_float32(encoded.last_hidden_state)
        return self.out(dropout(hidden, self.dropout, dropout_rng))

    @override
    def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        labels = batch["labels"]
        active = (labels != IGNORE) & (batch["weights"][:, None] > 0)
        labels, weights = jnp.where(active, labels, 0), active.astype(jnp.float32)
        if self.label_smoothing:
            return _smoothed_cross_entropy(logits, labels, self.label_smoothing, weights)
        return _weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), weights)

    @override
    def predict(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        return {"tags": jnp.argmax(logits, axis=-1)}

    @override
    def decode(self, predictions: HostBatch, batch: HostBatch) -> list[list[int]]:
        outside = self.labels.index("O") if "O" in self.labels else 0
        out = []
        for i in real_rows(batch):
            words = int(batch["num_words"][i])
            tags = np.full(words, outside, np.int64)
            index = np.asarray(batch["word_index"][i])
            first = index >= 0
            tags[index[first]] = np.asarray(predictions["tags"][i])[first]
            out.append(tags.tolist())
        return out

    @override
    def score(self, predicted: Sequence[list[int]], references: Sequence[list[int]]) -> dict[str, float]:
        names = self.labels
        scores = metrics.entity_metrics(
            [[names[t] for t in seq] for seq in references], [[names[t] for t in seq] for seq in predicted]
        )
        # seqeval reports the types that occur; a type neither side has scores 0, so that a task
        # selecting on its F1 always finds it.
        return {**{key: 0.0 for key in self.label_metrics(names)}, **scores}


def entity_types(tags: Sequence[str]) -> list[str]:
    """The entity types of IOB2 tags, in first-seen order: PER and LOC of [O, B-PER, I-PER, B-LOC]."""
    return list(dict.fromkeys(tag[2:] for tag in tags if tag[:2] in ("B-", "I-")))


@register_head("regression")
class RegressionHead(_PooledHead):
    """One number per example (a rating, a confidence): a linear output, mean squared error.

    `labels` names the target (for display); scores are Pearson, Spearman and MSE.
    """

    label_kind = "scalar"
    metric_names = ("pearson", "spearman", "mse")

    def __init__(
        self, hidden_size: int, labels: Sequence[str], *, rngs: nnx.Rngs, pooling: str = "pooler", dropout: float = 0.1,
    ):
        super().__init__(hidden_size, 1, pooling, dropout, rngs=rngs)
        self.labels = tuple(labels)

    @override
    def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        return _weighted_mean(jnp.square(logits[:, 0] - batch["labels"]), batch["weights"])

    @override
    def predict(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        return {"score": logits[:, 0]}

    @override
    def decode(self, predictions: HostBatch, batch: HostBatch) -> list[float]:
        return [float(predictions["score"][i]) for i in real_rows(batch)]

    @override
    def score(self, predicted: Sequence[float], references: Sequence[float]) -> dict[str, float]:
        return metrics.regression_metrics(references, predicted)


@register_head("multi_label")
class MultiLabelHead(_PooledHead):
    """Any subset of `labels` per example: independent sigmoids, binary cross-entropy.

    Options: pooling, dropout, threshold (probability above which a label is predicted).
    """

    label_kind = "multi"
    metric_names = ("micro_f1", "macro_f1")

    @override
    @classmethod
    def label_metrics(cls, labels: Sequence[str]) -> tuple[str, ...]:
        return tuple(f"f1/{label}" for label in labels)

    def __init__(
        self, hidden_size: int, labels: Sequence[str], *, rngs: nnx.Rngs,
        pooling: str = "pooler", dropout: float = 0.1, threshold: float = 0.5,
    ):
        super().__init__(hidden_size, len(labels), pooling, dropout, rngs=rngs)
        if not 0.0 < threshold < 1.0:
            raise MtlError(f"threshold {threshold!r} must be in (0, 1)")
        self.labels = tuple(labels)
        self.threshold = threshold

    @override
    def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        bce = optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(axis=-1)
        return _weighted_mean(bce, batch["weights"])

    @override
    def predict(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        probs = jax.nn.sigmoid(logits)
        return {"labels": probs > self.threshold, "probs": probs}

    @override
    def decode(self, predictions: HostBatch, batch: HostBatch) -> list[list[int]]:
        return [np.asarray(predictions["labels"][i], np.int64).tolist() for i in real_rows(batch)]

    @override
    def score(self, predicted: Sequence[list[int]], references: Sequence[list[int]]) -> dict[str, float]:
        return metrics.multilabel_metrics(np.asarray(references), np.asarray(predicted), self.labels)


@register_head("multiple_choice")
class MultipleChoiceHead(_PicksOne):
    """The right answer among K choices (SWAG, COPA, PIQA, HellaSwag), as BERT's multiple-choice head.

    Each choice is encoded with the example's text as one pair, [CLS] text [SEP] choice [SEP], so
    the encoder reads K rows per example (the model flattens the [B, K, T] inputs to B*K rows). The
    head scores each row with one linear output and takes a softmax over the example's K scores;
    the loss is cross-entropy against the right choice. `labels` name the choice positions, in
    order ("0".."K-1" unless the spec declares names such as [A, B, C, D]). An example with fewer
    than K choices comes padded with empty ones (no tokens), which get no probability. Options:
    pooling ("pooler", as transformers' BertForMultipleChoice, "cls" or "mean"), dropout.
    """

    label_kind = "choice"
    metric_names = ("accuracy",)

    def __init__(self, hidden_size: int, labels: Sequence[str], *, rngs: nnx.Rngs, pooling: str = "pooler",
                 dropout: float = 0.1):
        if len(labels) < 2:
            raise MtlError(f"multiple_choice needs at least 2 choices, got labels {list(labels)}")
        if pooling not in POOLINGS:
            raise MtlError(f"pooling {pooling!r} is unknown; known: {list(POOLINGS)}")
        self.labels = tuple(labels)
        self.pooling = pooling
        self.dropout = _fraction("dropout", dropout)
        # Its bias shifts every choice's score alike, which the softmax cannot see, so it gets no
        # gradient (nor does BertForMultipleChoice's); it is kept so that the export is that model's.
        self.out = _dense(hidden_size, 1, rngs)

    @override
    def __call__(self, encoded: EncoderOutput, batch: Batch, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        rows, choices, length = batch["attention_mask"].shape
        mask = batch["attention_mask"].reshape(rows * choices, length)  # as the encoder read them
        pooled = at_least_float32(pool(encoded, mask, self.pooling))
        scores = self.out(dropout(pooled, self.dropout, dropout_rng)).reshape(rows, choices)
        # A padding choice (no tokens) scores the lowest finite number: no probability, and no NaN
        # in a filler row whose every choice is padding.
        return jnp.where(batch["attention_mask"].any(axis=-1), scores, jnp.finfo(scores.dtype).min)

    @override
    def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
        ce = optax.softmax_cross_entropy_with_integer_labels(at_least_float32(logits), batch["labels"])
        return _weighted_mean(ce, batch["weights"])

    @override
    def score(self, predicted: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        return {"accuracy": float(np.mean(np.asarray(predicted) == np.asarray(references)))}
