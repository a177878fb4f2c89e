"""Head losses, predictions and metrics against values computed by hand; the head registry."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtl import MtlError, metrics
from mtl.models.encoder import EncoderOutput
from mtl.models.heads import (
    HEADS,
    IGNORE,
    ClassificationHead,
    Head,
    MultiLabelHead,
    MultipleChoiceHead,
    RegressionHead,
    SentimentHead,
    TokenClassificationHead,
    build_head,
    get_head,
    pool,
    register_head,
)


def _log_softmax(row):
    row = np.asarray(row, np.float64)
    return row - np.log(np.exp(row).sum())


def _batch(**arrays):
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_classification_loss_is_weighted_mean_cross_entropy():
    head = ClassificationHead(4, ["a", "b", "c"], rngs=nnx.Rngs(0))
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    batch = _batch(labels=[0, 2, 1], weights=[1.0, 1.0, 0.0])  # the third row is filler
    expected = -(_log_softmax([2, 0, 0])[0] + _log_softmax([0, 1, 0])[2]) / 2
    assert float(head.loss(logits, batch)) == pytest.approx(expected, rel=1e-6)


def test_class_weights_follow_torch_weighted_cross_entropy():
    head = ClassificationHead(4, ["a", "b", "c"], rngs=nnx.Rngs(0), class_weights=[1.0, 1.0, 3.0])
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    batch = _batch(labels=[0, 2], weights=[1.0, 1.0])
    ce = [-_log_softmax([2, 0, 0])[0], -_log_softmax([0, 1, 0])[2]]
    assert float(head.loss(logits, batch)) == pytest.approx((1 * ce[0] + 3 * ce[1]) / 4, rel=1e-6)
    with pytest.raises(MtlError, match=r"class_weights needs 3 non-negative numbers"):
        ClassificationHead(4, ["a", "b", "c"], rngs=nnx.Rngs(0), class_weights=[1.0, 2.0])


@pytest.mark.parametrize("class_weights", [None, [1.0, 0.5, 3.0]])
def test_label_smoothing_follows_torch(class_weights):
    import torch

    logits = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    labels, weights = [0, 2, 1, 2, 0], [1.0, 1.0, 1.0, 1.0, 0.0]  # the last row is filler
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:4]), torch.tensor(labels[:4]), label_smoothing=0.2,
        weight=torch.tensor(class_weights) if class_weights else None)
    for cls in (ClassificationHead, SentimentHead):
        head = cls(4, ["a", "b", "c"], rngs=nnx.Rngs(0), class_weights=class_weights, label_smoothing=0.2)
        assert float(head.loss(jnp.asarray(logits), _batch(labels=labels, weights=weights))) == \
            pytest.approx(float(expected), rel=1e-6)
    # Token tags: ignored sub-tokens and filler rows take no part, as torch's ignore_index.
    tags = np.array([[0, IGNORE, 2, 1, 2], [1, 0, IGNORE, IGNORE, 0]])
    token_logits = np.random.default_rng(1).normal(size=(2, 5, 3)).astype(np.float32)
    expected = torch.nn.functional.cross_entropy(torch.tensor(token_logits[0]), torch.tensor(tags[0]),
                                                 ignore_index=IGNORE, label_smoothing=0.2)
    head = TokenClassificationHead(4, ["O", "B-X", "I-X"], rngs=nnx.Rngs(0), label_smoothing=0.2)
    loss = head.loss(jnp.asarray(token_logits), _batch(labels=tags, weights=[1.0, 0.0]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(MtlError, match=r"^label_smoothing 1.0 must be in \[0, 1\)$"):
        ClassificationHead(4, ["a", "b"], rngs=nnx.Rngs(0), label_smoothing=1.0)


def test_classification_decode_and_score():
    head = ClassificationHead(4, ["a", "b"], rngs=nnx.Rngs(0))
    predictions = head.predict(jnp.array([[3.0, 1.0], [0.0, 2.0], [9.0, 0.0]]), {})
    decoded = head.decode({k: np.asarray(v) for k, v in predictions.items()}, {"weights": np.array([1, 1, 0])})
    assert decoded == [0, 1]
    scores = head.score([0, 1, 1, 1], [0, 1, 0, 1])
    assert scores["accuracy"] == 0.75
    # a: P=1, R=1/2, F1=2/3; b: P=2/3, R=1, F1=4/5; macro = (2/3 + 4/5) / 2
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores["recall/a"] == 0.5 and scores["precision/b"] == pytest.approx(2 / 3)
    # Matthews, b positive: TP=2, TN=1, FP=1, FN=0 -> (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1)
    assert scores["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_mcc_over_several_classes_and_one():
    head = ClassificationHead(4, ["a", "b", "c"], rngs=nnx.Rngs(0))
    # Gorodkin's K-class form: (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), with c=3 right of s=5,
    # t=(2, 2, 1) true and p=(1, 2, 2) predicted per class.
    expected = (3 * 5 - (2 * 1 + 2 * 2 + 1 * 2)) / math.sqrt((25 - (1 + 4 + 4)) * (25 - (4 + 4 + 1)))
    assert head.score([0, 1, 2, 1, 2], [0, 0, 1, 1, 2])["mcc"] == pytest.approx(expected)
    with warnings.catch_warnings():  # one class on both sides: 0, and no sklearn warning
        warnings.simplefilter("error")
        scores = head.score([1, 1, 1], [1, 1, 1])
    assert scores["mcc"] == 0.0 and scores["accuracy"] == 1.0


def test_sentiment_score_is_expected_polarity():
    head = SentimentHead(4, ["neg", "neu", "pos"], rngs=nnx.Rngs(0))
    logits = jnp.log(jnp.array([[0.2, 0.3, 0.5], [1.0, 1e-9, 1e-9]]))
    out = head.predict(logits, {})
    np.testing.assert_allclose(out["score"], [0.2 * -1 + 0.5 * 1, -1.0], atol=1e-6)
    scores = head.score([(2, 0.3), (0, -1.0)], [2, 1])
    assert scores["polarity_mae"] == pytest.approx((0.7 + 1.0) / 2)
    assert scores["accuracy"] == 0.5
    assert SentimentHead.needs_declared_labels and not ClassificationHead.needs_declared_labels


def test_token_classification_loss_skips_ignored_tokens():
    head = TokenClassificationHead(4, ["O", "B-X", "I-X"], rngs=nnx.Rngs(0))
    logits = jnp.array([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [7.0, 7.0, 7.0], [0.0, 0.0, 1.0]],
                        [[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    batch = _batch(labels=[[IGNORE, 1, IGNORE, 2], [0, 0, 0, 0]], weights=[1.0, 0.0])
    expected = -(_log_softmax([0, 2, 0])[1] + _log_softmax([0, 0, 1])[2]) / 2
    assert float(head.loss(logits, batch)) == pytest.approx(expected, rel=1e-6)


def test_token_classification_decodes_words_from_first_subtokens():
    head = TokenClassificationHead(4, ["O", "B-X", "I-X"], rngs=nnx.Rngs(0))
    # [CLS] w0 w0' w1 [SEP]; the sentence has 3 words, the third cut off by truncation.
    predictions = {"tags": np.array([[2, 1, 2, 2, 0]])}
    batch = {"weights": np.array([1.0]), "num_words": np.array([3]),
             "word_index": np.array([[-1, 0, -1, 1, -1]])}
    assert head.decode(predictions, batch) == [[1, 2, 0]]
    scores = head.score([[1, 2, 0]], [[1, 2, 1]])  # gold has a second entity at word 2
    assert scores["entity_precision"] == 1.0 and scores["entity_recall"] == 0.5
    assert scores["entity_f1"] == pytest.approx(2 / 3)
    assert scores["token_accuracy"] == pytest.approx(2 / 3)


def test_token_scores_give_every_entity_type_an_f1():
    """A type that neither gold nor predictions hold scores 0, so a task selecting on it finds it."""
    head = TokenClassificationHead(4, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], rngs=nnx.Rngs(0))
    assert head.label_metrics(head.labels) == ("entity_f1/PER", "entity_f1/LOC")
    scores = head.score([[1, 2, 0]], [[1, 2, 0]])
    assert scores["entity_f1/PER"] == 1.0 and scores["entity_f1/LOC"] == 0.0


def test_seqeval_strict_iob2_does_not_repair_predictions():
    true = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"]]  # I-LOC with no B-LOC: not an entity in strict mode
    scores = metrics.entity_metrics(true, pred)
    assert scores["entity_precision"] == 1.0 and scores["entity_recall"] == 0.5
    assert scores["entity_f1/PER"] == 1.0 and scores["entity_f1/LOC"] == 0.0
    # The spans mtl predict prints are the ones counted: the stray I-LOC is none.
    assert metrics.entity_spans(pred[0]) == [("PER", 0, 2)]
    assert metrics.entity_spans(["I-PER", "O", "B-LOC", "I-LOC", "B-PER", "I-LOC"]) == [("LOC", 2, 4), ("PER", 4, 5)]
    assert metrics.entity_spans([]) == []


def test_regression_loss_and_correlations():
    head = RegressionHead(4, ["score"], rngs=nnx.Rngs(0))
    batch = _batch(labels=[1.0, 2.0, 0.0], weights=[1.0, 1.0, 0.0])
    assert float(head.loss(jnp.array([[0.5], [3.0], [9.0]]), batch)) == pytest.approx((0.25 + 1.0) / 2)
    scores = head.score([1.0, 2.0, 3.0, 5.0], [2.0, 4.0, 6.0, 8.0])
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 5], [2, 4, 6, 8])[0, 1])
    assert scores["mse"] == pytest.approx((1 + 4 + 9 + 9) / 4)


def test_multi_label_bce_and_f1():
    head = MultiLabelHead(4, ["a", "b"], rngs=nnx.Rngs(0))
    logits = jnp.array([[0.0, 2.0]])
    batch = _batch(labels=[[1.0, 0.0]], weights=[1.0])
    sig = 1 / (1 + math.exp(-2.0))
    expected = (-math.log(0.5) - math.log(1 - sig)) / 2
    assert float(head.loss(logits, batch)) == pytest.approx(expected, rel=1e-6)
    scores = head.score([[1, 1], [0, 1]], [[1, 0], [0, 1]])
    # micro: TP=2, FP=1, FN=0 -> P=2/3, R=1, F1=0.8; macro: a F1=1, b F1=2/3
    assert scores["micro_f1"] == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_multiple_choice_scores_each_choice_and_picks_by_softmax_over_them():
    head = MultipleChoiceHead(2, ["A", "B", "C"], rngs=nnx.Rngs(0), pooling="mean", dropout=0.0)
    head.out.kernel[...] = jnp.array([[1.0], [-1.0]])
    head.out.bias[...] = jnp.array([0.5])
    # Two examples of three choices, as the encoder sees them: six rows of two tokens.
    hidden = jnp.arange(6 * 2 * 2, dtype=jnp.float32).reshape(6, 2, 2) % 5
    mask = jnp.array([[[1, 1], [1, 0], [1, 1]], [[1, 0], [1, 1], [1, 1]]])
    batch = _batch(attention_mask=mask, labels=[2, 0], weights=[1.0, 0.0])  # the second row is filler
    logits = head(EncoderOutput(hidden), batch)
    pooled = [np.asarray(hidden[r, : int(mask.reshape(6, 2)[r].sum())]).mean(0) for r in range(6)]
    expected = np.array([p[0] - p[1] + 0.5 for p in pooled]).reshape(2, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-6)
    assert float(head.loss(logits, batch)) == pytest.approx(-_log_softmax(expected[0])[2], rel=1e-6)
    predictions = head.predict(logits, batch)
    np.testing.assert_allclose(predictions["probs"].sum(-1), 1.0, rtol=1e-6)
    assert head.decode(predictions, batch) == [int(np.argmax(expected[0]))]  # real rows only
    assert head.score([2, 0, 1, 2], [2, 1, 1, 2]) == {"accuracy": 0.75}
    # A choice with no tokens is padding (an example with fewer choices): no probability. A filler
    # row, all padding, gives no NaN.
    padded = mask.at[0, 1].set(0).at[1].set(0)
    batch = _batch(attention_mask=padded, labels=[2, 0], weights=[1.0, 0.0])
    logits = head(EncoderOutput(hidden), batch)
    probs = head.predict(logits, batch)["probs"]
    assert float(probs[0, 1]) == 0.0
    np.testing.assert_allclose(probs[0, [0, 2]], jax.nn.softmax(jnp.asarray(expected[0, [0, 2]])), rtol=1e-6)
    assert float(head.loss(logits, batch)) == pytest.approx(-_log_softmax(expected[0, [0, 2]])[1], rel=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda x: head.loss(x, batch))(logits))).all()
    with pytest.raises(MtlError, match=r"multiple_choice needs at least 2 choices, got labels \['A'\]"):
        MultipleChoiceHead(2, ["A"], rngs=nnx.Rngs(0))


def test_pooling_choices():
    hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    encoded = EncoderOutput(hidden, pooler_output=jnp.ones((2, 2)))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(pool(encoded, mask, "cls"), hidden[:, 0])
    np.testing.assert_allclose(pool(encoded, mask, "mean")[0], hidden[0, :2].mean(0))
    np.testing.assert_array_equal(pool(encoded, mask, "pooler"), jnp.ones((2, 2)))
    with pytest.raises(MtlError, match="needs an encoder with a pooler"):
        pool(EncoderOutput(hidden), mask, "pooler")


def test_registry_rejects_duplicates_and_lists_known_heads():
    with pytest.raises(MtlError, match=r"head 'classification' is already registered \(by mtl\.models\.heads\.ClassificationHead\)"):
        register_head("classification")(type("Another", (ClassificationHead,), {}))
    with pytest.raises(MtlError, match=r"head 'nope' is unknown; known: \['classification', 'multi_label', 'multiple_choice', 'regression', 'sentiment', 'token_classification'"):
        get_head("nope")
    with pytest.raises(MtlError, match=r"cannot import module 'no_such_module'"):
        get_head("no_such_module:Head")
    with pytest.raises(MtlError, match=r"user_heads has no Head subclass named 'Missing'"):
        get_head("user_heads:Missing")


def test_user_head_by_dotted_path_and_options():
    cls = get_head("user_heads:MeanPoolRegression")
    assert issubclass(cls, Head) and "user_heads:MeanPoolRegression" not in HEADS
    assert get_head("user_heads.MeanPoolRegression") is cls
    head = build_head("user_heads:MeanPoolRegression", 8, ["y"], {"scale": 2.0}, rngs=nnx.Rngs(0))
    assert head.scale == 2.0
    with pytest.raises(MtlError, match=r"unknown head_options \['pooling'\]; known: \['scale'\]"):
        build_head("user_heads:MeanPoolRegression", 8, ["y"], {"pooling": "cls"}, rngs=nnx.Rngs(0))
