"""Few-shot episodes: shapes, relabelling, class splits, determinism, and bad input."""

import numpy as np
import pytest

from mtl.data import load_task_data
from mtl.data.episodes import EpisodeSampler, check_disjoint, make_source
from mtl.data.pipeline import load_raw_splits
from mtl.errors import MtlError
from mtl.models.heads import IGNORE
from mtl.tasks import load_task

from data_helpers import write_task

TEXTS = {"sports": ["goal scored late", "team wins cup", "striker injured", "coach sacked", "match drawn",
                    "fans celebrate", "record transfer", "derby tonight"],
         "tech": ["new phone launch", "chip shortage", "software update", "app store rules", "cloud outage",
                  "robot vacuum", "laptop review", "battery breakthrough"],
         "politics": ["vote tonight", "minister resigns", "new tax bill", "election called", "party leader",
                      "budget debate", "senate hearing", "poll results"],
         "music": ["album released", "band tour", "concert sold out", "new single", "festival lineup",
                   "chart topper", "singer award", "guitar solo"]}


@pytest.fixture(scope="module")
def topics(tmp_path_factory, tokenizer):
    rows = "text,label\n" + "".join(f"{t},{label}\n" for label, texts in TEXTS.items() for t in texts)
    spec = {"name": "topics", "head": "classification", "metric": "accuracy", "labels": list(TEXTS),
            "source": {"format": "csv", "files": ["data.csv"]}, "split": {"seed": 0, "train": 1.0, "validation": 0.0, "test": 0.0},
            "max_length": 16}
    path = write_task(tmp_path_factory.mktemp("topics"), spec, {"data.csv": rows})
    return load_task_data(load_task(str(path)), tokenizer)


NER = """
Ann B-person
met O
Bob B-person
in O
Rome B-place

Rome B-place
beat O
Acme B-team
FC I-team

Carl B-person
left O
Oslo B-place

Dora B-person
joined O
Acme B-team

Paris B-place
and O
Lyon B-place
drew O
Lions B-team

Eve B-person
cheered O
Lions B-team
"""


@pytest.fixture(scope="module")
def ner(tmp_path_factory, tokenizer):
    spec = {"name": "toy_ner", "head": "token_classification", "metric": "entity_f1",
            "labels": ["O", "B-person", "I-person", "B-place", "I-place", "B-team", "I-team"],
            "source": {"format": "conll", "files": ["train.txt"]},
            "split": {"seed": 0, "train": 1.0, "validation": 0.0, "test": 0.0}, "max_length": 16}
    path = write_task(tmp_path_factory.mktemp("ner"), spec, {"train.txt": NER})
    return load_task_data(load_task(str(path)), tokenizer)


def _sampler(source, ways=2, shots=2, queries=2, seed=0, pad=0):
    sources = source if isinstance(source, list) else [source]
    return EpisodeSampler(sources, ways=ways, shots=shots, queries=queries, max_length=16, pad_token_id=pad, seed=seed)


def test_class_episode_shapes_and_labels(topics):
    sampler = _sampler(make_source(topics, "train", None), ways=3, shots=2, queries=3)
    episode = sampler.episode(0)
    assert episode["support"]["input_ids"].shape == (6, 16) and episode["query"]["input_ids"].shape == (9, 16)
    np.testing.assert_array_equal(episode["support"]["labels"], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(episode["query"]["labels"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # Each row really is an example of the class its episode label names.
    gold = np.asarray(topics.splits["train"]["labels"])
    for part in ("support", "query"):
        for row, label in zip(episode[part]["index"], episode[part]["labels"], strict=True):
            assert topics.labels[gold[row]] == episode["classes"][label]
    support, query = set(episode["support"]["index"]), set(episode["query"]["index"])
    assert not support & query


def test_episodes_of_a_pair_task_keep_each_pair_as_one_input(tmp_path, tokenizer):
    # An episode row is its split's row: the pair's tokenizer encoding, segment B included.
    rows = "premise,hypothesis,label\n" + "".join(f"{t},{t.split()[0]} news,{label}\n"
                                                  for label, texts in TEXTS.items() for t in texts)
    spec = {"name": "pairs", "head": "classification", "metric": "accuracy", "labels": list(TEXTS),
            "source": {"format": "csv", "files": ["data.csv"]}, "max_length": 16,
            "columns": {"text": "premise", "text_pair": "hypothesis", "label": "label"},
            "split": {"seed": 0, "train": 1.0, "validation": 0.0, "test": 0.0}}
    task = load_task(str(write_task(tmp_path, spec, {"data.csv": rows})))
    raw = load_raw_splits(task)[0]["train"]
    pairs = load_task_data(task, tokenizer)
    episode = _sampler(make_source(pairs, "train", None), ways=2, shots=2, queries=1).episode(0)
    for part in ("support", "query"):
        for position, row in enumerate(episode[part]["index"]):
            expected = tokenizer(raw[int(row)]["text"], raw[int(row)]["text_pair"])
            length = len(expected["input_ids"])
            assert 1 in expected["token_type_ids"]
            np.testing.assert_array_equal(episode[part]["input_ids"][position, :length], expected["input_ids"])
            np.testing.assert_array_equal(episode[part]["token_type_ids"][position], np.pad(
                expected["token_type_ids"], (0, 16 - length)))


def test_sampler_is_deterministic_and_varies(topics):
    source = make_source(topics, "train", None)
    a, b = _sampler(source, seed=3), _sampler(source, seed=3)
    for i in (0, 7):
        for part in ("support", "query"):
            for key in a.episode(i)[part]:
                np.testing.assert_array_equal(a.episode(i)[part][key], b.episode(i)[part][key])
    draws = {tuple(a.episode(i)["support"]["index"]) for i in range(10)}
    assert len(draws) > 5
    batch = a.meta_batch(2, 3)  # episodes 6, 7, 8
    np.testing.assert_array_equal(batch["query"]["index"][1], a.episode(7)["query"]["index"])
    assert batch["support"]["input_ids"].shape == (3, 4, 16)


def test_meta_train_and_meta_test_classes_never_mix(topics):
    train = make_source(topics, "train", ["sports", "tech"])
    test = make_source(topics, "train", ["politics", "music"])
    check_disjoint([train], [test])
    for sampler, allowed in ((_sampler(train), {"sports", "tech"}), (_sampler(test), {"politics", "music"})):
        gold = np.asarray(topics.splits["train"]["labels"])
        for i in range(20):
            episode = sampler.episode(i)
            assert set(episode["classes"]) <= allowed
            seen = {topics.labels[gold[r]] for part in ("support", "query") for r in episode[part]["index"]}
            assert seen <= allowed
    with pytest.raises(MtlError, match=r"task 'topics': classes \['tech'\] are in both meta-train and meta-test"):
        check_disjoint([train], [make_source(topics, "train", ["tech", "music"])])


def test_ner_episodes_relabel_drawn_types_and_tag_the_rest_o(ner):
    source = make_source(ner, "train", None)
    assert {c: len(r) for c, r in source.rows.items()} == {"person": 4, "place": 4, "team": 4}
    sampler = _sampler(source, ways=2, shots=1, queries=1)
    assert sampler.episode_labels == ["O", "B-0", "I-0", "B-1", "I-1"]
    tags = ner.splits["train"]["tags"]
    for i in range(10):
        episode = sampler.episode(i)
        classes = episode["classes"]
        for part in ("support", "query"):
            batch = episode[part]
            for row, labels, word_index in zip(batch["index"], batch["labels"], batch["word_index"], strict=True):
                words = [ner.labels[t] for t in tags[row]]
                expected = []
                for tag in words:
                    kind = tag[2:] if tag != "O" else None
                    expected.append(0 if kind not in classes else (1 if tag[0] == "B" else 2) + 2 * classes.index(kind))
                first = word_index >= 0
                assert labels[~first].tolist() == [IGNORE] * int((~first).sum())
                assert labels[first].tolist() == [expected[w] for w in word_index[first]]
        # each drawn type is really present in the sentences drawn for it
        for c_index in range(len(classes)):
            assert (episode["support"]["labels"][c_index] == 1 + 2 * c_index).any()


def test_too_few_examples_for_a_class(topics):
    with pytest.raises(MtlError, match=r"topics/train: 8 examples of class 'sports', fewer than shots \+ queries = 5 \+ 4"):
        _sampler(make_source(topics, "train", None), shots=5, queries=4)


def test_more_ways_than_classes(topics):
    with pytest.raises(MtlError, match=r"topics/train: 3-way episodes need 3 classes, it has 2 \['sports', 'tech'\]"):
        _sampler(make_source(topics, "train", ["sports", "tech"]), ways=3)


def test_unknown_class_and_split(topics, ner):
    with pytest.raises(MtlError, match=r"task 'topics': classes \['cooking'\] are not among its labels"):
        make_source(topics, "train", ["cooking"])
    with pytest.raises(MtlError, match=r"task 'toy_ner': classes \['B-person'\] are not among its entity types \['person', 'place', 'team'\]"):
        make_source(ner, "train", ["B-person"])
    with pytest.raises(MtlError, match="task 'topics' has no split 'validation'"):
        make_source(topics, "validation", None)


def test_a_head_that_cannot_be_meta_learned(tmp_path, tokenizer):
    spec = {"name": "scores", "head": "regression", "metric": "pearson", "labels": ["score"],
            "source": {"format": "csv", "files": ["data.csv"]}, "split": {"seed": 0, "train": 1.0, "validation": 0.0, "test": 0.0}}
    path = write_task(tmp_path, spec, {"data.csv": "text,label\na,1.0\nb,2.0\nc,0.5\n"})
    data = load_task_data(load_task(str(path)), tokenizer)
    with pytest.raises(MtlError, match="head 'regression' .* cannot be meta-learned"):
        make_source(data, "train", None)


def test_sources_of_different_kinds_do_not_mix(topics, ner):
    with pytest.raises(MtlError, match="episode sources mix label kinds"):
        _sampler([make_source(topics, "train", None), make_source(ner, "train", None)])
