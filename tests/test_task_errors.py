"""Bad task input: one clear MtlError naming the file and line or key, for each case."""

import pytest

from mtl import MtlError
from mtl.data import load_task_data
from mtl.tasks import load_task, load_tasks

from data_helpers import CONLL_DEV, CONLL_SPEC, CONLL_TRAIN, CSV_DATA, CSV_SPEC, write_task

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _load(tmp_path, tokenizer, spec, files, **kwargs):
    return load_task_data(load_task(write_task(tmp_path, spec, files)), tokenizer, **kwargs)


def test_malformed_conll_line(tmp_path, tokenizer):
    bad = CONLL_TRAIN.replace("visited O", "visited")
    with pytest.raises(MtlError, match=r"train\.txt:3: malformed CoNLL line 'visited': expected a token and a tag"):
        _load(tmp_path, tokenizer, CONLL_SPEC, {"train.txt": bad, "dev.txt": CONLL_DEV})


def test_label_not_in_declared_set(tmp_path, tokenizer):
    with pytest.raises(MtlError, match=r"data\.csv:6: label 'meh' is not in the declared labels: \['neg', 'pos'\]"):
        _load(tmp_path, tokenizer, CSV_SPEC, {"data.csv": CSV_DATA.replace("hated it,neg", "hated it,meh")})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_outside_the_set_are_named_in_file_order_and_counted(tmp_path, tokenizer, seed):
    # The splits are a seeded shuffle of the file; the error names the first bad row of the file,
    # whichever split it lands in, and says how many there are, so one pass can fix them all.
    bad = CSV_DATA.replace("boring,neg", "boring,Neg").replace("fine,pos", "fine,meh").replace("great film,pos", "great film,meh")
    spec = dict(CSV_SPEC, split=dict(CSV_SPEC["split"], seed=seed))
    with pytest.raises(MtlError) as error:
        _load(tmp_path, tokenizer, spec, {"data.csv": bad})
    assert str(error.value) == (f"{tmp_path}/data.csv:2: label 'meh' is not in the declared labels: ['neg', 'pos'] "
                                "(3 labels in all, with values ['Neg', 'meh'])")


def test_tag_not_in_declared_set_names_its_line(tmp_path, tokenizer):
    bad = CONLL_TRAIN.replace("Paris B-LOC", "Paris B-GPE")
    with pytest.raises(MtlError, match=r"train\.txt:4: label 'B-GPE' is not in the declared labels"):
        _load(tmp_path, tokenizer, CONLL_SPEC, {"train.txt": bad, "dev.txt": CONLL_DEV})


def test_label_only_in_validation_when_inferring(tmp_path, tokenizer):
    spec = {k: v for k, v in CONLL_SPEC.items() if k != "labels"}
    with pytest.raises(MtlError, match=r"dev\.txt:2: label 'B-ORG' is not in the labels seen in train"):
        _load(tmp_path, tokenizer, spec, {"train.txt": CONLL_TRAIN, "dev.txt": "Anne B-PER\nIBM B-ORG\n"})


def test_invalid_bio_is_rejected_in_strict_mode(tmp_path, tokenizer):
    bad = CONLL_TRAIN.replace("Paris B-LOC", "Paris I-LOC")
    with pytest.raises(MtlError, match=r"train\.txt:4: tag 'I-LOC' after 'O' is not valid IOB2 \(set bio: repair"):
        _load(tmp_path, tokenizer, CONLL_SPEC, {"train.txt": bad, "dev.txt": CONLL_DEV})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invalid_bio_names_the_first_in_file_order_and_counts(tmp_path, tokenizer, seed):
    # One pool of sentences, shuffled into splits: the first bad tag of the file is named.
    sentences = [f"w{i} O\nx{i} {'I-PER' if i in (1, 4, 6) else 'O'}\n" for i in range(8)]
    spec = dict(CONLL_SPEC, source={"format": "conll", "files": ["all.txt"]},
                split={"seed": seed, "train": 0.5, "validation": 0.25, "test": 0.25})
    with pytest.raises(MtlError) as error:
        _load(tmp_path, tokenizer, spec, {"all.txt": "\n".join(sentences)})
    assert str(error.value) == (f"{tmp_path}/all.txt:5: tag 'I-PER' after 'O' is not valid IOB2; 3 such tags in all "
                                "(set bio: repair in the task spec to turn such I- tags into B-)")


def test_unclosed_csv_quote_names_the_line_its_row_starts_on(tmp_path, tokenizer):
    # The reader only notices at the end of the file; the row with the stray quote is what to fix.
    with pytest.raises(MtlError, match=r"data\.csv:5: malformed csv \(unexpected end of data\)$"):
        _load(tmp_path, tokenizer, CSV_SPEC, {"data.csv": CSV_DATA.replace("loved it,pos", '"loved it,pos')})


def test_empty_label_cell(tmp_path, tokenizer):
    # Inferring labels, an empty cell would otherwise become a class of its own, named "".
    spec = {k: v for k, v in CSV_SPEC.items() if k != "labels"}
    with pytest.raises(MtlError, match=r"data\.csv:6: label 'stars' is empty$"):
        _load(tmp_path, tokenizer, spec, {"data.csv": CSV_DATA.replace("hated it,neg", "hated it,")})


@pytest.mark.parametrize("row, message", [
    ('{"review": "good", "stars": ["pos"]}', "label 'stars' must be a single value, got [\"pos\"]"),
    ('{"review": "good", "stars": null}', "label 'stars' is empty"),
    ('{"review": null, "stars": "pos"}', "text 'review' must be a string, got null"),
    ('{"review": ["good"], "stars": "pos"}', "text 'review' must be a string, got [\"good\"]"),
    ('{"review": "good"', "invalid JSON (Expecting ',' delimiter at column 18)"),  # the end of the line
    ('["good", "pos"]', "expected a JSON object, got list"),
])
def test_jsonl_values_of_the_wrong_shape(tmp_path, tokenizer, row, message):
    spec = dict(CSV_SPEC, source={"format": "jsonl", "files": ["d.jsonl"]})
    rows = f'{{"review": "fine", "stars": "neg"}}\n{row}\n'
    with pytest.raises(MtlError) as error:
        _load(tmp_path, tokenizer, spec, {"d.jsonl": rows})
    assert str(error.value).endswith(f"d.jsonl:2: {message}")


def test_missing_column(tmp_path, tokenizer):
    spec = dict(CSV_SPEC, columns={"text": "body", "label": "stars"})
    with pytest.raises(MtlError, match=r"data\.csv: column\(s\) \['body'\] not found; the header has \['review', 'stars'\]"):
        _load(tmp_path, tokenizer, spec, {"data.csv": CSV_DATA})


def test_missing_jsonl_key(tmp_path, tokenizer):
    spec = dict(CSV_SPEC, source={"format": "jsonl", "files": ["d.jsonl"]})
    rows = '{"review": "good", "stars": "pos"}\n{"review": "bad"}\n'
    with pytest.raises(MtlError, match=r"d\.jsonl:2: missing key\(s\) \['stars'\]"):
        _load(tmp_path, tokenizer, spec, {"d.jsonl": rows})


def test_empty_split(tmp_path, tokenizer):
    spec = dict(CSV_SPEC, split={"seed": 0, "train": 0.9, "validation": 0.05, "test": 0.05})
    with pytest.raises(MtlError, match=r"toy_csv\.yaml: task 'toy_csv': split 'validation' is empty"):
        _load(tmp_path, tokenizer, spec, {"data.csv": CSV_DATA})


def test_non_utf8_file_without_declared_encoding(tmp_path, tokenizer):
    data = CSV_DATA.lstrip("\n").replace("fine,pos", "caf\u00e9,pos").encode("latin-1")  # line 7
    with pytest.raises(MtlError, match=r"data\.csv:7: not valid utf-8 \(byte 0xe9 at offset 83\); declare the file's encoding"):
        _load(tmp_path, tokenizer, CSV_SPEC, {"data.csv": data})
    spec = dict(CSV_SPEC, source={"format": "csv", "files": ["data.csv"], "encoding": "latin-1"})
    loaded = _load(tmp_path / "ok", tokenizer, spec, {"data.csv": data})
    assert sum(loaded.stats["examples"].values()) == 8


def test_unknown_head(tmp_path):
    path = write_task(tmp_path, dict(CSV_SPEC, head="clasification"), {})
    with pytest.raises(MtlError, match=r"toy_csv\.yaml: key 'head': head 'clasification' is unknown; known: \['classification'"):
        load_task(path)


def test_task_listed_twice(tmp_path):
    a = write_task(tmp_path / "a", CSV_SPEC, {})
    with pytest.raises(MtlError, match=r"^task 'toy_csv' \(.*a/toy_csv\.yaml\) is listed twice; a task has one head, so list it once$"):
        load_tasks([a, a])


def test_duplicate_task_name(tmp_path):
    a = write_task(tmp_path / "a", CSV_SPEC, {})
    b = write_task(tmp_path / "b", CSV_SPEC, {})
    with pytest.raises(MtlError, match=r"task name 'toy_csv' is defined twice: in .*a/toy_csv\.yaml and .*b/toy_csv\.yaml"):
        load_tasks([a, b])


def test_max_length_above_encoder_limit(tmp_path, tokenizer):
    spec = dict(CSV_SPEC, max_length=1024)
    with pytest.raises(MtlError, match=r"toy_csv\.yaml: key 'max_length': 1024 exceeds the encoder's limit of 512 positions"):
        _load(tmp_path, tokenizer, spec, {"data.csv": CSV_DATA}, max_positions=512)
    # Found after loading, it still names the override that set it: the file shows another value.
    path = write_task(tmp_path / "b", CSV_SPEC, {"data.csv": CSV_DATA})
    with pytest.raises(MtlError) as error:
        load_task_data(load_task(path, ["split.seed=1", "max_length=1024"]), tokenizer, max_positions=512)
    assert str(error.value) == f"{path.resolve()} with override 'max_length=1024': key 'max_length': 1024 exceeds the encoder's limit of 512 positions"
    with pytest.raises(MtlError) as error:
        load_task_data(load_task(path, ["source.files=[other*.csv]"]), tokenizer)
    assert str(error.value).startswith(f"{path.resolve()} with override 'source.files=[other*.csv]': key 'source.files': 'other*.csv' matches no file")


def test_keys_the_loader_sets_are_refused_in_a_spec(tmp_path):
    path = write_task(tmp_path, dict(CSV_SPEC, origin="elsewhere.yaml"), {})
    with pytest.raises(MtlError) as error:
        load_task(path)
    assert str(error.value) == f"{path}: key 'origin': mtl sets it when it loads the spec; leave it out"
    path = write_task(tmp_path / "b", CSV_SPEC, {})
    with pytest.raises(MtlError) as error:
        load_task(path, ["overrides=[max_length=64]"])
    assert str(error.value) == f"{path} with override 'overrides=[max_length=64]': key 'overrides': mtl sets it when it loads the spec; leave it out"


def test_unknown_spec_key_and_wrong_type(tmp_path):
    with pytest.raises(MtlError, match=r"toy_csv\.yaml: key 'max_lenght': Key 'max_lenght' not in 'TaskSpec'"):
        load_task(write_task(tmp_path, dict(CSV_SPEC, max_lenght=64), {}))
    with pytest.raises(MtlError, match=r"key 'source.fils': Key 'fils' not in 'SourceSpec'. Did you mean: 'files'\? "
                                        r"Keys: \['format', 'files', "):
        load_task(write_task(tmp_path / "b", dict(CSV_SPEC, source={"format": "csv", "fils": ["x"]}), {}))
    with pytest.raises(MtlError, match=r"key 'max_length': Value 'long' of type 'str' could not be converted to Integer"):
        load_task(write_task(tmp_path / "c", dict(CSV_SPEC, max_length="long"), {}))
    with pytest.raises(MtlError, match=r"key 'columns.text:text': Key 'text:text' not in 'ColumnSpec'.* \(YAML reads "
                                        r"'text:text' as one key; write 'text: text', with a space after the colon\)$"):
        load_task(write_task(tmp_path / "d", dict(CSV_SPEC, columns={"text:text": None, "label": "label"}), {}))


def test_a_bad_spec_override_is_named(tmp_path):
    # An experiment's `tasks[].overrides` change a spec the file does not show: the error names
    # the override, and a key the override did not touch still names only the file.
    path = write_task(tmp_path, CSV_SPEC, {})
    with pytest.raises(MtlError) as error:
        load_task(path, ["max_lenght=64"])
    assert str(error.value).startswith(f"{path} with override 'max_lenght=64': key 'max_lenght': Key 'max_lenght' not in 'TaskSpec'")
    with pytest.raises(MtlError) as error:
        load_task(path, ["split.seed=3", "max_length=4"])
    assert str(error.value) == f"{path} with override 'max_length=4': key 'max_length': 4 is too small (at least 8)"
    with pytest.raises(MtlError) as error:
        load_task(path, ["split={train: 0.5, validation: 0.1, test: 0.1}"])
    assert str(error.value).startswith(f"{path} with override 'split={{train: 0.5, validation: 0.1, test: 0.1}}': key 'split': fractions")
    # ... or a key inside the one the check names.
    with pytest.raises(MtlError) as error:
        load_task(path, ["split.train=0.9"])
    assert str(error.value).startswith(f"{path} with override 'split.train=0.9': key 'split': fractions train=0.9")
    with pytest.raises(MtlError) as error:
        load_task(write_task(tmp_path / "b", dict(CSV_SPEC, metric="entity_f1"), {}), ["max_length=64"])
    assert str(error.value).startswith(f"{tmp_path / 'b'}/toy_csv.yaml: key 'metric': 'entity_f1' is not reported")


def test_a_spec_override_value_that_is_not_yaml_is_one_line(tmp_path):
    path = write_task(tmp_path, CSV_SPEC, {})
    with pytest.raises(MtlError) as error:
        load_task(path, ["labels=[neg, pos"])
    assert str(error.value) == (f"{path} with override 'labels=[neg, pos': the value is not valid YAML: "
                                "did not find expected ',' or ']' at the end of the value")


def test_metric_must_come_from_the_head(tmp_path):
    with pytest.raises(MtlError, match=r"key 'metric': 'entity_f1' is not reported by head 'classification'; choose one "
                                       r"of \['accuracy', 'macro_f1', 'weighted_f1', 'mcc'\], or one label's, such as "
                                       r"'f1/pos'$"):
        load_task(write_task(tmp_path, dict(CSV_SPEC, metric="entity_f1"), {}))


def test_a_task_may_select_on_one_labels_metric_of_its_declared_labels(tmp_path):
    """As MRPC and QQP select on their positive class's F1; the label must be one the spec declares."""
    assert load_task(write_task(tmp_path / "a", dict(CSV_SPEC, metric="f1/pos"), {})).metric == "f1/pos"
    assert load_task(write_task(tmp_path / "b", dict(CONLL_SPEC, metric="entity_f1/PER"), {})).metric == "entity_f1/PER"
    with pytest.raises(MtlError, match=r"key 'metric': 'f1/meh' is not reported by head 'classification'; .*, or one "
                                       r"label's, such as 'f1/pos'$"):
        load_task(write_task(tmp_path / "c", dict(CSV_SPEC, metric="f1/meh"), {}))
    inferred = {k: v for k, v in CSV_SPEC.items() if k != "labels"}
    with pytest.raises(MtlError, match=r"'f1/pos' is not reported by head 'classification'; .*, or one label's, such as "
                                       r"'f1/<label>' \(with labels declared\)$"):
        load_task(write_task(tmp_path / "d", dict(inferred, metric="f1/pos"), {}))
    with pytest.raises(MtlError, match=r"'entity_f1/B-PER' is not reported by head 'token_classification'; .*, or one "
                                       r"label's, such as 'entity_f1/\w+'$"):
        load_task(write_task(tmp_path / "e", dict(CONLL_SPEC, metric="entity_f1/B-PER"), {}))
    with pytest.raises(MtlError, match=r"'f1/pos' is not reported by head 'regression'; choose one of "
                                       r"\['pearson', 'spearman', 'mse'\]$"):
        load_task(write_task(tmp_path / "f", dict(CSV_SPEC, head="regression", metric="f1/pos"), {}))


def test_sentiment_needs_declared_labels(tmp_path):
    spec = {k: v for k, v in CSV_SPEC.items() if k != "labels"} | {"head": "sentiment", "metric": "macro_f1"}
    with pytest.raises(MtlError, match=r"key 'labels': head 'sentiment' needs its labels declared in order"):
        load_task(write_task(tmp_path, spec, {}))


def test_bad_split_fractions_and_sources(tmp_path):
    with pytest.raises(MtlError, match=r"key 'split': fractions train=0.5, validation=0.1, test=0.1 must .* sum to 1"):
        load_task(write_task(tmp_path, dict(CSV_SPEC, split={"train": 0.5, "validation": 0.1, "test": 0.1}), {}))
    with pytest.raises(MtlError, match=r"key 'source': give exactly one of 'files'"):
        load_task(write_task(tmp_path / "b", dict(CSV_SPEC, source={"format": "csv"}), {}))
    with pytest.raises(MtlError, match=r"key 'source.format': 'xlsx' is unknown"):
        load_task(write_task(tmp_path / "c", dict(CSV_SPEC, source={"format": "xlsx", "files": ["a"]}), {}))


def test_files_that_match_nothing(tmp_path, tokenizer):
    with pytest.raises(MtlError, match=r"key 'source.files': 'data.csv' matches no file \(looked in "):
        _load(tmp_path, tokenizer, CSV_SPEC, {})


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nhead: [classification\nmetric: accuracy\n")
    with pytest.raises(MtlError, match=r"broken\.yaml:\d+:\d+: invalid YAML"):
        load_task(path)


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: x\nhead: classification\nmetric: accuracy\nsource: {format: csv, files: [a.csv], format: jsonl}\n")
    with pytest.raises(MtlError) as error:
        load_task(path)
    assert str(error.value) == f"{path}:4:39: invalid YAML: key 'format' is given twice (first on line 4)"


def test_unknown_shipped_task_lists_the_shipped_ones():
    with pytest.raises(MtlError, match=r"task 'tweets' is neither a file nor a shipped task; shipped: \['bbc_topic', 'tweet_sentiment', 'wnut_ner'\]"):
        load_task("tweets")


def test_non_numeric_regression_label(tmp_path, tokenizer):
    spec = {k: v for k, v in CSV_SPEC.items() if k != "labels"} | {"head": "regression", "metric": "pearson"}
    with pytest.raises(MtlError, match=r"data\.csv:2: label 'pos' is not a number \(head 'regression' needs one\) "
                                        r"\(8 labels in all, with values \['neg', 'pos'\]\)$"):
        _load(tmp_path, tokenizer, spec, {"data.csv": CSV_DATA})


def test_filters_need_columns(tmp_path):
    spec = dict(CONLL_SPEC, filters=[{"column": "confidence", "min": 0.5}])
    with pytest.raises(MtlError, match=r"key 'filters': only csv and jsonl rows have columns"):
        load_task(write_task(tmp_path, spec, {}))


def test_unreachable_hub_dataset(tmp_path, tokenizer, monkeypatch):
    import datasets

    # datasets reads HF_HUB_OFFLINE at import; patch the constant it keeps.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = dict(CSV_SPEC, source={"format": "hub", "hub": "no-such-org/no-such-dataset"})
    with pytest.raises(MtlError, match=r"toy_csv\.yaml: key 'source.hub': cannot load 'no-such-org/no-such-dataset' \("):
        _load(tmp_path, tokenizer, spec, {})


PAIR_COLUMNS = {"text": "review", "text_pair": "reply", "label": "stars"}


@pytest.mark.parametrize("spec, message", [
    (dict(CONLL_SPEC, columns={"text": "text", "text_pair": "other", "label": "label"}),
     "key 'columns.text_pair': format 'conll' has no columns; pairs of texts come from csv, jsonl or hub sources"),
    (dict(CSV_SPEC, source={"format": "folder", "files": ["d"]}, columns=PAIR_COLUMNS),
     "key 'columns.text_pair': format 'folder' has no columns; pairs of texts come from csv, jsonl or hub sources"),
    (dict(CSV_SPEC, head="token_classification", metric="entity_f1", labels=["O"], columns=PAIR_COLUMNS),
     "key 'columns.text_pair': head 'token_classification' tags the words of one text; pairs of texts go to a head "
     "that reads a whole input (classification, regression, ...)"),
    (dict(CSV_SPEC, columns={"text": "review", "text_pair": "review", "label": "stars"}),
     "key 'columns.text_pair': 'review' is already the text or the label column"),
])
def test_a_text_pair_column_only_where_a_pair_can_be_read(tmp_path, spec, message):
    path = write_task(tmp_path, spec, {})
    with pytest.raises(MtlError) as error:
        load_task(path)
    assert str(error.value) == f"{path}: {message}"


def test_a_pair_task_names_its_missing_or_malformed_second_text(tmp_path, tokenizer):
    spec = dict(CSV_SPEC, columns=PAIR_COLUMNS)
    with pytest.raises(MtlError, match=r"data\.csv: column\(s\) \['reply'\] not found; the header has \['review', "
                                       r"'stars'\]$"):
        _load(tmp_path, tokenizer, spec, {"data.csv": CSV_DATA})
    spec = dict(spec, source={"format": "jsonl", "files": ["d.jsonl"]})
    rows = '{"review": "good", "reply": "yes", "stars": "pos"}\n{"review": "bad", "reply": 3, "stars": "neg"}\n'
    with pytest.raises(MtlError, match=r"d\.jsonl:2: text 'reply' must be a string, got 3$"):
        _load(tmp_path / "j", tokenizer, spec, {"d.jsonl": rows})
    rows = '{"review": "good", "reply": "yes", "stars": "pos"}\n{"review": "bad", "stars": "neg"}\n'
    with pytest.raises(MtlError, match=r"d\.jsonl:2: missing key\(s\) \['reply'\]; the object has \['review', 'stars'\]$"):
        _load(tmp_path / "k", tokenizer, spec, {"d.jsonl": rows})


CHOICE_SPEC = dict(CSV_SPEC, name="toy_choice", head="multiple_choice", labels=None,
                   columns={"text": "question", "choices": ["a", "b", "c"], "label": "answer"})
CHOICE_COLUMNS = CHOICE_SPEC["columns"]


@pytest.mark.parametrize("spec, message", [
    (dict(CSV_SPEC, columns=dict(CSV_SPEC["columns"], choices=["a", "b"])),
     "key 'columns.choices': head 'classification' does not read choices; they go with a multiple-choice head "
     "(multiple_choice)"),
    (dict(CHOICE_SPEC, columns={"text": "question", "label": "answer"}),
     "key 'columns.choices': head 'multiple_choice' needs the columns of its choices: one per choice ([ending0, "
     "ending1, ...]), or one that holds each example's list ([choices])"),
    (dict(CHOICE_SPEC, source={"format": "folder", "files": ["d"]}),
     "key 'columns.choices': format 'folder' has no columns; choices come from csv, jsonl or hub sources"),
    (dict(CHOICE_SPEC, columns=dict(CHOICE_COLUMNS, text_pair="context")),
     "key 'columns.text_pair': a multiple-choice task pairs its text with each choice; it takes no text_pair"),
    (dict(CHOICE_SPEC, columns=dict(CHOICE_COLUMNS, choices=[])),
     "key 'columns.choices': empty; name the column of each choice, or the one column that holds them"),
    (dict(CHOICE_SPEC, columns=dict(CHOICE_COLUMNS, choices=["a", "b", "a"])),
     "key 'columns.choices': ['a'] named twice"),
    (dict(CHOICE_SPEC, columns=dict(CHOICE_COLUMNS, choices=["a", "answer"])),
     "key 'columns.choices': ['answer'] is already the text or the label column"),
    (dict(CHOICE_SPEC, columns=dict(CHOICE_COLUMNS, choices=["options"])),
     "key 'columns.choices': a csv cell holds one text; name one column per choice"),
    (dict(CHOICE_SPEC, labels=["A", "B"]),
     "key 'labels': 2 labels for 3 choice columns; a multiple-choice task's labels name its choices in order, one each"),
])
def test_a_multiple_choice_spec_names_what_is_wrong(tmp_path, spec, message):
    path = write_task(tmp_path, spec, {})
    with pytest.raises(MtlError) as error:
        load_task(path)
    assert str(error.value) == f"{path}: {message}"


def _choice_lines(*rows):
    import json

    return "\n".join(json.dumps(row) for row in rows) + "\n"


GOOD_CHOICE = {"question": "which barks", "options": ["a cat", "a dog", "a fish"], "answer": 1}


@pytest.mark.parametrize("labels, bad, message", [
    (None, dict(GOOD_CHOICE, options=[]),
     "d.jsonl:3: no choices; a multiple-choice example has 1 to 3 choices, one a label"),
    (["A", "B"], GOOD_CHOICE,
     "d.jsonl:1: 3 choices, more than the 2 declared labels ['A', 'B'] (8 such examples); a multiple-choice example "
     "has 1 to 2 choices, one a label"),
    (None, dict(GOOD_CHOICE, options=["a cat", "a dog"], answer=2),
     "d.jsonl:3: label '2' names choice 3, and the example has 2"),
    (None, dict(GOOD_CHOICE, answer=3),
     "d.jsonl:3: label '3' is not in the choice positions (declare labels to name them otherwise): ['0', '1', '2']"),
    (None, dict(GOOD_CHOICE, options="a cat"), "d.jsonl:3: choices 'options' must be a list of texts, got \"a cat\""),
    (None, dict(GOOD_CHOICE, options=["a cat", 2, "a fish"]),
     "d.jsonl:3: choices 'options' must be a list of texts, got [\"a cat\", 2, \"a fish\"]"),
])
def test_a_multiple_choice_example_that_does_not_fit_is_named(tmp_path, tokenizer, labels, bad, message):
    rows = [GOOD_CHOICE] * 2 + [bad] + [GOOD_CHOICE] * 5
    spec = dict(CHOICE_SPEC, labels=labels, source={"format": "jsonl", "files": ["d.jsonl"]},
                columns=dict(CHOICE_COLUMNS, choices=["options"]))
    with pytest.raises(MtlError) as error:
        _load(tmp_path, tokenizer, spec, {"d.jsonl": _choice_lines(*rows)})
    assert str(error.value) == f"{tmp_path}/{message}"


def test_a_choice_column_that_is_missing_or_not_text_is_named(tmp_path, tokenizer):
    with pytest.raises(MtlError, match=r"data\.csv: column\(s\) \['a', 'b', 'c'\] not found; the header has "
                                       r"\['review', 'stars'\]$"):
        _load(tmp_path, tokenizer, dict(CHOICE_SPEC, columns=dict(CHOICE_COLUMNS, text="review", label="stars")),
              {"data.csv": CSV_DATA})
    row = {"question": "which barks", "a": "a cat", "b": None, "c": "a fish", "answer": 1}
    spec = dict(CHOICE_SPEC, source={"format": "jsonl", "files": ["d.jsonl"]})
    with pytest.raises(MtlError, match=r"d\.jsonl:1: choice 'b' must be a string, got null$"):
        _load(tmp_path / "j", tokenizer, spec, {"d.jsonl": _choice_lines(row)})
