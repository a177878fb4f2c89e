"""The data path: alignment, bucketing, deterministic resumable order, readers, IOB2."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtl import MtlError
from mtl.data import Batcher, TrainStream, bucket_lengths, eval_batches, load_task_data
from mtl.data.pipeline import column, iob2_problems, load_raw_splits, repair_iob2
from mtl.models.heads import IGNORE
from mtl.tasks import load_task

from data_helpers import CONLL_DEV, CONLL_SPEC, CONLL_TRAIN, CSV_DATA, CSV_SPEC, write_task

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_subtoken_alignment_labels_first_piece_only(tmp_path, tokenizer):
    spec = dict(CONLL_SPEC, source={"format": "conll", "splits": {"train": ["t.txt"]}})
    path = write_task(tmp_path, spec, {"t.txt": "Tokenization B-PER\nworks O\nin O\nParis B-LOC\n"})
    data = load_task_data(load_task(path), tokenizer)
    row = data.splits["train"][0]
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces == ["[CLS]", "token", "##ization", "works", "in", "paris", "[SEP]"]
    labels = data.labels
    assert row["labels"] == [IGNORE, labels.index("B-PER"), IGNORE, 0, 0, labels.index("B-LOC"), IGNORE]
    assert row["word_index"] == [-1, 0, -1, 1, 2, 3, -1]
    assert row["num_words"] == 4 and row["tags"] == [1, 0, 0, 3]


def test_conll_reader_splits_sentences_and_skips_docstart(tmp_path, tokenizer):
    path = write_task(tmp_path, CONLL_SPEC, {"train.txt": CONLL_TRAIN, "dev.txt": CONLL_DEV})
    data = load_task_data(load_task(path), tokenizer)
    assert data.stats["examples"] == {"train": 2, "validation": 1}
    assert data.stats["tokens"] == {"train": 9, "validation": 2}
    assert data.splits["train"]["origin"][1].endswith("train.txt:8")


def test_csv_rows_keep_their_line_numbers_across_quoted_newlines(tmp_path, tokenizer):
    path = write_task(tmp_path, CSV_SPEC, {"data.csv": CSV_DATA})
    data = load_task_data(load_task(path), tokenizer)
    origins = sorted(o for split in data.splits.values() for o in split["origin"])
    lines = sorted(int(o.rsplit(":", 1)[1]) for o in origins)
    assert lines == [2, 3, 5, 6, 7, 8, 9, 10]  # the quoted newline makes row 2 span lines 3-4
    assert data.stats["examples"] == {"train": 4, "validation": 2, "test": 2}


def test_seeded_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    path = write_task(tmp_path, CSV_SPEC, {"data.csv": CSV_DATA})
    a = load_task_data(load_task(path), tokenizer)
    b = load_task_data(load_task(path), tokenizer)
    for name in a.splits:
        assert a.splits[name]["origin"] == b.splits[name]["origin"]
    all_origins = [o for s in a.splits.values() for o in s["origin"]]
    assert len(all_origins) == len(set(all_origins)) == 8
    other = load_task_data(load_task(path, overrides=["split.seed=1"]), tokenizer)
    assert other.splits["train"]["origin"] != a.splits["train"]["origin"]


def test_a_stratified_split_keeps_each_labels_share_in_every_split(tmp_path):
    """60/30/10 examples of three labels cut 0.8/0.1/0.1: 48/24/8, 6/3/1 and 6/3/1, the same rows
    again for the same seed, in the permutation's order; without stratify the same seed's
    validation split misses a label (the reason to ask for it)."""
    from collections import Counter

    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    rows = "review,stars\n" + "\n".join(f"text {i},{label}" for i, label in enumerate(labels))
    spec = dict(CSV_SPEC, labels=None, split=dict(CSV_SPEC["split"], train=0.8, validation=0.1, test=0.1,
                                                  stratify=True))
    path = write_task(tmp_path, spec, {"data.csv": rows})
    splits = load_raw_splits(load_task(path))[0]
    counts = {name: Counter(column(ds, "label")) for name, ds in splits.items()}
    assert counts == {"train": {"a": 48, "b": 24, "c": 8}, "validation": {"a": 6, "b": 3, "c": 1},
                      "test": {"a": 6, "b": 3, "c": 1}}
    origins = {name: column(ds, "origin") for name, ds in splits.items()}
    assert sorted(o for split in origins.values() for o in split) == sorted(f"{tmp_path / 'data.csv'}:{i + 2}"
                                                                            for i in range(100))
    assert origins == {name: column(ds, "origin") for name, ds in load_raw_splits(load_task(path))[0].items()}
    order = np.random.default_rng(0).permutation(100)  # the permutation's order, kept inside each split
    place = {f"{tmp_path / 'data.csv'}:{row + 2}": i for i, row in enumerate(order)}
    assert all([place[o] for o in split] == sorted(place[o] for o in split) for split in origins.values())
    plain = load_raw_splits(load_task(path, ["split.stratify=false"]))[0]
    assert Counter(column(plain["validation"], "label")) == {"a": 4, "b": 6}  # no c
    with pytest.raises(MtlError, match=r"key 'split\.stratify': needs one label an example; head 'regression' gives "
                                       r"none$"):
        load_task(write_task(tmp_path / "r", dict(spec, head="regression", metric="mse"), {}))
    with pytest.raises(MtlError, match=r"key 'split\.stratify': applies to `files` split by fractions; this source "
                                       r"gives its splits$"):
        load_task(write_task(tmp_path / "s", dict(spec, source={"format": "csv", "splits": {"train": ["x.csv"]}}), {}))


def test_balanced_class_weights_come_from_the_train_counts_and_stay_in_the_spec(tmp_path, tokenizer):
    """class_weights: balanced is n / (K * n_k) over the train rows a run uses, as scikit-learn's;
    the numbers replace the word in the spec, which is what a checkpoint keeps for predict and
    export."""
    from flax import nnx

    from mtl.models.heads import build_head
    from mtl.tasks import TaskHead
    from mtl.train.experiment import _sliced, with_balanced_class_weights

    rows = "review,stars\n" + "\n".join(f"review {i},{'pos' if i % 4 == 0 else 'neg'}" for i in range(40))
    path = write_task(tmp_path, dict(CSV_SPEC, head_options={"class_weights": "balanced"}), {"data.csv": rows})
    loaded = load_task_data(load_task(path), tokenizer)
    assert loaded.spec.head_options == {"class_weights": "balanced"}  # the data alone decides nothing
    data = with_balanced_class_weights(loaded)
    train = data.stats["label_counts"]["train"]
    assert train["neg"] > 2 * train["pos"]  # the 3:1 mix of the pool
    n = train["neg"] + train["pos"]
    expected = [n / (2 * train["neg"]), n / (2 * train["pos"])]  # labels [neg, pos]
    assert data.spec.head_options["class_weights"] == pytest.approx(expected)
    assert TaskHead.of(data.spec).head_options == {"class_weights": data.spec.head_options["class_weights"]}
    head = build_head("classification", 8, data.labels, data.spec.head_options, rngs=nnx.Rngs(0))
    assert np.asarray(head.class_weights[...]).tolist() == pytest.approx(expected)
    # A run on the first 6 train rows weighs by those 6.
    cut = _sliced(loaded, 6, None)
    first = [data.labels[i] for i in column(cut.splits["train"], "labels")]
    weights = with_balanced_class_weights(cut).spec.head_options["class_weights"]
    assert weights == pytest.approx([6 / (2 * first.count(label)) for label in data.labels])
    declared = write_task(tmp_path / "more", dict(CSV_SPEC, labels=["neg", "pos", "meh"],
                                                  head_options={"class_weights": "balanced"}), {"data.csv": rows})
    with pytest.raises(MtlError, match=r"key 'head_options\.class_weights': 'balanced' weighs each label by its train "
                                       r"examples, and \['meh'\] have none$"):
        with_balanced_class_weights(load_task_data(load_task(declared), tokenizer))


def test_raw_splits_are_the_rows_that_get_tokenized(tmp_path, tokenizer):
    # scripts/peer_tfidf.py scores its peer on these rows; they must be the ones mtl scores.
    path = write_task(tmp_path, CSV_SPEC, {"data.csv": CSV_DATA})
    raw, _ = load_raw_splits(load_task(path))
    encoded = load_task_data(load_task(path), tokenizer)
    for name, split in encoded.splits.items():
        assert raw[name]["origin"] == split["origin"]
        assert [tokenizer(t)["input_ids"] for t in raw[name]["text"]] == split["input_ids"]
        assert [CSV_SPEC["labels"].index(v) for v in raw[name]["label"]] == split["labels"]


def run_peer_script(tmp_path, *args):
    script = Path(__file__).resolve().parents[1] / "scripts" / "peer_tfidf.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env={**os.environ, "MTL_CACHE": str(tmp_path / "cache")})


def test_peer_script_scores_a_separable_task_perfectly(tmp_path):
    # Every text names its label's word, so a working TF-IDF peer on the right rows scores 1.0.
    rows = "\n".join(f"{word} item {i} number {i % 7},{label}" for i in range(60)
                     for word, label in [(("lovely", "pos"), ("awful", "neg"))[i % 2]])
    path = write_task(tmp_path, CSV_SPEC, {"data.csv": f"review,stars\n{rows}\n"})
    proc = run_peer_script(tmp_path, str(path), "--split-seeds", "0", "3")
    assert proc.returncode == 0, proc.stderr
    table = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| toy_csv")]
    assert [(row[1], row[2]) for row in table] == [
        ("0", "DATA.md recipe"), ("0", "tuned on validation"), ("3", "DATA.md recipe"), ("3", "tuned on validation")]
    assert all(row[6] == "1.0000 / 1.0000" and row[7].rstrip(" |") == "15" for row in table)


def test_peer_script_refuses_split_seeds_for_fixed_splits(tmp_path):
    spec = {**CSV_SPEC, "source": {"format": "csv", "splits": {"train": ["t.csv"], "validation": ["t.csv"],
                                                               "test": ["t.csv"]}}}
    path = write_task(tmp_path, spec, {"t.csv": CSV_DATA})
    proc = run_peer_script(tmp_path, str(path), "--split-seeds", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"{path}: task 'toy_csv' has fixed splits (source.splits); "
                                   "--split-seeds does not apply to it")


def test_peer_script_refuses_a_task_on_pairs_of_texts(tmp_path):
    spec = {**CSV_SPEC, "columns": {"text": "review", "text_pair": "reply", "label": "stars"}}
    path = write_task(tmp_path, spec, {})
    proc = run_peer_script(tmp_path, str(path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{path}: task 'toy_csv' reads pairs of texts; this peer reads one text"


def test_peer_script_names_an_unknown_task_in_one_line(tmp_path):
    proc = run_peer_script(tmp_path, "no_such_task")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("peer_tfidf.py: error: task 'no_such_task' is neither a file nor a shipped "
                                   "task; shipped: ['bbc_topic', 'tweet_sentiment', 'wnut_ner']")


def test_peer_script_checks_every_task_before_fitting_any(tmp_path):
    path = write_task(tmp_path, CSV_SPEC, {"data.csv": CSV_DATA})
    proc = run_peer_script(tmp_path, str(path), "no_such_task")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("peer_tfidf.py: error: task 'no_such_task' is neither")
    assert proc.stdout == ""  # the good first task was not scored, nor the table begun


def test_bucket_lengths():
    assert bucket_lengths(128) == (32, 64, 128)
    assert bucket_lengths(100) == (32, 64, 100)
    assert bucket_lengths(512) == (32, 64, 128, 256, 512)
    assert bucket_lengths(16) == (16,)


@pytest.fixture
def toy_split(tmp_path, tokenizer):
    rows = "\n".join(f"{'word ' * n},{'pos' if n % 2 else 'neg'}" for n in range(1, 41))
    spec = dict(CSV_SPEC, columns={"text": "review", "label": "stars"}, max_length=24,
                split={"seed": 0, "train": 1.0, "validation": 0.0, "test": 0.0})
    path = write_task(tmp_path, spec, {"data.csv": "review,stars\n" + rows + "\n"})
    return load_task_data(load_task(path), tokenizer).splits["train"]


def test_batches_use_only_declared_shapes(toy_split, tokenizer):
    batcher = Batcher(toy_split, batch_size=4, max_length=24, pad_token_id=0, buckets=(8, 16))
    assert batcher.buckets == (8, 16, 24)
    shapes = set()
    stream = TrainStream(batcher, seed=0)
    batches = [stream.batch(step) for step in range(3 * stream.steps_per_epoch)] + list(eval_batches(batcher))
    for batch in batches:
        shapes.add(batch["input_ids"].shape)
        longest = batch["attention_mask"].sum(1).max()
        # the smallest bucket that holds the longest row
        assert batch["input_ids"].shape[1] == min(b for b in (8, 16, 24) if b >= longest)
    assert shapes <= {(4, 8), (4, 16), (4, 24)}
    shortest = np.argsort(batcher.lengths)[:4]
    assert batcher.batch(shortest)["input_ids"].shape == (4, 8)


def test_eval_batches_cover_every_row_once_shortest_first(toy_split):
    batcher = Batcher(toy_split, batch_size=16, max_length=24, pad_token_id=0, buckets=(8, 16, 24))
    batches = list(eval_batches(batcher))
    index = np.concatenate([b["index"][b["weights"] > 0] for b in batches])
    assert sorted(index.tolist()) == list(range(40))
    assert index.tolist() == np.argsort(batcher.lengths, kind="stable").tolist()
    for batch in batches:  # each row is its own row of the split
        for i, row in enumerate(batch["index"][batch["weights"] > 0]):
            assert batch["input_ids"][i, : batcher.lengths[row]].tolist() == toy_split[int(row)]["input_ids"]
    assert batches[-1]["weights"].tolist() == [1.0] * 8 + [0.0] * 8
    assert (batches[-1]["index"][8:] == -1).all() and (batches[-1]["input_ids"][8:] == 0).all()
    # Rows of like length share a batch: fewer padded tokens than batches in split order.
    small = Batcher(toy_split, batch_size=4, max_length=24, pad_token_id=0, buckets=(8, 16, 24))
    in_order = sum(small.bucket_for(int(small.lengths[s:s + 4].max())) for s in range(0, 40, 4))
    shortest_first = sum(b["input_ids"].shape[1] for b in eval_batches(small))
    assert shortest_first < in_order, (shortest_first, in_order)


def test_a_part_of_a_batch_is_that_slice_of_the_whole_batch(toy_split):
    """What one process of a multi-process run builds: its block of rows, at the whole batch's
    length (the longest row may be in another process's part)."""
    batcher = Batcher(toy_split, batch_size=8, max_length=24, pad_token_id=0, buckets=(8, 16))
    longest_last = np.argsort(batcher.lengths)[-6:]  # 6 rows, the longest one last: filler at 6, 7
    whole = batcher.batch(longest_last)
    for part in (slice(0, 4), slice(4, 8), slice(6, 8)):
        mine = batcher.batch(longest_last, part)
        assert set(mine) == set(whole)
        for key in whole:
            np.testing.assert_array_equal(mine[key], whole[key][part], err_msg=key)
    assert batcher.batch(longest_last, slice(0, 4))["input_ids"].shape == (4, 24)  # longest row is in 4..8
    assert batcher.batch(longest_last, slice(6, 8))["weights"].tolist() == [0.0, 0.0]
    stream = TrainStream(batcher, seed=0)
    np.testing.assert_array_equal(stream.batch(3, slice(4, 8))["index"], stream.batch(3)["index"][4:])


def test_train_stream_is_deterministic_and_restarts_at_any_step(toy_split):
    batcher = Batcher(toy_split, batch_size=4, max_length=24, pad_token_id=0)
    stream = TrainStream(batcher, seed=7)
    run = [b["index"].tolist() for b in itertools.islice(stream.iterate(0), 25)]
    again = [b["index"].tolist() for b in itertools.islice(TrainStream(batcher, seed=7).iterate(0), 25)]
    assert run == again
    resumed = [b["index"].tolist() for b in itertools.islice(TrainStream(batcher, seed=7).iterate(13), 12)]
    assert resumed == run[13:]
    epoch = np.concatenate(run[:stream.steps_per_epoch])
    assert sorted(epoch.tolist()) == list(range(40))  # one epoch visits every row once
    other = [b["index"].tolist() for b in itertools.islice(TrainStream(batcher, seed=8).iterate(0), 10)]
    assert other != run[:10]


def test_interleaved_streams_draw_each_epochs_order_once(toy_split, monkeypatch):
    """The multi-task sampler interleaves the tasks' streams; each keeps its own epoch's order."""
    batcher = Batcher(toy_split, batch_size=4, max_length=24, pad_token_id=0)
    draws = []
    default_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: draws.append(tuple(seed)) or default_rng(seed))
    first, second = TrainStream(batcher, seed=1), TrainStream(batcher, seed=2)
    for step in range(2 * first.steps_per_epoch):
        first.rows(step)
        second.rows(step)
    assert draws == [(1, 0), (2, 0), (1, 1), (2, 1)]


def test_iob2_checks_and_repair():
    assert iob2_problems(["B-PER", "I-PER", "O", "B-LOC"]) == []
    assert iob2_problems(["O", "I-PER", "B-LOC", "I-PER", "X"]) == [1, 3, 4]
    assert repair_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-PER"]) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-PER"]


def test_bio_repair_option(tmp_path, tokenizer):
    spec = dict(CONLL_SPEC, bio="repair", source={"format": "conll", "splits": {"train": ["t.txt"]}})
    path = write_task(tmp_path, spec, {"t.txt": "John I-PER\nSmith I-PER\nleft O\n"})
    data = load_task_data(load_task(path), tokenizer)
    assert data.splits["train"]["tags"][0] == [1, 2, 0]  # B-PER I-PER O


def test_labels_inferred_from_train(tmp_path, tokenizer):
    spec = {k: v for k, v in CSV_SPEC.items() if k != "labels"}
    path = write_task(tmp_path, spec, {"data.csv": CSV_DATA})
    assert load_task_data(load_task(path), tokenizer).labels == ["neg", "pos"]


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, tokenizer):
    # Excel's "CSV UTF-8" starts with one; without care it joins the first column's name.
    bom = "\ufeff".encode()
    csv_path = write_task(tmp_path / "csv", CSV_SPEC, {"data.csv": bom + CSV_DATA.lstrip("\n").encode()})
    assert load_task_data(load_task(csv_path), tokenizer).stats["rows_kept"] == 8
    jsonl = {**CSV_SPEC, "source": {"format": "jsonl", "files": ["d.jsonl"]}}
    lines = "\n".join(json.dumps({"review": f"r{i}", "stars": "pos" if i % 2 else "neg"}) for i in range(8))
    jsonl_path = write_task(tmp_path / "jsonl", jsonl, {"d.jsonl": bom + lines.encode()})
    raw, _ = load_raw_splits(load_task(jsonl_path))
    assert sorted(t for split in raw.values() for t in split["text"]) == [f"r{i}" for i in range(8)]


def test_jsonl_multilabel_and_regression(tmp_path, tokenizer):
    lines = "\n".join(
        json.dumps({"text": f"t{i}", "tags": ["a", "b"] if i % 2 else ["b"], "score": i / 10}) for i in range(10)
    )
    split = {"seed": 0, "train": 0.6, "validation": 0.2, "test": 0.2}
    multi = {"name": "multi", "head": "multi_label", "metric": "micro_f1", "labels": ["a", "b"],
             "source": {"format": "jsonl", "files": ["d.jsonl"]}, "columns": {"text": "text", "label": "tags"}, "split": split}
    data = load_task_data(load_task(write_task(tmp_path, multi, {"d.jsonl": lines})), tokenizer)
    hot = np.asarray(data.splits["train"]["labels"])
    assert hot.shape == (6, 2) and set(map(tuple, hot.tolist())) <= {(1.0, 1.0), (0.0, 1.0)}
    regression = {"name": "reg", "head": "regression", "metric": "pearson",
                  "source": {"format": "jsonl", "files": ["d.jsonl"]}, "columns": {"text": "text", "label": "score"}, "split": split}
    data = load_task_data(load_task(write_task(tmp_path / "r", regression, {"d.jsonl": lines})), tokenizer)
    assert sorted(v for s in data.splits.values() for v in s["labels"]) == pytest.approx([i / 10 for i in range(10)])


def test_confidence_filter_drops_low_and_missing(tmp_path, tokenizer):
    rows = "text,sentiment,confidence\n" + "\n".join(
        f"tweet {i},{['negative', 'neutral', 'positive'][i % 3]},{'' if i % 5 == 0 else i / 20}" for i in range(20)
    )
    spec = {"name": "tw", "head": "sentiment", "metric": "macro_f1", "labels": ["negative", "neutral", "positive"],
            "source": {"format": "csv", "files": ["t.csv"]}, "columns": {"text": "text", "label": "sentiment"},
            "filters": [{"column": "confidence", "min": 0.5}], "split": {"seed": 0, "train": 0.5, "validation": 0.25, "test": 0.25}}
    data = load_task_data(load_task(write_task(tmp_path, spec, {"t.csv": rows})), tokenizer)
    # kept: i/20 >= 0.5 -> i in 10..19, minus i=10 and 15 (no confidence)
    assert data.stats["rows_read"] == 20 and data.stats["rows_kept"] == 8


def test_hub_source_maps_class_ids_to_names(tmp_path, tokenizer, monkeypatch):
    """A hub dataset (here built in memory; no hub is reachable in tests) with ClassLabel ids."""
    import datasets

    classes = datasets.ClassLabel(names=["neg", "pos"])
    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
    text = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"sentence": ["a good film", "a bad film"], "label": [1, 0]},
                                          features=datasets.Features({"sentence": datasets.Value("string"), "label": classes}))
        for split in ("train", "validation")
    })
    ner = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"tokens": [["John", "left"]], "ner_tags": [[1, 0]]},
                                            features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": tags}))
    })
    pairs = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"premise": ["a cat sleeps"], "hypothesis": ["a cat"], "label": [1]},
                                            features=datasets.Features({"premise": datasets.Value("string"),
                                                                        "hypothesis": datasets.Value("string"),
                                                                        "label": classes}))
    })
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config=None, **kw: {"org/text": text, "org/ner": ner, "org/pairs": pairs}[name])

    spec = dict(CSV_SPEC, source={"format": "hub", "hub": "org/text"}, columns={"text": "sentence", "label": "label"})
    data = load_task_data(load_task(write_task(tmp_path, spec, {})), tokenizer)
    assert data.labels == ["neg", "pos"] and data.splits["train"]["labels"] == [1, 0]
    assert data.splits["train"]["origin"] == ["org/text[train]:0", "org/text[train]:1"]

    spec = dict(CONLL_SPEC, source={"format": "hub", "hub": "org/ner"}, columns={"text": "tokens", "label": "ner_tags"})
    data = load_task_data(load_task(write_task(tmp_path / "ner", spec, {})), tokenizer)
    assert data.splits["train"]["tags"] == [[1, 0]]

    spec = dict(CSV_SPEC, source={"format": "hub", "hub": "org/pairs"},
                columns={"text": "premise", "text_pair": "hypothesis", "label": "label"})
    data = load_task_data(load_task(write_task(tmp_path / "pairs", spec, {})), tokenizer)
    expected = tokenizer("a cat sleeps", "a cat")
    assert data.splits["train"]["input_ids"] == [expected["input_ids"]]
    assert data.splits["train"]["token_type_ids"] == [expected["token_type_ids"]] and 1 in expected["token_type_ids"]


PAIR_SPEC = dict(CSV_SPEC, name="toy_pair", labels=["contradiction", "entailment"], max_length=16,
                 columns={"text": "premise", "text_pair": "hypothesis", "label": "gold"},
                 split={"seed": 0, "train": 0.5, "validation": 0.25, "test": 0.25})
PAIRS = [("the cat sleeps", "the cat sleeps", "entailment"), ("a dog runs", "a dog sings", "contradiction"),
         ("it rained all day long in the old town by the river " * 2, "it rained", "entailment"),  # cut: longest first
         ("x", "a very long hypothesis that will not fit in sixteen tokens at all", "contradiction")] * 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_pairs_of_texts_are_encoded_as_the_tokenizer_encodes_a_pair(tmp_path, tokenizer, fmt):
    if fmt == "csv":
        files = {"data.csv": "premise,hypothesis,gold\n" + "\n".join(f"{a},{b},{y}" for a, b, y in PAIRS)}
    else:
        files = {"data.jsonl": "\n".join(json.dumps({"premise": a, "hypothesis": b, "gold": y}) for a, b, y in PAIRS)}
    spec = dict(PAIR_SPEC, source={"format": fmt, "files": [f"data.{fmt}"]})
    path = write_task(tmp_path, spec, files)
    raw, _ = load_raw_splits(load_task(path))
    data = load_task_data(load_task(path), tokenizer)
    segment_b = 0
    for name, split in data.splits.items():
        expected = tokenizer(column(raw[name], "text"), column(raw[name], "text_pair"), truncation=True, max_length=16)
        assert split["input_ids"] == expected["input_ids"]
        assert split["token_type_ids"] == expected["token_type_ids"]
        segment_b += sum(map(sum, split["token_type_ids"]))
    assert segment_b > 0  # the second text is segment B: a run on text alone would give all zeros
    assert sorted(b for split in raw.values() for b in column(split, "text_pair")) == sorted(b for _, b, _ in PAIRS)
    assert sum(data.stats["truncated"].values()) == 4  # the pairs too long for 16 tokens, either text the longer


def test_a_hub_split_without_labels_is_left_out_and_a_row_without_one_is_named(tmp_path, tokenizer, monkeypatch,
                                                                                caplog):
    """GLUE's test splits on the hub label every row -1 (hidden); such a split is left out with a
    warning, and a -1 in a labelled split is an error naming its row."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})

    def split(labels):
        return datasets.Dataset.from_dict({"premise": ["a cat sleeps"] * len(labels), "hypothesis": ["a cat"] * len(labels),
                                           "label": labels}, features=features)

    glue = {"train": split([0, 1, 0]), "validation": split([1, 0]), "test": split([-1, -1])}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: datasets.DatasetDict(glue))
    spec = dict(CSV_SPEC, labels=None, source={"format": "hub", "hub": "nyu-mll/glue", "hub_config": "rte"},
                columns={"text": "premise", "text_pair": "hypothesis", "label": "label"})
    path = write_task(tmp_path, spec, {})
    with caplog.at_level("WARNING"):
        data = load_task_data(load_task(path), tokenizer)
    assert sorted(data.splits) == ["train", "validation"] and data.labels == ["entailment", "not_entailment"]
    assert caplog.messages == [f"{path}: hub dataset 'nyu-mll/glue' split 'test' has no labels (every one is -1, a "
                               "hidden test set); it is left out"]
    glue["validation"] = split([1, -1, 0, -1])
    with pytest.raises(MtlError) as error:
        load_task_data(load_task(path), tokenizer)
    assert str(error.value) == ("nyu-mll/glue[validation]:1: label id -1 is not one of the dataset's 2 classes "
                                "['entailment', 'not_entailment'] (2 such labels in the split; -1 marks a row without "
                                "a label)")
    # A task trains on its train split: one the hub lacks, or holds without labels, is an error.
    glue["validation"], glue["train"] = split([1, 0]), split([-1])
    with pytest.raises(MtlError) as error:
        load_task_data(load_task(path), tokenizer)
    assert str(error.value) == (f"{path}: hub dataset 'nyu-mll/glue' has no train split with labels; it has "
                                "['test', 'train', 'validation']")
    del glue["train"]
    with pytest.raises(MtlError) as error:
        load_task_data(load_task(path), tokenizer)
    assert str(error.value) == f"{path}: hub dataset 'nyu-mll/glue' has no train split; it has ['test', 'validation']"
    # Data a trained head only scores (mtl evaluate --on) needs none: its labels are the head's.
    scored = load_task_data(load_task(path), tokenizer, labels=(["entailment", "not_entailment"], "the head's"))
    assert sorted(scored.splits) == ["validation"] and list(scored.splits["validation"]["labels"]) == [1, 0]


def test_hub_splits_maps_the_hubs_split_names_to_mtls(tmp_path, tokenizer, monkeypatch):
    """MNLI on the hub has validation_matched and validation_mismatched, no "validation"."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})

    def split(labels):
        return datasets.Dataset.from_dict({"premise": ["a cat sleeps"] * len(labels),
                                           "hypothesis": ["a cat"] * len(labels), "label": labels}, features=features)

    mnli = {"train": split([0, 1, 2]), "validation_matched": split([1, 0]), "validation_mismatched": split([2]),
            "test_matched": split([-1])}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: datasets.DatasetDict(mnli))
    spec = dict(CSV_SPEC, labels=["entailment", "neutral", "contradiction"],
                source={"format": "hub", "hub": "nyu-mll/glue", "hub_config": "mnli",
                        "hub_splits": {"validation": "validation_matched", "test": "validation_mismatched"}},
                columns={"text": "premise", "text_pair": "hypothesis", "label": "label"})
    path = write_task(tmp_path, spec, {})
    data = load_task_data(load_task(path), tokenizer)
    assert {name: len(ds) for name, ds in data.splits.items()} == {"train": 3, "validation": 2, "test": 1}
    assert data.splits["test"]["origin"] == ["nyu-mll/glue[validation_mismatched]:0"]
    assert list(data.splits["validation"]["labels"]) == [1, 0]
    with pytest.raises(MtlError) as error:
        load_task_data(load_task(path, ["source.hub_splits.test=validation_other"]), tokenizer)
    assert str(error.value) == (f"{path} with override 'source.hub_splits.test=validation_other': key "
                                "'source.hub_splits.test': hub dataset 'nyu-mll/glue' has no split 'validation_other'; "
                                "it has ['test_matched', 'train', 'validation_matched', 'validation_mismatched']")
    with pytest.raises(MtlError, match=r"key 'source\.hub_splits': unknown split\(s\) \['dev'\]; it maps mtl's "):
        load_task(path, ["source.hub_splits={dev: validation_matched}"])
    with pytest.raises(MtlError, match=r"key 'source\.hub_splits': names a hub dataset's splits; this source's format "
                                       r"is 'csv'$"):
        load_task(write_task(tmp_path / "csv", dict(CSV_SPEC, source=dict(CSV_SPEC["source"], hub_splits={
            "validation": "dev"})), {}))


CHOICE_SPEC = dict(CSV_SPEC, name="toy_choice", head="multiple_choice", labels=None, max_length=16,
                   columns={"text": "question", "choices": ["a", "b", "c"], "label": "answer"})
CHOICES = [("which animal barks", ["a cat", "a dog", "a fish"], 1), ("which is cold", ["ice", "fire", "sun"], 0),
           ("what do bees make " * 4, ["honey", "milk", "bread that is long enough to be cut here"], 0),
           ("which one flies", ["a stone", "a chair", "a bird"], 2)] * 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl columns", "jsonl list", "hub", "hub list"])
def test_multiple_choice_pairs_the_text_with_each_choice(tmp_path, tokenizer, monkeypatch, fmt):
    import datasets

    spec = dict(CHOICE_SPEC)
    if fmt == "csv":
        files = {"data.csv": "question,a,b,c,answer\n" + "\n".join(f"{q},{a},{b},{c},{y}" for q, (a, b, c), y in CHOICES)}
    elif fmt == "jsonl columns":
        files = {"data.jsonl": "\n".join(json.dumps({"question": q, "a": a, "b": b, "c": c, "answer": y})
                                         for q, (a, b, c), y in CHOICES)}
    elif fmt == "jsonl list":
        files = {"data.jsonl": "\n".join(json.dumps({"question": q, "options": cs, "answer": y}) for q, cs, y in CHOICES)}
        spec["columns"] = dict(spec["columns"], choices=["options"])
    elif fmt == "hub":  # as SWAG on the hub: one column per ending, an integer label
        rows = {"question": [q for q, _, _ in CHOICES], **{k: [cs[i] for _, cs, _ in CHOICES] for i, k in enumerate("abc")},
                "answer": [y for _, _, y in CHOICES]}
        features = None
    else:  # as MMLU on the hub: a list of choices, the answer a ClassLabel named by letter
        rows = {"question": [q for q, _, _ in CHOICES], "options": [cs for _, cs, _ in CHOICES],
                "answer": [y for _, _, y in CHOICES]}
        features = datasets.Features({"question": datasets.Value("string"),
                                      "options": datasets.Sequence(datasets.Value("string")),
                                      "answer": datasets.ClassLabel(names=["A", "B", "C"])})
        spec["columns"], spec["labels"] = dict(spec["columns"], choices=["options"]), ["A", "B", "C"]
    if fmt.startswith("hub"):
        hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                                    "validation": datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()},
                                                                             features=features)})
        monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: hub)
        files, spec["source"] = {}, {"format": "hub", "hub": "toy/swag"}
        spec.pop("split")
    if not fmt.startswith("hub"):
        spec["source"] = {"format": fmt.split()[0], "files": [f"data.{fmt.split()[0]}"]}
    path = write_task(tmp_path, spec, files)
    raw, _ = load_raw_splits(load_task(path))
    data = load_task_data(load_task(path), tokenizer)
    assert data.labels == (["A", "B", "C"] if fmt == "hub list" else ["0", "1", "2"]) and data.label_kind == "choice"
    read = []
    for name, split in data.splits.items():
        texts, choices = column(raw[name], "text"), column(raw[name], "choices")
        read += zip(texts, map(tuple, choices), strict=True)
        for row, (text, options) in enumerate(zip(texts, choices, strict=True)):
            expected = tokenizer([text] * 3, options, truncation=True, max_length=16)
            assert split[row]["input_ids"] == expected["input_ids"]
            assert split[row]["token_type_ids"] == expected["token_type_ids"]
            assert split[row]["length"] == max(map(len, expected["input_ids"]))
            gold = next(y for q, cs, y in CHOICES if q == text and cs == options)
            assert split[row]["labels"] == gold
    assert sorted(read) == sorted((q, tuple(cs)) for q, cs, _ in CHOICES + (CHOICES[:4] if fmt.startswith("hub") else []))
    # A batch is [B, K, T]: each example's K pairs, padded to the bucket; filler rows are all padding.
    train = data.splits["train"]
    batcher = Batcher(train, batch_size=4, max_length=16, pad_token_id=tokenizer.pad_token_id, buckets=(8, 16))
    batch = batcher.batch(np.array([1, 0, 2]))
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == (4, 3, 16)
    for position, row in enumerate([1, 0, 2]):
        for k, ids in enumerate(train[row]["input_ids"]):
            assert batch["input_ids"][position, k, :len(ids)].tolist() == ids
            assert batch["attention_mask"][position, k].sum() == len(ids)
            assert (batch["input_ids"][position, k, len(ids):] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist()[:3] == [train[r]["labels"] for r in (1, 0, 2)]
    assert batch["weights"].tolist() == [1, 1, 1, 0] and batch["attention_mask"][3].sum() == 0


def test_multiple_choice_labels_may_name_the_choices(tmp_path, tokenizer):
    rows = "\n".join(json.dumps({"question": q, "options": cs, "answer": "ABC"[y]}) for q, cs, y in CHOICES)
    spec = dict(CHOICE_SPEC, labels=["A", "B", "C"], source={"format": "jsonl", "files": ["d.jsonl"]},
                columns=dict(CHOICE_SPEC["columns"], choices=["options"]))
    data = load_task_data(load_task(write_task(tmp_path, spec, {"d.jsonl": rows})), tokenizer)
    assert data.labels == ["A", "B", "C"]
    assert sorted(column(data.splits["train"], "labels") + column(data.splits["validation"], "labels")
                  + column(data.splits["test"], "labels")) == sorted(y for _, _, y in CHOICES)


def test_an_example_with_fewer_choices_is_padded_with_empty_ones(tmp_path, tokenizer):
    """ARC's questions have 3 to 5 choices: K is the most any example has (or the declared labels'),
    and an example with fewer gets empty sequences, which the batch pads to no tokens at all."""
    rows = [{"question": q, "options": cs[:2] if i % 2 else cs, "answer": y % 2 if i % 2 else y}
            for i, (q, cs, y) in enumerate(CHOICES)]
    spec = dict(CHOICE_SPEC, source={"format": "jsonl", "splits": {"train": ["d.jsonl"]}},
                columns=dict(CHOICE_SPEC["columns"], choices=["options"]))
    spec.pop("split")
    data = load_task_data(load_task(write_task(tmp_path, spec, {"d.jsonl": "\n".join(map(json.dumps, rows))})), tokenizer)
    assert data.labels == ["0", "1", "2"]
    assert data.stats["choices"] == {"train": {"2": 4, "3": 4}}
    train = data.splits["train"]
    assert [len(ids) for ids in train[1]["input_ids"]] == [len(ids) for ids in train[1]["attention_mask"]]
    assert train[1]["input_ids"][2] == [] and train[0]["input_ids"][2] != []
    batch = Batcher(train, batch_size=2, max_length=16, pad_token_id=tokenizer.pad_token_id).batch(np.array([0, 1]))
    assert batch["attention_mask"].shape == (2, 3, 16)
    assert batch["attention_mask"].any(axis=-1).tolist() == [[True, True, True], [True, True, False]]
    assert (batch["input_ids"][1, 2] == tokenizer.pad_token_id).all()
