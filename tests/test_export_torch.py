"""scripts/torch_predict.py reads an `mtl export` in PyTorch alone and predicts what mtl predicts."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtl.config import load_experiment
from mtl.inference import Predictor, export
from mtl.train.experiment import build_experiment
from mtl.train.loop import Trainer

from data_helpers import CONLL_DEV, CONLL_SPEC, CONLL_TRAIN, CSV_SPEC, write_task

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torch_predict.py"
_spec = importlib.util.spec_from_file_location("torch_predict", SCRIPT)
torch_predict = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_predict)

SPLIT = {"seed": 0, "train": 0.5, "validation": 0.25, "test": 0.25}
TEXTS = ["good good film", "alpha film", "a long review " * 12, "beta", "alpha beta"]  # the third is cut at 16 tokens
WORDS = ["John visited Paris", ["Mary", "lives", "in", "New", "York"], "", "Anne " * 20]
PAIRS = [("good film", "good"), ("alpha film", "beta film"), ("a long review " * 12, "good"),  # cut longest first
         ("beta", "a long reply " * 12), ("", "good")]
CHOICES = [("alpha film", ["alpha", "beta", "good"]), ("a long review " * 12, ["good", "beta", "alpha"]),
           ("beta", ["good", "a long reply " * 12, "beta"]), ("", ["alpha", "beta", "good"]),
           ("good film", ["beta", "good"])]  # fewer choices than the task's 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_dir):
    """A model trained briefly on one task per shipped head (each pooling once), and its export."""
    tmp = tmp_path_factory.mktemp("export")
    rows = "review,stars\n" + "\n".join(f"{'good ' * (i % 7 + 1)}film {i},{'pos' if i % 2 else 'neg'}" for i in range(32))
    tags = [[], ["a"], ["b"], ["a", "b"]]  # named by the words alpha and beta
    lines = "\n".join(json.dumps({"text": " ".join(["alpha"] * ("a" in t) + ["beta"] * ("b" in t) + [f"film {i}"]),
                                  "tags": t, "score": len(t)}) for i, t in enumerate(tags * 8))
    jsonl = {"source": {"format": "jsonl", "files": ["d.jsonl"]}, "split": SPLIT, "max_length": 16}
    specs = [
        dict(CSV_SPEC, split=SPLIT, max_length=16),  # classification, pooler
        dict(CSV_SPEC, name="toy_sentiment", head="sentiment", head_options={"pooling": "mean"}, split=SPLIT,
             max_length=16),
        dict(jsonl, name="toy_multi", head="multi_label", metric="micro_f1", labels=["a", "b"],
             head_options={"pooling": "cls", "threshold": 0.45}, columns={"text": "text", "label": "tags"}),
        dict(jsonl, name="toy_score", head="regression", metric="pearson", head_options={"pooling": "mean"},
             columns={"text": "text", "label": "score"}),
        dict(CONLL_SPEC, max_length=16),
    ]
    files = [{"data.csv": rows}, {"data.csv": rows}, {"d.jsonl": lines}, {"d.jsonl": lines},
             {"train.txt": "\n".join([CONLL_TRAIN] * 8), "dev.txt": CONLL_DEV}]
    # A task on pairs of texts: is the second text the first one's first word?
    pairs = "premise,hypothesis,gold\n" + "\n".join(
        f"{'good' if i % 3 else 'alpha'} film {i},{'good' if i % 2 else 'beta'},{'yes' if i % 6 in (1, 5) else 'no'}"
        for i in range(32))
    specs.append(dict(CSV_SPEC, name="toy_pair", labels=["no", "yes"], split=SPLIT, max_length=16,
                      columns={"text": "premise", "text_pair": "hypothesis", "label": "gold"}))
    files.append({"data.csv": pairs})
    # A multiple-choice task, one column per choice, with named choices: which choice is the text's first word?
    words = ["alpha", "beta", "good"]
    choices = "\n".join(json.dumps({"q": f"{words[i % 3]} film {i}", "gold": "XYZ"[(i % 3 - i // 3) % 3],
                                    **{c: words[(i // 3 + j) % 3] for j, c in enumerate("xyz")}}) for i in range(32))
    specs.append(dict(CSV_SPEC, name="toy_choice", head="multiple_choice", labels=["X", "Y", "Z"], split=SPLIT,
                      max_length=16, source={"format": "jsonl", "files": ["d.jsonl"]},
                      columns={"text": "q", "choices": ["x", "y", "z"], "label": "gold"}))
    files.append({"d.jsonl": choices})
    tasks = [{"task": str(write_task(tmp / spec["name"], spec, data))} for spec, data in zip(specs, files, strict=True)]
    config = load_experiment(None, data={
        "model": {"encoder": str(minilm_dir), "random_init": {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                                             "intermediate_size": 32}},
        "tasks": tasks,
        "optim": {"learning_rate": 1e-2, "head_lr_scale": 10},
        "train": {"steps": 40, "batch_size": 8, "buckets": [16], "sampling": "round_robin", "eval_every": 40,
                  "checkpoint_every": 40, "tensorboard": False},
    })
    Trainer(build_experiment(config), tmp / "w").run()
    return Predictor.from_workdir(tmp / "w"), export(tmp / "w", tmp / "out")


def _assert_same(ours: dict, theirs: dict):
    """Equal results, up to float rounding: probabilities are printed to 4 places."""
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if key == "probs":
            assert value.keys() == theirs[key].keys()
            assert theirs[key] == pytest.approx(value, abs=1.5e-4)
        elif key == "score":
            assert theirs[key] == pytest.approx(value, abs=1.5e-4)
        else:
            assert theirs[key] == value, key


@pytest.mark.parametrize("task", ["toy_csv", "toy_sentiment", "toy_multi", "toy_score", "toy_ner", "toy_pair",
                                  "toy_choice"])
def test_torch_reader_predicts_what_mtl_predicts(exported, task):
    predictor, out = exported
    texts = {"toy_ner": WORDS, "toy_pair": PAIRS, "toy_choice": CHOICES}.get(task, TEXTS)
    ours = predictor.predict(task, texts)
    theirs = torch_predict.ExportedModel(out).predict(task, texts, batch_size=3)
    assert len(theirs) == len(texts)
    for a, b in zip(ours, theirs, strict=True):
        _assert_same(a, b)
    if task == "toy_pair":
        assert [(r["text"], r["text_pair"]) for r in ours] == PAIRS
        # The second text moves the prediction by over ten times the comparison's tolerance, so a
        # reader blind to it would fail.
        changed = [r["probs"]["yes"] for r in predictor.predict(task, [(PAIRS[0][0], p) for _, p in PAIRS])]
        assert max(changed) - min(changed) > 2e-3
    if task == "toy_choice":
        assert [(r["text"], r["choices"]) for r in ours] == CHOICES
        assert all(r["answer"] == r["choices"]["XYZ".index(r["label"])] for r in ours)
    if task == "toy_ner":
        assert theirs[2] == {"text": "", "tokens": [], "tags": [], "entities": []}
        assert len(theirs[3]["tags"]) == 20  # words past max_length are tagged too ("O")


def test_a_multiple_choice_export_is_transformers_bert_for_multiple_choice(exported):
    """The encoder and the head's one output are BertForMultipleChoice's encoder and classifier."""
    import torch
    import transformers

    predictor, out = exported
    model = transformers.BertForMultipleChoice.from_pretrained(out).eval()
    heads = torch_predict.load_file(out / "heads.safetensors")
    with torch.no_grad():
        model.classifier.weight.copy_(heads["toy_choice.out.kernel"].T)
        model.classifier.bias.copy_(heads["toy_choice.out.bias"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text, choices in CHOICES[:4]:  # BertForMultipleChoice takes a fixed number of choices
        enc = tokenizer([text] * 3, choices, padding=True, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**{k: v[None] for k, v in enc.items()}).logits[0], -1)
        ours = predictor.predict("toy_choice", [(text, choices)])[0]["probs"]
        assert [ours[label] for label in "XYZ"] == pytest.approx(probs.tolist(), abs=1.5e-4)


def test_tasks_json_states_every_head_option(exported):
    _, out = exported
    tasks = json.loads((out / "tasks.json").read_text())["tasks"]
    assert tasks["toy_csv"]["head_options"] == {"pooling": "pooler", "dropout": 0.1, "class_weights": None,
                                                "label_smoothing": 0.0}
    assert tasks["toy_multi"]["head_options"] == {"pooling": "cls", "dropout": 0.1, "threshold": 0.45}
    assert tasks["toy_ner"]["head_options"] == {"dropout": 0.1, "label_smoothing": 0.0}
    assert [name for name, task in tasks.items() if task["text_pair"]] == ["toy_pair"]


def test_torch_reader_runs_alone_on_stdin_and_names_bad_input(exported):
    """As a script it imports neither mtl nor JAX; bad input is one line naming it."""
    _, out = exported
    check = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
             "assert not {'jax', 'mtl', 'flax'} & set(sys.modules), sorted({'jax', 'mtl', 'flax'} & set(sys.modules))")

    def run(*args, stdin=""):
        return subprocess.run([sys.executable, "-c", check, str(SCRIPT), str(out), *args], input=stdin,
                              capture_output=True, text=True)

    proc = run("--task", "toy_ner", stdin='{"tokens": ["Anne", "left"]}\n\n{"text": "John visited Paris"}\n')
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["tokens"] for line in proc.stdout.splitlines()] == [["Anne", "left"],
                                                                                ["John", "visited", "Paris"]]
    proc = run("--task", "nope", "x")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("torch_predict: task 'nope' is not in this export; tasks: ['toy_choice', 'toy_csv', "
                                   "'toy_multi', 'toy_ner', 'toy_pair', 'toy_score', 'toy_sentiment']")
    proc = run("--task", "toy_choice", stdin='{"text": "alpha film", "choices": ["alpha", "beta", "good"]}\n')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["choices"] == ["alpha", "beta", "good"]
    proc = run("--task", "toy_choice", stdin='{"text": "alpha film", "choices": ["alpha", "beta", "good", "x"]}\n')
    assert proc.stderr.strip() == ("torch_predict: this task picks one of up to 3 choices: give each input as (text, "
                                   "[1 to 3 choice texts])")
    proc = run("--task", "toy_choice", "alpha film")
    assert proc.stderr.strip() == ('torch_predict: task \'toy_choice\' picks one of several choices: give {"text": ..., '
                                   '"choices": [...]} lines on stdin')
    proc = run("--task", "toy_pair", stdin='{"text": "good film", "text_pair": "good"}\n')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text_pair"] == "good"
    proc = run("--task", "toy_pair", "good film")
    assert proc.stderr.strip() == ('torch_predict: task \'toy_pair\' reads pairs of texts: give {"text": ..., '
                                   '"text_pair": ...} lines on stdin')
    proc = run("--task", "toy_pair", stdin='{"text": "good film"}\n')
    assert proc.stderr.strip() == ('torch_predict: stdin:1: expected {"text": "...", "text_pair": "..."}, got '
                                   '{"text": "good film"}')
    proc = run("--task", "toy_csv", stdin='{"text": "fine"}\n{"tokens": ["a"]}\n')
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == 'torch_predict: stdin:2: expected {"text": "..."}, got {"tokens": ["a"]}'
    proc = run("--task", "toy_csv", stdin="not json\n")
    assert proc.stderr.strip() == "torch_predict: stdin:1: not a JSON line (Expecting value)"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out.parent), "--task", "toy_csv", "x"],
                          capture_output=True, text=True)
    assert proc.stderr.strip() == f"torch_predict: {out.parent}: not an mtl export (no tasks.json); write one with mtl export"
