"""Meta-training through the shared loop: exact resume, meta-test with baselines, the CLI."""

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_meta import _flat  # tests/ is sys.path[0]

from mtl.checkpoint import Checkpointer
from mtl.cli import main
from mtl.config import load_experiment
from mtl.errors import MtlError
from mtl.tracking import read_metrics
from mtl.train import meta_trainer
from mtl.train.loop import train
from mtl.train.meta import make_adapt_predict
from mtl.train.meta_trainer import meta_test, meta_train

from data_helpers import write_task

ROOT = Path(__file__).resolve().parents[1]
META_TINY = ROOT / "configs" / "meta_tiny.yaml"
TINY = ROOT / "configs" / "tiny.yaml"


def _final(workdir):
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    try:
        return checkpointer.restore_tree(checkpointer.latest_step())
    finally:
        checkpointer.close()


def _losses(workdir):
    return [(r["step"], r["meta/loss"]) for r in read_metrics(workdir) if r.get("split") == "train" and "meta/loss" in r]


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory, minilm_dir):
    workdir = tmp_path_factory.mktemp("meta")
    results = meta_train(load_experiment(META_TINY), workdir)
    return workdir, results


def test_meta_training_resumes_exactly(meta_run, tmp_path):
    reference, results = meta_run
    assert 0.0 <= results["accuracy"] <= 1.0 and results["accuracy_ci95"] > 0
    # Stop after 5 of 10 steps (the schedule is constant, so a shorter run is a prefix), then resume.
    meta_train(load_experiment(META_TINY, ["train.steps=5"]), tmp_path / "w")
    meta_train(load_experiment(META_TINY), tmp_path / "w")
    assert _losses(tmp_path / "w") == _losses(reference)
    a, b = _final(tmp_path / "w"), _final(reference)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_meta_test_reports_both_baselines(meta_run, tmp_path, monkeypatch):
    reference, _ = meta_run
    multitask = tmp_path / "multitask"
    train(load_experiment(TINY, ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]), multitask)
    kept = (multitask / "config.yaml").read_text()
    with pytest.raises(MtlError, match=f"^{multitask}: was trained by mtl train, which mtl meta-train cannot resume; "):
        meta_train(load_experiment(META_TINY), multitask)
    assert (multitask / "config.yaml").read_text() == kept
    builds = []  # the three rows share one jitted adapt-and-predict, so it compiles once
    monkeypatch.setattr(meta_trainer, "make_adapt_predict", lambda *a: builds.append(a) or make_adapt_predict(*a))
    report = meta_test(reference, episodes=6, baseline_from=str(multitask))
    assert len(builds) == 1
    rows = report["results"]
    assert list(rows) == ["meta-trained", "pretrained (no meta-training)", "multi-task (no meta-training)"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["episodes"] == 6 and np.isfinite(row["accuracy_ci95"])
    assert json.loads((reference / "meta_test.json").read_text())["results"] == rows


def test_meta_cli(meta_run, capsys):
    reference, _ = meta_run
    assert main(["meta-test", "--workdir", str(reference), "--episodes", "4", "--shots", "1", "--queries", "1"]) == 0
    out = capsys.readouterr().out
    assert "maml: 3-way 1-shot, 1 queries, 3 adaptation steps" in out and "pretrained (no meta-training)" in out
    # A kept checkpoint chosen by its step; a step not kept is named beside those that are.
    assert main(["meta-test", "--workdir", str(reference), "--episodes", "2", "--checkpoint", "5"]) == 0
    assert "(checkpoint step 5)" in capsys.readouterr().out
    assert main(["meta-test", "--workdir", str(reference), "--checkpoint", "7"]) == 2
    assert re.fullmatch(rf"mtl: error: {reference}: no checkpoint at step 7; saved: 5(?: \(best\))?, 10(?: \(best\))?\n",
                        capsys.readouterr().err)
    # A learned 3-way head cannot answer 2-way episodes.
    assert main(["meta-test", "--workdir", str(reference), "--ways", "2"]) == 2
    assert "head was meta-learned for 3 ways; --ways 2 needs protonet or proto_init" in capsys.readouterr().err
    # Too many shots for the tested split is an error about that split, not a meta-train source.
    assert main(["meta-test", "--workdir", str(reference), "--shots", "5000"]) == 2
    assert capsys.readouterr().err.startswith("mtl: error: bbc_topic/test: ")


def test_a_frozen_encoder_meta_trains_the_head_alone(tmp_path, minilm_dir):
    config = load_experiment(META_TINY, ["optim.freeze_encoder=true", "train.steps=2", "train.eval_every=2",
                                         "train.checkpoint_every=2"])
    trainer = meta_trainer.MetaTrainer(meta_trainer.build_meta_experiment(config), tmp_path / "w")
    before = jax.tree.map(np.array, trainer.state.params["model"])
    grads, _ = trainer.train_steps["meta"].gradients(trainer.state, trainer.next_batch(0)[1])
    assert jax.tree.leaves(grads["model"]["encoder"]) == [] and jax.tree.leaves(grads["model"]["heads"])
    trainer.run()
    after = _final(tmp_path / "w")["params"]["model"]
    for a, b in zip(jax.tree.leaves(after["encoder"]), jax.tree.leaves(before["encoder"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_flat(after["heads"]), _flat(before["heads"]))


def test_protonet_meta_tests_more_ways_than_its_meta_train_task_has_classes(tmp_path, minilm_dir, monkeypatch, caplog):
    # Meta-trained 3-way on tweet sentiment (3 classes), tested 5-way on BBC topics (5 classes):
    # the train sampler keeps its trained shape, so tweets need not have 5 classes.
    workdir = tmp_path / "proto"
    meta_train(load_experiment(META_TINY, ["meta.algorithm=protonet", "train.steps=2", "train.eval_every=2"]), workdir)
    report = meta_test(workdir, episodes=2, ways=5)
    assert report["ways"] == 5 and report["step"] == 2 and all(0 <= row["accuracy"] <= 1 for row in report["results"].values())
    with pytest.raises(MtlError, match=r"^bbc_topic/validation: 6-way episodes need 6 classes, it has 5 \['business', "):
        meta_test(workdir, episodes=2, ways=6, split="validation")

    # A read-only workdir (or a full disk) takes neither the report nor the record: the caller
    # prints the report, so it comes back, with a warning for each.
    import mtl.tracking

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(mtl.tracking, "open", read_only, raising=False)
    caplog.clear()  # the notes of the runs above, where an earlier test set mtl's logging to INFO
    with caplog.at_level("WARNING"):
        again = meta_test(workdir, episodes=2, ways=5)
    assert again["results"].keys() == report["results"].keys()
    assert caplog.messages == [
        f"{workdir / 'meta_test.json'}: cannot write it (Read-only file system); the results are printed only",
        f"{workdir / 'metrics.jsonl'}: cannot append to it (Read-only file system); the scores are printed only"]

    # A disk that fills while the report is written keeps the last whole report, not half of the new one.
    monkeypatch.undo()
    kept = (workdir / "meta_test.json").read_text()
    write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with caplog.at_level("WARNING"):
        meta_test(workdir, episodes=3, ways=4)
    assert (workdir / "meta_test.json").read_text() == kept
    assert sorted(p.name for p in workdir.iterdir() if "meta_test" in p.name) == ["meta_test.json"]


def test_meta_configs_and_workdirs_are_not_mixed_up(meta_run, tmp_path, capsys):
    reference, _ = meta_run
    assert main(["train", str(META_TINY), "--workdir", str(tmp_path / "x")]) == 2
    assert "has a `meta` section: run it with mtl meta-train" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", str(reference)]) == 2
    assert "is a meta-learning workdir; evaluate it with mtl meta-test" in capsys.readouterr().err
    for command in (["predict", "--task", "tweet_sentiment", "a text"], ["export", "--out", str(tmp_path / "e")]):
        assert main([command[0], "--workdir", str(reference), *command[1:]]) == 2
        assert (f"mtl: error: {reference}: is a meta-learning workdir, whose head is learned for episodes, not for a "
                "task: adapt it with mtl meta-test, or start a task from its encoder with model.init_from\n"
                == capsys.readouterr().err)
    assert main(["meta-train", str(TINY), "--workdir", str(tmp_path / "y")]) == 2
    assert "this config has no `meta` section" in capsys.readouterr().err
    # Training another kind of run into it is refused, and leaves its config.yaml as it was.
    kept = (reference / "config.yaml").read_text()
    assert main(["train", str(TINY), "--workdir", str(reference)]) == 2
    assert capsys.readouterr().err == (f"mtl: error: {reference}: was trained by mtl meta-train, which mtl train cannot "
                                       "resume; use a new --workdir (model.init_from starts from its encoder)\n")
    assert (reference / "config.yaml").read_text() == kept
    assert main(["meta-test", "--workdir", str(tmp_path / "missing")]) == 2
    assert "not a meta-training workdir" in capsys.readouterr().err
    # Baseline (b) is a multi-task checkpoint: a meta one would be reported under its name.
    assert main(["meta-test", "--workdir", str(reference), "--baseline-from", str(reference)]) == 2
    assert (f"mtl: error: {reference}: is a meta-learning workdir; baseline (b) is a multi-task one (mtl train), "
            "whose encoder saw no episodes\n" == capsys.readouterr().err)


@pytest.mark.parametrize("override, message", [
    ("meta.algorithm=mamll", "key 'meta.algorithm': 'mamll' is not one of ['maml', 'fomaml', 'anil', 'meta_sgd', 'reptile', 'protonet']"),
    ("meta.adapt=middle", "key 'meta.adapt': 'middle' is not one of ['head', 'top', 'all']"),
    ("meta.ways=0", "key 'meta.ways': must be positive, got 0"),
    ("meta.test_inner_steps=-1", "key 'meta.test_inner_steps': must be positive, got -1"),
    ("meta.inner_lr=-0.1", "key 'meta.inner_lr': must be positive, got -0.1"),
    ("meta.max_length=4", "key 'meta.max_length': must be at least 8, got 4"),
    ("meta.bogus=1", "key 'meta.bogus'"),
])
def test_bad_meta_config(override, message):
    with pytest.raises(MtlError) as error:
        load_experiment(META_TINY, [override])
    assert message in str(error.value)


def test_meta_source_must_be_a_listed_task():
    with pytest.raises(MtlError, match=r"key 'meta.test\[0\].task': 'wnut' is not one of the config's tasks"):
        load_experiment(META_TINY, ["meta.test=[{task: wnut}]"])


def test_episode_sources_may_name_a_task_by_its_spec_path(tmp_path, minilm_dir, monkeypatch):
    rows = "text,label\n" + "\n".join(f"{c} item {i},{c}" for i in range(100) for c in "abcd")
    spec = {"name": "letters", "head": "classification", "metric": "accuracy",
            "source": {"format": "csv", "files": ["data.csv"]}, "columns": {"text": "text", "label": "label"}}
    write_task(tmp_path / "letters", spec, {"data.csv": rows})
    monkeypatch.chdir(tmp_path)
    config = load_experiment(META_TINY, ["tasks.1.task=letters/letters.yaml", "meta.test=[{task: letters/letters.yaml}]"])
    assert config.meta.test[0].task == config.tasks[1].task == str(tmp_path / "letters" / "letters.yaml")
    experiment = meta_trainer.build_meta_experiment(config)
    assert [s.name for s in experiment.samplers["test"].sources] == ["letters/test"]


def test_too_few_examples_is_an_error_before_training(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtl.cli", "meta-train", str(META_TINY), "meta.shots=40",
                           "meta.queries=40", "--workdir", str(tmp_path / "w")], capture_output=True, text=True)
    assert proc.returncode == 2
    # On a cold dataset cache, datasets' progress bars come first on stderr; the error is the last line.
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mtl: error: tweet_sentiment/train: ") and "fewer than shots + queries = 40 + 40" in last
    assert "Traceback" not in proc.stderr


def test_meta_test_refuses_zero_episodes(tmp_path):
    with pytest.raises(MtlError, match=r"^episodes must be at least 1, got 0$"):
        meta_test(tmp_path, episodes=0)
