"""The shipped task specs load their real packaged data, with the counts in shared/DATA.md."""

import pytest

from mtl import load_tokenizer
from mtl.data import Batcher, TrainStream, eval_batches, load_task_data
from mtl.tasks import load_task, shipped_tasks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def _totals(data):
    totals = {}
    for counts in data.stats["label_counts"].values():
        for label, n in counts.items():
            totals[label] = totals.get(label, 0) + n
    return totals


def test_shipped_tasks_are_the_three_packaged_ones():
    assert shipped_tasks() == ["bbc_topic", "tweet_sentiment", "wnut_ner"]


def test_tweet_sentiment(tokenizer):
    data = load_task_data(load_task("tweet_sentiment"), tokenizer, max_positions=512)
    assert data.stats["rows_read"] == 38158
    assert _totals(data) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert data.stats["examples"] == {"train": 30526, "validation": 3816, "test": 3816}


def test_tweet_sentiment_confidence_filter(tokenizer):
    spec = load_task("tweet_sentiment", overrides=["filters=[{column: confidence, min: 0.0}]"])
    data = load_task_data(spec, tokenizer, max_positions=512)
    assert data.stats["rows_kept"] == 38158 - 5460  # rows without a confidence value are dropped


def test_bbc_topic(tokenizer):
    data = load_task_data(load_task("bbc_topic"), tokenizer, max_positions=512)
    assert data.stats["rows_read"] == 2225
    assert data.stats["fallback_decoded"] == 1  # sports/199.txt: a latin-1 pound sign
    assert _totals(data) == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


def test_wnut_ner(tokenizer):
    data = load_task_data(load_task("wnut_ner"), tokenizer, max_positions=512)
    assert data.stats["rows_read"] == 2394
    assert sum(data.stats["tokens"].values()) == 46469
    types = {tag[2:] for tag in data.labels if tag != "O"}
    assert types == {"company", "facility", "geo-loc", "movie", "musicartist", "other", "person",
                     "product", "sportsteam", "tvshow"}


@pytest.mark.parametrize("name", ["tweet_sentiment", "bbc_topic", "wnut_ner"])
def test_an_epoch_uses_at_most_one_shape_per_bucket(tokenizer, name):
    spec = load_task(name)
    data = load_task_data(spec, tokenizer, max_positions=512)
    batcher = Batcher(data.splits["train"], batch_size=32, max_length=spec.max_length, pad_token_id=tokenizer.pad_token_id)
    stream = TrainStream(batcher, seed=0)
    shapes = {stream.batch(step)["input_ids"].shape for step in range(stream.steps_per_epoch)}
    shapes |= {b["input_ids"].shape for b in eval_batches(batcher)}
    assert shapes <= {(32, t) for t in batcher.buckets}
