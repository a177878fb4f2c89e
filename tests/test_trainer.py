"""The multi-task trainer: exact resume after SIGKILL, restore, non-finite losses, traces, bad configs."""

import contextlib
import dataclasses
import errno
import gzip
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mtl import MtlError
from mtl.checkpoint import READ_ATTEMPTS, SELECTION, Checkpointer, load_trained
from mtl.config import load_experiment, to_yaml
from mtl.params import flatten, unstack_layers
from mtl.tracking import StepProfiler, read_metrics
from mtl.train.experiment import build_experiment
from mtl.train.loop import LOCK_FILE, NonFiniteLossError, Trainer, evaluate

from data_helpers import CONLL_DEV, CONLL_SPEC, CONLL_TRAIN, CSV_SPEC, write_task

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _mtl(*args):
    return [sys.executable, "-m", "mtl.cli", *args]


def _losses(workdir):
    """{step: {task/loss (and task/log_var, under uncertainty weighting): value}} from
    metrics.jsonl; a re-logged step keeps its last record."""
    out = {}
    for record in read_metrics(workdir):
        if record["kind"] == "train":
            out[record["step"]] = {k: v for k, v in record.items() if k.endswith(("/loss", "/log_var"))}
    return out


def _final_tree(workdir):
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    try:
        return checkpointer.restore_tree(checkpointer.latest_step()), checkpointer.latest_step()
    finally:
        checkpointer.close()


def _assert_same_tree(a, b):
    leaves_a, def_a = jax.tree.flatten(a)
    leaves_b, def_b = jax.tree.flatten(b)
    assert def_a == def_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, minilm_dir):
    """configs/tiny.yaml run to the end without interruption (and quietly: -q shows no progress)."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(_mtl("-q", "train", TINY, "--workdir", str(workdir)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "" and json.loads(proc.stdout)["aggregate"] >= 0  # the results still print
    return workdir


def _kill_when(workdir: Path, predicate, timeout: float = 300, sig=signal.SIGKILL,
               overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = _mtl("train", TINY, *overrides, "--workdir", str(workdir))
    if sig == signal.SIGINT:
        # A shell's background job (CI's pytest can be one) ignores SIGINT, and Python keeps an ignored
        # SIGINT ignored: the run takes Python's handler back, as a terminal's foreground job has it.
        command[1:3] = ["-c", "import signal, sys; from mtl.cli import main; "
                              "signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not predicate(workdir):
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill the run"
            time.sleep(0.002)
        proc.send_signal(sig)
    finally:
        _, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, stderr)


def _past_step(step):
    return lambda workdir: any(r["step"] >= step for r in read_metrics(workdir))


def _saving(workdir: Path) -> bool:
    """An orbax save of step 20 or later is in flight (its temporary directory exists)."""
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any(
        "tmp" in p.name and int(p.name.split(".")[0]) >= 20 for p in checkpoints.iterdir() if p.name[0].isdigit()
    )


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid_run", "during_save"])
def test_sigkill_then_rerun_resumes_exactly(tmp_path, reference_run, when):
    workdir = tmp_path / "run"
    _kill_when(workdir, _past_step(25) if when == "mid_run" else _saving)
    killed_at = max(r["step"] for r in read_metrics(workdir))
    assert killed_at < 40
    proc = subprocess.run(_mtl("train", TINY, "--workdir", str(workdir)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The same loss at every step, bit for bit, and the same final parameters and optimizer state.
    assert _losses(workdir) == _losses(reference_run)
    resumed, step = _final_tree(workdir)
    reference, reference_step = _final_tree(reference_run)
    assert step == reference_step == 40
    _assert_same_tree(resumed, reference)


# Checkpoints at steps 10, 20, 30 fall inside an accumulation of 3: optax.MultiSteps' summed
# gradients and its mini-step counter must come back too, as must the learned log-variances.
ACCUMULATING = ("optim.grad_accum=3", "train.loss_weighting=uncertainty", "train.sampling=temperature",
                "optim.layer_decay=0.9", "optim.freeze_layers=1", "optim.schedule=cosine")


@pytest.mark.slow
def test_sigkill_inside_a_gradient_accumulation_then_rerun_resumes_exactly(tmp_path):
    reference, workdir = tmp_path / "reference", tmp_path / "run"
    proc = subprocess.run(_mtl("-q", "train", TINY, *ACCUMULATING, "--workdir", str(reference)), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _kill_when(workdir, _past_step(15), overrides=ACCUMULATING)
    resumes_from = _final_tree(workdir)[1]
    assert resumes_from % 3 != 0  # mid-accumulation
    proc = subprocess.run(_mtl("train", TINY, *ACCUMULATING, "--workdir", str(workdir)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed {workdir} at step {resumes_from}" in proc.stderr
    logged = _losses(workdir)
    assert len(logged) == 40 and "bbc_topic/log_var" in logged[40]
    assert logged == _losses(reference)
    _assert_same_tree(_final_tree(workdir)[0], _final_tree(reference)[0])


@pytest.mark.slow
def test_ctrl_c_says_where_to_resume_without_a_traceback(tmp_path):
    workdir = tmp_path / "run"
    proc = _kill_when(workdir, _past_step(12), sig=signal.SIGINT)  # past the step-10 checkpoint
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    *_, said, last = proc.stderr.splitlines()
    assert last == "mtl: interrupted"
    assert said.startswith(f"WARNING mtl.train.loop: {workdir}: interrupted after step ")
    latest = _final_tree(workdir)[1]
    assert latest >= 10 and said.endswith(f"; the same command resumes from checkpoint {latest}")


# ----------------------------------------------------------------- in-process, small

def _toy_config(tmp_path, minilm_dir, relative_task=False, **train):
    rows = "review,stars\n" + "\n".join(f"{'good ' * (i % 7 + 1)}film {i},{'pos' if i % 2 else 'neg'}" for i in range(64))
    spec = write_task(tmp_path / "task", dict(CSV_SPEC, split={"seed": 0, "train": 0.5, "validation": 0.25, "test": 0.25}),
                      {"data.csv": rows})
    data = {
        "model": {"encoder": str(minilm_dir), "random_init": {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                                             "intermediate_size": 32}},
        "tasks": [{"task": str(spec.relative_to(Path.cwd()) if relative_task else spec)}],
        "optim": {"learning_rate": 1e-3},
        "train": dict({"steps": 8, "batch_size": 8, "buckets": [16, 32], "log_every": 1, "eval_every": 4,
                       "checkpoint_every": 4, "tensorboard": False}, **train),
    }
    return load_experiment(None, data=data)


@contextlib.contextmanager
def _sigint(handler):
    """SIGINT handled by `handler` inside the block, as before it after."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_inside_step_3_write(monkeypatch, presses: int) -> list[int]:
    """Press Ctrl-C `presses` times inside a library call (writing step 3's train metrics);
    returns the steps whose write went on past the presses (empty where one raised)."""
    from mtl.tracking import MetricsWriter

    write, finished = MetricsWriter.write, []

    def interrupted_write(self, step, kind, record):
        write(self, step, kind, record)
        if step == 3 and kind == "train":
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
            finished.append(step)

    monkeypatch.setattr(MetricsWriter, "write", interrupted_write)
    return finished


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_between_steps_and_twice_at_once(presses, tmp_path, isolated_cache, minilm_dir, monkeypatch, capfd):
    """Ctrl-C inside a library call must not raise there: a KeyboardInterrupt inside
    tensorboardX's queue put once left the run hung at close. One press stops the run after that
    step; a second press stops it at once."""
    finished = _ctrl_c_inside_step_3_write(monkeypatch, presses)
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "a")
    # Ctrl-C live, as in a terminal: pytest started as a shell's background job inherits it ignored.
    with _sigint(signal.default_int_handler):
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
    assert finished == ([3] if presses == 1 else [])
    assert max(r["step"] for r in read_metrics(tmp_path / "a")) == 3
    assert "mtl: stopping after this step (Ctrl-C again to stop now)" in capfd.readouterr().err


def test_ctrl_c_the_process_ignores_is_left_ignored(tmp_path, isolated_cache, minilm_dir, monkeypatch):
    """A process that ignores SIGINT (started in the background by a shell) keeps ignoring it:
    the run goes on to its last step."""
    finished = _ctrl_c_inside_step_3_write(monkeypatch, presses=1)
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "a")
    with _sigint(signal.SIG_IGN):
        trainer.run()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert finished == [3]
    assert max(r["step"] for r in read_metrics(tmp_path / "a")) == 8


def test_restore_into_another_seed_gives_identical_trees(tmp_path, isolated_cache, minilm_dir):
    first = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "a")
    first.run()
    other = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, seed=5)), tmp_path / "a")
    before = jax.tree.leaves(other.state.params)
    assert not all(np.array_equal(x, y) for x, y in zip(before, jax.tree.leaves(first.state.params), strict=True))
    other.resume()
    _assert_same_tree(other.state, first.state)


def _poison(trainer, task, position):
    """Make the `position`-th batch of `task` produce a NaN loss (NaN example weights)."""
    stream = trainer.streams[task]
    original = stream.batch

    def batch(pos, part=slice(None)):
        out = original(pos, part)
        if pos == position:
            out = dict(out, weights=np.full_like(out["weights"], np.nan))
        return out

    stream.batch = batch


def test_best_checkpoint_is_the_best_selection_score_also_after_reopening(tmp_path, caplog):
    """'best' (mtl evaluate, transfer, meta-test) is the highest selection score, not the
    latest step; a checkpoint saved without an evaluation is never the best, and saving one
    prints no warning (they are most of a run's saves)."""
    checkpointer = Checkpointer(tmp_path, keep=1)
    for step, score in ((1, 0.5), (2, 0.9), (3, 0.7), (4, None)):
        checkpointer.save(step, {"w": np.full(3, step, np.float32)}, {"step": step},
                          metrics=None if score is None else {SELECTION: score})
    checkpointer.wait()
    assert (checkpointer.best_step(), checkpointer.latest_step()) == (2, 4)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    checkpointer.close()
    reopened = Checkpointer(tmp_path)
    try:
        assert reopened.best_step() == 2 and sorted(reopened.manager.all_steps()) == [2, 4]
        np.testing.assert_array_equal(reopened.restore_tree(2)["w"], np.full(3, 2, np.float32))
    finally:
        reopened.close()


def test_inference_reads_the_params_alone(tmp_path, monkeypatch):
    """load_trained (predict, export, transfer) reads the params, not the optimizer state."""
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    params = {"model": {"w": {"value": np.arange(3, dtype=np.float32)}}}
    state = {"params": params, "opt_state": {"mu": np.ones(3, np.float32)}, "step": np.int32(5)}
    checkpointer.save(5, state, {"step": 5}, metrics={SELECTION: 1.0})
    checkpointer.wait()
    try:
        tree = checkpointer.restore_tree(5, only="params")
        full = checkpointer.restore_tree(5)
    finally:
        checkpointer.close()
    assert list(tree) == ["params"] and list(full) == ["opt_state", "params", "step"]
    for leaf in jax.tree.leaves(tree):
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    np.testing.assert_array_equal(tree["params"]["model"]["w"]["value"], np.arange(3, dtype=np.float32))
    restore_tree, asked = Checkpointer.restore_tree, []
    monkeypatch.setattr(Checkpointer, "restore_tree", lambda self, step, **only: asked.append(only) or
                        restore_tree(self, step, **only))
    loaded, meta, step = load_trained(tmp_path)
    assert asked == [{"only": "params"}]
    assert (step, meta) == (5, {"step": 5}) and list(loaded) == ["model"]
    np.testing.assert_array_equal(loaded["model"]["w"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("removed_while", ["listed", "restored"])
def test_a_checkpoint_the_run_removes_while_it_is_read_gives_way_to_the_newer_one(tmp_path, monkeypatch,
                                                                                  removed_while):
    """mtl evaluate, predict or a transfer on a workdir whose run goes on: the run saves a better
    checkpoint and removes the one being read (it keeps the latest and the best). Found listing
    the checkpoints (orbax reads each one's time) or reading the chosen one, the reader lists
    them again and reads the newer one, instead of stopping with a FileNotFoundError traceback."""
    writer = Checkpointer(tmp_path / "checkpoints", keep=1)

    def save(step, score):  # as the training run does, in its own process
        writer.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {"step": step}, metrics={SELECTION: score})
        writer.wait()

    save(1, 0.5)
    removed = []

    def run_moves_on(step):
        if step == 1 and not removed:
            save(2, 0.9)
            removed.append(not (tmp_path / "checkpoints" / "1").exists())

    if removed_while == "listed":
        from orbax.checkpoint._src.path import step as orbax_step
        listed_time = orbax_step.Metadata.commit_timestamp_nsecs

        def then_removed(metadata):  # orbax has found step 1's directory and reads its time
            run_moves_on(metadata.step)
            return listed_time.fget(metadata)

        monkeypatch.setattr(orbax_step.Metadata, "commit_timestamp_nsecs", property(then_removed))
    else:
        restore_tree = Checkpointer.restore_tree

        def then_removed(self, step, **only):
            run_moves_on(step)
            return restore_tree(self, step, **only)

        monkeypatch.setattr(Checkpointer, "restore_tree", then_removed)
    params, meta, step = load_trained(tmp_path)
    assert removed == [True]
    assert (step, meta) == (2, {"step": 2})
    np.testing.assert_array_equal(params["w"], np.full(3, 2, np.float32))
    writer.close()


def test_a_workdir_whose_checkpoints_keep_going_is_one_error(tmp_path, monkeypatch):
    """Removed at every attempt (a run saving faster than it can be read), the reader says so in one line."""
    writer = Checkpointer(tmp_path / "checkpoints", keep=1)
    steps = iter(range(1, 100))
    writer.save(next(steps), {"params": {"w": np.zeros(3, np.float32)}}, {}, metrics={SELECTION: 0.0})
    writer.wait()
    restore_tree, reads = Checkpointer.restore_tree, []

    def then_removed(self, step, **only):
        reads.append(step)
        writer.save(next(steps), {"params": {"w": np.zeros(3, np.float32)}}, {}, metrics={SELECTION: float(step)})
        writer.wait()
        return restore_tree(self, step, **only)

    monkeypatch.setattr(Checkpointer, "restore_tree", then_removed)
    with pytest.raises(MtlError) as error:
        load_trained(tmp_path)
    assert reads == list(range(1, READ_ATTEMPTS + 1))
    assert str(error.value) == (f"{tmp_path / 'checkpoints'}/{READ_ATTEMPTS}: removed while it was read, as were the "
                                f"{READ_ATTEMPTS - 1} chosen before it: the run training in {tmp_path} replaces its "
                                "checkpoints faster than they can be read; read it when the run ends")
    writer.close()


def test_an_interrupt_before_the_first_checkpoint_says_a_rerun_starts_over(tmp_path, isolated_cache, minilm_dir,
                                                                          monkeypatch, caplog):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=4)), tmp_path / "w")
    next_batch = trainer.next_batch

    def interrupted_at_step_2(step):
        if step == 2:
            raise KeyboardInterrupt
        return next_batch(step)

    monkeypatch.setattr(trainer, "next_batch", interrupted_at_step_2)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert caplog.messages[-1] == (f"{tmp_path / 'w'}: interrupted after step 2; the same command starts over "
                                   "(no checkpoint is saved)")


def test_a_config_write_cut_short_keeps_the_previous_config(tmp_path, isolated_cache, minilm_dir, monkeypatch):
    """config.yaml is what evaluate, predict and export read: a disk that fills up while a
    restarted run writes it must leave the previous one whole, and say so in one line."""
    Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=4)), tmp_path / "w").run()
    before = (tmp_path / "w" / "config.yaml").read_text()
    write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        if "config.yaml" in path.name:
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    longer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=8)), tmp_path / "w")
    with pytest.raises(MtlError) as error:
        longer.run()
    assert str(error.value) == (f"{tmp_path / 'w' / 'config.yaml'}: cannot write the run's config (No space left on "
                                "device); the previous one is kept. Once the cause is fixed, run the same command again")
    assert (tmp_path / "w" / "config.yaml").read_text() == before
    assert sorted(p.name for p in (tmp_path / "w").iterdir() if "config" in p.name) == ["config.yaml"]


def test_a_full_disk_under_metrics_jsonl_stops_the_run_naming_the_checkpoint_to_resume(
        tmp_path, isolated_cache, minilm_dir, monkeypatch, caplog):
    import mtl.tracking

    real_open = open

    class FullAtStep6:
        """metrics.jsonl on a disk that fills up halfway through the step 6 record."""

        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def write(self, data):
            if b'"step": 6,' in bytes(data):
                self.file.write(bytes(data)[:20])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def close(self):
            self.file.close()

    config = _toy_config(tmp_path, minilm_dir, checkpoint_every=4)
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would undo isolated_cache's too
        patch.setattr(mtl.tracking, "open", FullAtStep6, raising=False)
        with pytest.raises(MtlError) as error:
            Trainer(build_experiment(config), tmp_path / "w").run()
    assert str(error.value) == (f"{tmp_path / 'w' / 'metrics.jsonl'}: cannot append the step 6 record (No space left "
                                "on device); once the cause is fixed, the same command resumes from checkpoint 4")
    Trainer(build_experiment(config), tmp_path / "w").run()
    assert [r["step"] for r in read_metrics(tmp_path / "w") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 5, 6, 7, 8]

    # mtl evaluate prints its scores: a workdir that cannot take their record (read-only, full)
    # warns, and the scores still come back.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(mtl.tracking, "open", read_only, raising=False)
    caplog.clear()  # the rerun's warning of the cut line
    with caplog.at_level("WARNING", logger="mtl.tracking"):
        results = evaluate(tmp_path / "w", "test")
    assert results["checkpoint_step"] == 8 and 0 <= results["toy_csv/accuracy"] <= 1
    assert caplog.messages == [f"{tmp_path / 'w' / 'metrics.jsonl'}: cannot append to it (Read-only file system); "
                               "the scores are printed only"]


def test_resume_under_a_changed_config_names_the_changes(tmp_path, isolated_cache, minilm_dir, caplog):
    """Extending a run is a normal resume, but it is no longer the run it resumes: say what changed."""
    Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=4)), tmp_path / "w").run()
    same = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=4)), tmp_path / "w")
    assert same.resume() == 4 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    longer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=8, log_every=2)), tmp_path / "w")
    assert longer.resume() == 4
    assert f"{tmp_path / 'w'}: resuming step 4 under a changed config: train.log_every: 1 -> 2; train.steps: 4 -> 8" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"random_init": {"hidden_size": 32, "intermediate_size": 64}},
     "params.model.encoder.embeddings.norm.bias is (16,) in the checkpoint, (32,) in this run"),
    ({"optimizer": "sgd"}, "opt_state.2.1.count is in this run, not in the checkpoint"),
    ({"grad_accum": 2}, "opt_state.mini_step is in this run, not in the checkpoint"),
])
def test_resume_into_another_model_or_optimizer_names_the_first_difference(tmp_path, isolated_cache, minilm_dir,
                                                                           change, message):
    config = _toy_config(tmp_path, minilm_dir, steps=4)
    Trainer(build_experiment(config), tmp_path / "w").run()
    if "random_init" in change:
        config = _with(config, random_init=dataclasses_replace(config.model.random_init, **change["random_init"]))
    else:
        config = dataclasses_replace(config, optim=dataclasses_replace(config.optim, **change))
    with pytest.raises(MtlError) as error:
        Trainer(build_experiment(config), tmp_path / "w").run()
    assert str(error.value) == (f"{tmp_path / 'w' / 'checkpoints' / '4'}: the checkpoint does not fit this run: {message}. "
                                "A workdir's model and optimizer are fixed; use a new --workdir "
                                "(model.init_from transfers weights)")


def test_early_stopping_and_rerunning_a_finished_run(tmp_path, isolated_cache, minilm_dir, caplog):
    # A learning rate this small leaves every prediction, so every score, as the first evaluation had it.
    config = _toy_config(tmp_path, minilm_dir, eval_every=1, checkpoint_every=8, early_stopping_patience=2)
    config = dataclasses_replace(config, optim=dataclasses_replace(config.optim, learning_rate=1e-12))
    with caplog.at_level("INFO"):
        final = Trainer(build_experiment(config), tmp_path / "w").run()
    assert "early stop at step 3: no improvement in 2 evaluations" in caplog.text
    assert max(_losses(tmp_path / "w")) == 3 and _final_tree(tmp_path / "w")[1] == 3
    records = (tmp_path / "w" / "metrics.jsonl").read_text()
    # The same command again trains nothing, writes nothing, and reports the last scores.
    with caplog.at_level("INFO"):
        again = Trainer(build_experiment(config), tmp_path / "w").run()
    assert f"{tmp_path / 'w'}: already stopped early at step 3; nothing to do" in caplog.text
    assert again == final and (tmp_path / "w" / "metrics.jsonl").read_text() == records
    # So does a run that reached train.steps; more patience lets the stopped run go on to them.
    longer = dataclasses_replace(config, train=dataclasses_replace(config.train, early_stopping_patience=None))
    done = Trainer(build_experiment(longer), tmp_path / "w").run()
    assert max(_losses(tmp_path / "w")) == 8
    caplog.clear()
    with caplog.at_level("INFO"):
        assert Trainer(build_experiment(longer), tmp_path / "w").run() == done
    assert f"{tmp_path / 'w'}: already trained at step 8; nothing to do" in caplog.text


def test_config_changes_name_dotted_keys_and_list_items():
    from mtl.config import config_changes

    before = "train:\n  steps: 40\n  buckets: [64, 128]\ntasks:\n- {task: a, overrides: []}\n"
    after = "train:\n  steps: 80\n  buckets: [64, 256, 512]\ntasks:\n- {task: a, overrides: [max_length=64]}\n"
    assert config_changes(before, after) == ["tasks.0.overrides: [] -> (unset)", "tasks.0.overrides.0: (unset) -> max_length=64",
                                             "train.buckets.1: 128 -> 256", "train.buckets.2: (unset) -> 512",
                                             "train.steps: 40 -> 80"]
    assert config_changes(before, after, limit=2)[-1] == "and 3 more"
    assert config_changes(before, before) == []
    placed = "distributed:\n  process_id: 1\n" + before
    assert config_changes(before.replace("40", "80"), placed, ignore=("distributed",)) == ["train.steps: 80 -> 40"]
    # A key a later mtl added, at its default, is no change; set otherwise, it is. A list item
    # is never a schema key: a bucket added is a change whatever its value.
    from mtl.config import schema_defaults

    later = after.replace("train:\n", "train:\n  profile_steps: 0\n  profile_start: 12\n  log_every: 10\n")
    assert config_changes(after, later, defaults=schema_defaults()) == ["train.profile_start: (unset) -> 12"]
    assert config_changes(after, later) == ["train.log_every: (unset) -> 10", "train.profile_start: (unset) -> 12",
                                            "train.profile_steps: (unset) -> 0"]
    assert config_changes(after, after.replace("512]", "512, 256]"), defaults=schema_defaults()) == [
        "train.buckets.3: (unset) -> 256"]  # item 3 of the schema's default buckets is 256 too


# (log_every, checkpoint_every, poisoned step, the message's checkpoint part, latest checkpoint after)
NONFINITE_CASES = [
    (1, 4, 6, r"The last checkpoint \(4\) is intact", 4),
    (4, 4, 6, r"The last checkpoint \(4\) is intact", 4),  # inside a log window: the step is read one late
    (8, 2, 4, r"The last checkpoint \(2\) is intact", 2),  # at a checkpoint: its state is never saved
    (8, 4, 1, r"No checkpoint was saved yet", None),
]


@pytest.mark.parametrize("log_every,checkpoint_every,poisoned,kept,latest", NONFINITE_CASES)
def test_nonfinite_loss_stops_and_names_the_step(tmp_path, isolated_cache, minilm_dir, log_every, checkpoint_every,
                                                poisoned, kept, latest):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, log_every=log_every, eval_every=8,
                                                   checkpoint_every=checkpoint_every)), tmp_path / "w")
    _poison(trainer, "toy_csv", poisoned - 1)  # a single-task run: batch p is step p + 1
    with pytest.raises(NonFiniteLossError, match=rf"step {poisoned}, task 'toy_csv': the loss or its gradient is "
                                                 rf"not finite .* {kept}\. Set train.nan_policy=skip"):
        trainer.run()
    assert trainer.checkpointer.latest_step() == latest


@pytest.mark.parametrize("log_every", [1, 4])
def test_nonfinite_loss_can_be_skipped(tmp_path, isolated_cache, minilm_dir, log_every):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, nan_policy="skip", log_every=log_every)),
                      tmp_path / "w")
    _poison(trainer, "toy_csv", 5)  # step 6
    trainer.run()
    skipped = {r["step"]: r["skipped_steps"] for r in read_metrics(tmp_path / "w") if r["kind"] == "train"}
    assert skipped == {s: int(s >= 6) for s in range(log_every, 9, log_every)}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state.params))


def test_the_host_reads_a_step_after_queueing_the_next(tmp_path, isolated_cache, minilm_dir):
    """Inside a log window the loop dispatches step s + 1 before it waits on step s's loss, so
    the device is never idle while the host builds a batch; at every log, evaluation or
    checkpoint (here each 4th step) all steps so far are read first."""
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, log_every=4)), tmp_path / "w")
    events = []

    class Loss:
        def __init__(self, value, step):
            self.value, self.step = value, step

        def __float__(self):
            events.append(f"read {self.step}")
            return float(self.value)

    def recording(step_fn):
        def step(state, batch):
            state, metrics = step_fn(state, batch)
            events.append(f"run {int(state.step)}")
            return state, dict(metrics, loss=Loss(metrics["loss"], int(state.step)))
        return step

    trainer.train_steps = {name: recording(fn) for name, fn in trainer.train_steps.items()}
    trainer.run()
    assert events == ["run 1", "run 2", "read 1", "run 3", "read 2", "run 4", "read 3", "read 4",
                      "run 5", "run 6", "read 5", "run 7", "read 6", "run 8", "read 7", "read 8"]


def test_train_step_traces_once_per_bucket(tmp_path, isolated_cache, minilm_dir):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, steps=16)), tmp_path / "w")
    trainer.run()
    stream = trainer.streams["toy_csv"]
    buckets = {stream.batch(p)["input_ids"].shape for p in range(16)}
    assert trainer.train_steps["toy_csv"].gradients._cache_size() == len(buckets)


def _program_calls(trace_dir: Path, name: str) -> int:
    """How many times the jitted function `name` was called in a jax.profiler trace (its
    Perfetto JSON nests a second event inside each call's)."""
    [path] = trace_dir.glob("plugins/profile/*/*.trace.json.gz")
    events = sorted((e["ts"], e["ts"] + e["dur"]) for e in json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
                    if e.get("ph") == "X" and e.get("name") == f"PjitFunction({name})")
    calls, end = 0, -1.0
    for start, stop in events:
        if start > end:  # not inside the call before
            calls, end = calls + 1, stop
    return calls


def test_a_profile_traces_the_steps_asked_for(tmp_path, isolated_cache, minilm_dir, caplog):
    # One bucket and no evaluation in the range: no compile is traced. (JAX's Python tracer records
    # every call of a compile, and the trace's JSON keeps the first million events.)
    config = _toy_config(tmp_path, minilm_dir, steps=8, buckets=[32], eval_every=8, checkpoint_every=8,
                         profile_start=4, profile_steps=3)
    with caplog.at_level("INFO"):
        Trainer(build_experiment(config), tmp_path / "w").run()
    assert f"profile of steps 5-7 written under {tmp_path / 'w' / 'profile'}" in caplog.text
    # Each step is one call of the gradient program and one of the update: the trace holds three steps.
    assert _program_calls(tmp_path / "w" / "profile", "gradients") == 3
    assert _program_calls(tmp_path / "w" / "profile", "update") == 3


class _FakeProfiler:
    def __init__(self, monkeypatch, fail_start=False):
        self.calls = []
        monkeypatch.setattr(jax.profiler, "start_trace", self.start)
        monkeypatch.setattr(jax.profiler, "stop_trace", lambda: self.calls.append("stop"))
        self.fail_start = fail_start

    def start(self, directory):
        if self.fail_start:
            raise RuntimeError("Profile has already been started. Only one profile may be run at a time.")
        self.calls.append(f"start {Path(directory).name}")


@pytest.mark.parametrize("first, last, calls", [
    (0, 8, ["before 0", "before 1", "before 2", "start profile", "before 3", "stop", "before 4", "before 5",
            "before 6", "before 7"]),
    (3, 8, ["before 3", "start profile", "stop", "before 4", "before 5", "before 6", "before 7"]),  # resumed inside
    (0, 3, ["before 0", "before 1", "before 2", "start profile", "stop"]),  # the run ends inside
    (5, 8, ["before 5", "before 6", "before 7"]),  # resumed past it
])
def test_the_profiler_traces_its_range_of_the_steps_a_run_takes(monkeypatch, tmp_path, first, last, calls):
    fake = _FakeProfiler(monkeypatch)
    profiler = StepProfiler(tmp_path / "profile", start=2, count=2)
    for step in range(first, last):
        fake.calls.append(f"before {step}")
        profiler.before_step(step)
        profiler.after_step(step + 1, None)
    profiler.stop(last)  # as the loop's `finally` does
    assert fake.calls == calls


def test_a_step_that_fails_inside_the_profile_is_the_error_said(tmp_path, isolated_cache, minilm_dir, caplog):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, profile_start=1, profile_steps=5)),
                      tmp_path / "w")
    step, calls = trainer.train_steps["toy_csv"], []

    def failing_third_step(state, batch):
        calls.append(1)
        out = step(state, batch)  # donates `state`, as a step that fails on the device may have
        if len(calls) == 3:
            raise RuntimeError("the device failed")
        return out

    trainer.train_steps["toy_csv"] = failing_third_step
    with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="^the device failed$"):
        trainer.run()
    assert f"profile of steps 2-2 written under {tmp_path / 'w' / 'profile'}" in caplog.text


def test_each_process_of_a_run_profiles_into_its_own_directory(tmp_path, isolated_cache, minilm_dir, monkeypatch):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "w")
    assert trainer.profile_directory() == tmp_path / "w" / "profile"
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert trainer.profile_directory() == tmp_path / "w" / "profile" / "process_1"


def test_a_profile_that_cannot_start_is_a_warning(monkeypatch, tmp_path, caplog):
    fake = _FakeProfiler(monkeypatch, fail_start=True)
    profiler = StepProfiler(tmp_path / "profile", start=0, count=3)
    with caplog.at_level("WARNING"):
        for step in range(3):
            profiler.before_step(step)
            profiler.after_step(step + 1, None)
        profiler.stop(3)
    assert fake.calls == [] and caplog.messages == [
        "no profile taken: Profile has already been started. Only one profile may be run at a time."]


def test_resume_with_another_label_set_is_refused(tmp_path, isolated_cache, minilm_dir):
    Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "w").run()
    config = _toy_config(tmp_path, minilm_dir)
    spec = Path(config.tasks[0].task)
    relabelled = spec.read_text().replace("- neg\n- pos", "- pos\n- neg")
    assert relabelled != spec.read_text()
    spec.write_text(relabelled)
    said = (f"{tmp_path / 'w'}: task 'toy_csv' was trained with labels ['neg', 'pos'], and its spec and data now "
            f"give ['pos', 'neg']; put them back, or use a new --workdir (model.init_from transfers the encoder)")
    with pytest.raises(MtlError) as error:
        Trainer(build_experiment(config), tmp_path / "w").run()
    assert str(error.value) == said
    # Scoring the checkpoint under the new order would swap what its outputs mean, silently.
    with pytest.raises(MtlError) as error:
        evaluate(tmp_path / "w")
    assert str(error.value) == said


def test_a_workdir_finds_its_task_specs_from_any_directory(tmp_path, isolated_cache, minilm_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _toy_config(tmp_path, minilm_dir, relative_task=True)  # tasks: [{task: task/toy_csv.yaml}]
    assert config.tasks[0].task == str(tmp_path / "task" / "toy_csv.yaml")  # absolute: the workdir keeps it
    Trainer(build_experiment(config), tmp_path / "w").run()
    monkeypatch.chdir(tmp_path / "w")
    assert evaluate(tmp_path / "w")["checkpoint_step"] == 8


def test_evaluate_restores_and_scores(tmp_path, isolated_cache, minilm_dir):
    config = _toy_config(tmp_path, minilm_dir)
    trained = Trainer(build_experiment(config), tmp_path / "w")
    final = trained.run()
    results = evaluate(tmp_path / "w", "validation", checkpoint="latest")
    assert results["checkpoint_step"] == 8
    assert results["toy_csv/accuracy"] == final["toy_csv/accuracy"]


def test_evaluation_batches_have_their_own_size(tmp_path, isolated_cache, minilm_dir, monkeypatch):
    """train.eval_batch_size sizes evaluation batches, and mtl evaluate --batch-size overrides it;
    neither changes training's batches nor any row's prediction."""
    import mtl.train.loop as loop
    from mtl.cli import main
    from mtl.models.heads import ClassificationHead

    sizes, predicted = [], []
    eval_batches, score = loop.eval_batches, ClassificationHead.score

    def recording(batcher):
        sizes.append(batcher.batch_size)
        return eval_batches(batcher)

    def spy(head, predictions, references):
        predicted.append(list(predictions))
        return score(head, predictions, references)

    monkeypatch.setattr(loop, "eval_batches", recording)
    monkeypatch.setattr(ClassificationHead, "score", spy)
    # The pretrained encoder, as in the test below: a random one predicts one label for every row,
    # and any batching would give the same predictions.
    config = _toy_config(tmp_path, minilm_dir, steps=1, eval_every=1, checkpoint_every=1, eval_batch_size=16)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, random_init=None))
    trainer = Trainer(build_experiment(config), tmp_path / "w")
    assert trainer.batchers["train"]["toy_csv"].batch_size == 8
    trainer.run()
    assert sizes == [16]  # one batch of the 16 validation rows
    assert len(set(predicted[0])) == 2, predicted
    assert main(["--no-compile-cache", "evaluate", "--workdir", str(tmp_path / "w"), "--batch-size", "3"]) == 0
    assert sizes == [16, 3]  # six batches, the last with two filler rows
    assert predicted[1] == predicted[0]
    evaluate(tmp_path / "w", "validation")
    assert sizes == [16, 3, 16]  # the workdir's config: --batch-size changed nothing it keeps
    with pytest.raises(MtlError, match=r"key 'train\.eval_batch_size': must be positive, got 0"):
        _toy_config(tmp_path, minilm_dir, eval_batch_size=0)
    # Over two data-parallel devices, an evaluation batch must split as a training batch does.
    monkeypatch.setattr("mtl.sharding.Layout.batch_divisor", 2)
    with pytest.raises(MtlError, match="^train.eval_batch_size 3 does not split evenly over the mesh's 2 "):
        Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, eval_batch_size=3)), tmp_path / "other")


def test_balanced_class_weights_are_kept_as_numbers_for_predict_and_resume(tmp_path, isolated_cache, minilm_dir):
    """A checkpoint keeps the numbers `balanced` came to, so predict rebuilds the head without the
    data, and a rerun of the finished run (which compares its heads to the checkpoint's) accepts it."""
    from mtl.inference import Predictor

    config = _toy_config(tmp_path, minilm_dir, steps=1, eval_every=1, checkpoint_every=1)
    entry = dataclasses.replace(config.tasks[0], overrides=["head_options={class_weights: balanced}"])
    config = dataclasses.replace(config, tasks=[entry])
    experiment = build_experiment(config)
    weights = experiment.tasks["toy_csv"].spec.head_options["class_weights"]
    assert isinstance(weights, list) and len(weights) == 2 and all(isinstance(w, float) for w in weights)
    Trainer(experiment, tmp_path / "w").run()
    predictor = Predictor.from_workdir(tmp_path / "w")
    assert predictor.tasks["toy_csv"].head_options == {"class_weights": weights}
    assert np.asarray(predictor.model.head("toy_csv").class_weights[...]).tolist() == pytest.approx(weights)
    again = Trainer(build_experiment(config), tmp_path / "w").run()  # finished: its last scores, no mismatch
    assert again["toy_csv/accuracy"] >= 0


@pytest.mark.parametrize("metric", ["mcc", "f1/pos"])
def test_evaluate_prints_each_tasks_primary_metric(tmp_path, isolated_cache, minilm_dir, capsys, metric):
    """A task that selects on a metric outside the printed set (mcc, as CoLA; its positive class's
    F1, as MRPC) gets it printed, and train.best_metric may name it."""
    from mtl.cli import main

    config = _toy_config(tmp_path, minilm_dir, steps=1, eval_every=1, checkpoint_every=1,
                         best_metric=f"toy_csv/{metric}")
    config = dataclasses.replace(config, tasks=[dataclasses.replace(config.tasks[0], overrides=[f"metric={metric}"])])
    final = Trainer(build_experiment(config), tmp_path / "w").run()
    assert final["aggregate"] == final[f"toy_csv/{metric}"]
    capsys.readouterr()
    assert main(["--no-compile-cache", "evaluate", "--workdir", str(tmp_path / "w")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"toy_csv/accuracy", "toy_csv/macro_f1", f"toy_csv/{metric}", "aggregate",
                            "checkpoint_step"}
    assert printed["aggregate"] == printed[f"toy_csv/{metric}"]


def test_evaluation_scores_each_row_as_predict_predicts_its_text(tmp_path, isolated_cache, minilm_dir, monkeypatch):
    """Evaluation batches rows shortest first; each is still scored against its own label."""
    from mtl.data.pipeline import column, load_raw_splits
    from mtl.inference import Predictor
    from mtl.models.heads import ClassificationHead
    from mtl.tasks import load_task

    # The pretrained encoder (one step of training): a random one predicts one label for every row.
    config = _toy_config(tmp_path, minilm_dir, steps=1, eval_every=1, checkpoint_every=1)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, random_init=None))
    Trainer(build_experiment(config), tmp_path / "w").run()
    scored = {}
    score = ClassificationHead.score

    def spy(head, predicted, references):
        scored.update(predicted=[head.labels[i] for i in predicted], references=[head.labels[i] for i in references])
        return score(head, predicted, references)

    monkeypatch.setattr(ClassificationHead, "score", spy)
    results = evaluate(tmp_path / "w", "validation", predictions_file=tmp_path / "predictions.jsonl")
    validation = load_raw_splits(load_task(config.tasks[0].task))[0]["validation"]
    assert scored["references"] == column(validation, "label")
    predictions = Predictor.from_workdir(tmp_path / "w").predict("toy_csv", column(validation, "text"))
    predicted = [r["label"] for r in predictions]
    assert len(set(predicted)) == 2, predicted  # else any order of the rows would pass
    assert scored["predicted"] == predicted
    # The predictions file: each row as mtl predict prints it, beside its gold label and origin.
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line.pop("probs") for line in lines] == [pytest.approx(r.pop("probs"), abs=1e-4) for r in predictions]
    assert lines == [dict(r, task="toy_csv", row=i, origin=origin, gold={"label": gold})
                     for i, (r, origin, gold) in enumerate(zip(predictions, column(validation, "origin"),
                                                               column(validation, "label"), strict=True))]
    assert np.mean([line["label"] == line["gold"]["label"] for line in lines]) == results["toy_csv/accuracy"]
    with pytest.raises(MtlError, match=r"not a training workdir \(no config\.yaml and checkpoints/\); run mtl train first"):
        evaluate(tmp_path / "nothing")


def test_evaluate_on_scores_a_trained_head_on_another_specs_data(tmp_path, isolated_cache, minilm_dir, capsys):
    """mtl evaluate --on: a workdir's head scores another dataset with its labels (here test rows
    only, under other column names), as predicting its texts and counting would; every mismatch
    between the spec and the trained task is one line naming it."""
    from mtl.cli import main
    from mtl.inference import Predictor
    from mtl.tasks import load_task
    from mtl.train.loop import evaluate_on

    config = _toy_config(tmp_path, minilm_dir, steps=1, eval_every=1, checkpoint_every=1)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, random_init=None))
    Trainer(build_experiment(config), tmp_path / "w").run()
    texts = [f"{'good ' * (i % 5)}{'bad ' * (i % 3)}show {i}" for i in range(12)]
    gold = ["pos" if i % 3 else "neg" for i in range(12)]
    rows = "body,verdict\n" + "\n".join(f"{t},{g}" for t, g in zip(texts, gold, strict=True))
    other = {"name": "reviews", "head": "classification", "metric": "macro_f1",
             "source": {"format": "csv", "splits": {"test": ["other.csv"]}}, "columns": {"text": "body", "label": "verdict"}}
    spec = write_task(tmp_path / "other", other, {"other.csv": rows})
    with pytest.raises(MtlError, match=r"source\.splits': a 'train' split is required"):
        load_task(spec)  # for training; scoring needs none

    results = evaluate_on(tmp_path / "w", spec, split="test", predictions_file=tmp_path / "p.jsonl")
    predicted = [r["label"] for r in Predictor.from_workdir(tmp_path / "w").predict("toy_csv", texts)]
    assert len(set(predicted)) == 2, predicted  # else any row order would pass
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray(gold)))
    assert results["reviews/accuracy"] == pytest.approx(accuracy)
    assert results["aggregate"] == results["reviews/macro_f1"] and results["checkpoint_step"] == 1
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(line["task"], line["text"], line["label"], line["gold"]["label"]) for line in lines] == [
        ("reviews", t, p, g) for t, p, g in zip(texts, predicted, gold, strict=True)]
    capsys.readouterr()
    assert main(["--no-compile-cache", "evaluate", "--workdir", str(tmp_path / "w"), "--on", str(spec),
                 "--task", "toy_csv", "--split", "test"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"reviews/accuracy", "reviews/macro_f1", "aggregate", "checkpoint_step"}
    assert printed["reviews/accuracy"] == round(accuracy, 4)
    assert main(["evaluate", "--workdir", str(tmp_path / "w"), "--task", "toy_csv"]) == 2
    assert "--task picks the head that reads --on's data" in capsys.readouterr().err

    def refused(changes: dict, files: dict | None = None, **kwargs) -> str:
        path = write_task(tmp_path / "bad", dict(other, **changes), files or {"other.csv": rows})
        with pytest.raises(MtlError) as e:
            evaluate_on(tmp_path / "w", path, **dict({"split": "test"}, **kwargs))
        return str(e.value)

    bad_label = rows + "\nso-so show,mixed\n"
    assert refused({}, {"other.csv": bad_label}).endswith(
        f"other.csv:14: label 'mixed' is not in the labels task 'toy_csv' of {tmp_path / 'w'} was trained on: "
        "['neg', 'pos']")
    assert re.search(r"reviews\.yaml: head 'regression', but task 'toy_csv' of \S+ was trained with head "
                     r"'classification'", refused({"head": "regression", "metric": "mse"}))
    pairs = "body,note,verdict\n" + "\n".join(f"{t},a note,{g}" for t, g in zip(texts, gold, strict=True))
    assert re.search(r"reviews\.yaml: task 'toy_csv' of \S+ reads one text an example; columns\.text_pair must not "
                     r"name a column here$", refused({"columns": {"text": "body", "text_pair": "note", "label": "verdict"}},
                                                     {"other.csv": pairs}))
    assert refused({}, task="nope").endswith("has no task 'nope'; its tasks: ['toy_csv']")
    assert re.search(r"reviews\.yaml: key 'metric': 'f1/meh' names a label task 'toy_csv' of \S+ was not trained on; "
                     r"its labels: \['neg', 'pos'\]$", refused({"labels": ["neg", "pos", "meh"], "metric": "f1/meh"}))
    assert refused({}, split="validation").endswith(
        "reviews.yaml: has no 'validation' split to score (it has ['test']); choose one with --split")


def test_predictions_file_of_a_token_task_and_a_cut_validation_split(tmp_path, isolated_cache, minilm_dir,
                                                                      monkeypatch):
    from mtl.data.pipeline import column, load_raw_splits
    from mtl.tasks import load_task

    dev = "Anne B-PER\nleft O\nRome B-LOC\n\nBob B-PER\nLee I-PER\nsaw O\nNew B-LOC\nYork I-LOC\n\nhi O\n"
    ner = write_task(tmp_path / "ner", dict(CONLL_SPEC, max_length=16), {"train.txt": (CONLL_TRAIN + "\n") * 4, "dev.txt": dev})
    config = _toy_config(tmp_path, minilm_dir, steps=2, eval_every=2, checkpoint_every=2)
    config = dataclasses.replace(config, tasks=[dataclasses.replace(config.tasks[0], max_eval_examples=5),
                                                dataclasses.replace(config.tasks[0], task=str(ner))])
    Trainer(build_experiment(config), tmp_path / "w").run()
    out = tmp_path / "predictions.jsonl"
    results = evaluate(tmp_path / "w", "validation", predictions_file=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["task"], line["row"]) for line in lines] == [("toy_csv", i) for i in range(5)] + \
        [("toy_ner", i) for i in range(3)]  # the first 5 of the cut split, as scored; then the tagging task
    tagged = [line for line in lines if line["task"] == "toy_ner"]
    raw = load_raw_splits(load_task(str(ner)))[0]["validation"]
    assert [line["tokens"] for line in tagged] == column(raw, "tokens")
    assert [line["gold"]["tags"] for line in tagged] == column(raw, "tags")
    assert [line["origin"] for line in tagged] == column(raw, "origin")
    assert tagged[1]["gold"]["entities"] == [{"type": "PER", "start": 0, "end": 2, "text": "Bob Lee"},
                                             {"type": "LOC", "start": 3, "end": 5, "text": "New York"}]
    assert all(len(line["tags"]) == len(line["tokens"]) for line in tagged)
    # The entities printed are the ones the metric counts: their F1 is the reported one.
    predicted = {(line["row"], e["type"], e["start"], e["end"]) for line in tagged for e in line["entities"]}
    gold = {(line["row"], e["type"], e["start"], e["end"]) for line in tagged for e in line["gold"]["entities"]}
    assert predicted, tagged  # a random tagger finds some: else any reading of the tags would pass
    f1 = 2 * len(predicted & gold) / (len(predicted) + len(gold))
    assert f1 == pytest.approx(results["toy_ner/entity_f1"])
    # A file that cannot be written is refused before the evaluation; one that fails at the end
    # is one error, and the scores are kept in metrics.jsonl.
    with pytest.raises(MtlError, match=f"^{tmp_path}: is a directory; give a file to write the predictions to$"):
        evaluate(tmp_path / "w", predictions_file=tmp_path)
    with pytest.raises(MtlError, match=f"^{tmp_path / 'no' / 'p.jsonl'}: no directory {tmp_path / 'no'} to write"):
        evaluate(tmp_path / "w", predictions_file=tmp_path / "no" / "p.jsonl")

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mtl.train.loop.replace_whole", full_disk)
    records = len(read_metrics(tmp_path / "w"))
    with pytest.raises(MtlError, match=f"^{out}: cannot write the predictions \\(No space left on device\\); the "
                                       f"scores are in {tmp_path / 'w' / 'metrics.jsonl'}$"):
        evaluate(tmp_path / "w", predictions_file=out)
    assert len(read_metrics(tmp_path / "w")) == records + 1
    assert out.read_text().count("\n") == 8  # the earlier file, whole


def test_bad_experiment_configs(tmp_path):
    # A bad value an override set names the override: the file shows another value.
    # An unknown key lists the section's keys, after OmegaConf's suggestion of a near miss.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["train.stpes=3"])
    assert str(error.value).startswith(f"{TINY} with override 'train.stpes=3': key 'train.stpes': Key 'stpes' not in "
                                       "'TrainSection'. Did you mean: 'steps'? Keys: ['steps', 'batch_size', 'eval_batch_size', 'seed', ")
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["trian.steps=3"])
    assert str(error.value) == (f"{TINY} with override 'trian.steps=3': key 'trian': Key 'trian' not in 'ExperimentConfig'"
                                ". Did you mean: 'train'? Keys: ['model', 'tasks', 'optim', 'train', 'meta', 'mesh', "
                                "'distributed']")
    with pytest.raises(MtlError, match=r"key 'train.sampling': 'random' is not one of \['proportional', 'temperature', "
                                       r"'uniform', 'round_robin', 'rates'\]"):
        load_experiment(TINY, ["train.sampling=random"])
    # Mixing rates: every task has one with sampling: rates, and none has one otherwise.
    rates = ["tasks.0.rate=2", "tasks.1.rate=1", "tasks.2.rate=1"]
    assert [t.rate for t in load_experiment(TINY, ["train.sampling=rates", *rates]).tasks] == [2.0, 1.0, 1.0]
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["train.sampling=rates", *rates[:2]])
    assert str(error.value) == f"{TINY}: key 'tasks.2.rate': train.sampling is 'rates': give every task its rate"
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["tasks.1.rate=3"])
    assert str(error.value) == (f"{TINY} with override 'tasks.1.rate=3': key 'tasks.1.rate': set, but train.sampling "
                                "is 'round_robin': rates are read only with sampling: rates")
    with pytest.raises(MtlError, match=r"key 'tasks\[0\].rate': must be positive, got 0"):
        load_experiment(TINY, ["train.sampling=rates", "tasks.0.rate=0", *rates[1:]])
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["model.init_checkpoint=-1"])
    assert str(error.value) == (f"{TINY} with override 'model.init_checkpoint=-1': key 'model.init_checkpoint': '-1' "
                                "is not best, latest or a saved checkpoint's step number")
    assert load_experiment(TINY, ["model.init_from=w", "model.init_checkpoint=250"]).model.init_checkpoint == "250"
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["model.init_checkpoint=latest"])
    assert str(error.value) == (f"{TINY} with override 'model.init_checkpoint=latest': key 'model.init_checkpoint': "
                                "set, but model.init_from is not: it chooses a checkpoint of that workdir")
    with pytest.raises(MtlError, match=r"tiny\.yaml with override 'model.dtype=bf16': key 'model.dtype': 'bf16' is not one of \['float32', 'bfloat16', 'float16'\]$"):
        load_experiment(TINY, ["model.dtype=bf16"])
    with pytest.raises(MtlError, match=r"tiny\.yaml with override 'model.remat_policy=dots': key 'model.remat_policy': 'dots' is not one of \['nothing_saveable', "):
        load_experiment(TINY, ["model.remat_policy=dots"])
    with pytest.raises(MtlError, match=r"override 'train.steps': expected key=value"):
        load_experiment(TINY, ["train.steps"])
    with pytest.raises(MtlError, match=r"with override 'tasks.7.weight=2': key 'tasks.7.weight': 'tasks' is a list; it has items 0 to 2$"):
        load_experiment(TINY, ["tasks.7.weight=2"])
    with pytest.raises(MtlError, match=r"key 'tasks.first.weight': 'tasks' is a list; it has items 0 to 2$"):
        load_experiment(TINY, ["tasks.first.weight=2"])
    # OmegaConf names a list item tasks[1]; the override wrote tasks.1.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["tasks.1.head=pooler"])
    assert str(error.value) == (f"{TINY} with override 'tasks.1.head=pooler': key 'tasks[1].head': Key 'head' not in "
                                "'TaskEntry'. Keys: ['task', 'weight', 'rate', 'overrides', 'max_train_examples', "
                                "'max_eval_examples']")
    with pytest.raises(MtlError) as error:  # a trace that would never start
        load_experiment(TINY, ["train.profile_steps=2", "train.profile_start=40"])
    assert str(error.value) == (f"{TINY} with override 'train.profile_start=40': key 'train.profile_start': 40 steps "
                                "before the profile leave none of train.steps (40) to trace")
    with pytest.raises(MtlError, match=r"with override 'optim.head_lr_scale=0': key 'optim.head_lr_scale': must be positive, got 0.0$"):
        load_experiment(TINY, ["optim.head_lr_scale=0"])
    # An override of a whole section owns the keys below it.
    with pytest.raises(MtlError, match=r"with override 'tasks=\[\]': key 'tasks': list at least one task$"):
        load_experiment(TINY, ["tasks=[]"])
    with pytest.raises(MtlError, match=r"with override 'tasks=\[\{task: x, weight: -1\}\]': key 'tasks\[0\].weight': must be non-negative"):
        load_experiment(TINY, ["tasks=[{task: x, weight: -1}]"])
    config = load_experiment(TINY, ["tasks=[{task: tweets}]"])
    with pytest.raises(MtlError, match=r"task 'tweets' is neither a file nor a shipped task"):
        build_experiment(config)
    # YAML reads {task:x} as a mapping with the one key "task:x". OmegaConf reports the key of a
    # mapping inside a list without the list's: the override is named all the same.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["tasks=[{task:x}]"])
    assert str(error.value) == (f"{TINY} with override 'tasks=[{{task:x}}]': key 'task:x': Key 'task:x' not in "
                                "'TaskEntry'. Did you mean: 'task'? (YAML reads 'task:x' as one key; write 'task: x', "
                                "with a space after the colon)")
    path = tmp_path / "colon.yaml"
    path.write_text(Path(TINY).read_text().replace("{hidden_size: 32,", "{hidden_size:32,"))
    with pytest.raises(MtlError) as error:
        load_experiment(path)
    assert str(error.value) == (f"{path}: key 'model.random_init.hidden_size:32': Key 'hidden_size:32' not in "
                                "'RandomEncoder'. Did you mean: 'hidden_size'? (YAML reads 'hidden_size:32' as one key; "
                                "write 'hidden_size: 32', with a space after the colon)")


def test_a_bad_key_in_the_file_does_not_blame_an_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(Path(TINY).read_text().replace("learning_rate: 1.0e-3", "learning_rate: -1.0"))
    with pytest.raises(MtlError) as error:
        load_experiment(path, ["train.steps=3", "optim.warmup_ratio=0.2"])
    assert str(error.value) == f"{path}: key 'optim.learning_rate': must be positive, got -1.0"
    # The last override of a key is the one that set it.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["train.steps=0", "train.steps=-2"])
    assert str(error.value) == f"{TINY} with override 'train.steps=-2': key 'train.steps': must be positive, got -2"
    # An override that cannot apply is the one named, not a later one of the same key.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["train.steps=abc", "train.steps=3"])
    assert str(error.value).startswith(f"{TINY} with override 'train.steps=abc': key 'train.steps': Value 'abc'")
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["tasks.7.weight=2", "tasks.7.weight=3"])
    assert str(error.value) == f"{TINY} with override 'tasks.7.weight=2': key 'tasks.7.weight': 'tasks' is a list; it has items 0 to 2"
    # Replacing a whole section with a scalar: OmegaConf names no key, the override does.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["model=3"])
    assert str(error.value) == f"{TINY} with override 'model=3': key 'model': Merge error: int is not a subclass of ModelSection. value: 3"


def test_an_override_value_that_is_not_yaml_is_one_line():
    # OmegaConf parses a value as YAML and lets the parser's error, a traceback, through.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["optim.learning_rate=[1"])
    assert str(error.value) == (f"{TINY} with override 'optim.learning_rate=[1': the value is not valid YAML: "
                                "did not find expected ',' or ']' at the end of the value")
    # Through a list item (OmegaConf.update's path). A task's overrides are the usual case:
    # an item's own brackets end the list early, and the message says how to quote it.
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, ["tasks.1.overrides=[labels=[a,b]]"])
    assert str(error.value) == (f"{TINY} with override 'tasks.1.overrides=[labels=[a,b]]': the value is not valid YAML: "
                                "did not find expected ',' or ']' at column 9 of the value; quote each item: '[\"labels=[a, b]\"]'")
    with pytest.raises(MtlError, match=r"with override 'train.steps=@3': the value is not valid YAML: found character that cannot start any token at column 1 of the value$"):
        load_experiment(TINY, ["train.steps=@3"])
    # The quoted form the message suggests is read as one item.
    assert load_experiment(TINY, ['tasks.1.overrides=["labels=[a, b]"]']).tasks[1].overrides == ["labels=[a, b]"]


def test_a_section_given_twice_is_refused(tmp_path):
    # YAML parsers keep the last value of a repeated key, so the first section would vanish.
    path = tmp_path / "twice.yaml"
    path.write_text(Path(TINY).read_text() + "train:\n  steps: 3\n")
    first = next(i for i, line in enumerate(Path(TINY).read_text().splitlines(), 1) if line.startswith("train:"))
    last = len(Path(TINY).read_text().splitlines()) + 1
    with pytest.raises(MtlError) as error:
        load_experiment(path)
    assert str(error.value) == f"{path}:{last}:1: invalid YAML: key 'train' is given twice (first on line {first})"


def test_keys_from_a_yaml_merge_may_be_overridden(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text(Path(TINY).read_text().replace("train:\n", "train:\n  <<: {steps: 7, temperature: 3.0}\n", 1))
    config = load_experiment(path)
    assert (config.train.steps, config.train.temperature) == (40, 3.0)  # the file's steps win


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=-1", "key 'optim.learning_rate': must be positive, got -1.0"),
    ("optim.eps=0", "key 'optim.eps': must be positive, got 0.0"),
    ("optim.clip_norm=0", "key 'optim.clip_norm': must be positive, got 0.0"),
    ("optim.b1=1.5", "key 'optim.b1': must be in [0, 1), got 1.5"),
    ("optim.weight_decay=-0.1", "key 'optim.weight_decay': must be non-negative, got -0.1"),
    ("optim.warmup_ratio=1", "key 'optim.warmup_ratio': must be in [0, 1), got 1.0"),
    ("optim.layer_decay=1.5", "key 'optim.layer_decay': must be in (0, 1], got 1.5"),
    ("optim.freeze_layers=-1", "key 'optim.freeze_layers': must be non-negative, got -1"),
    ("train.temperature=0", "key 'train.temperature': must be positive, got 0.0"),
    ("train.early_stopping_patience=0", "key 'train.early_stopping_patience': must be positive, got 0"),
    ("train.profile_steps=-1", "key 'train.profile_steps': must be non-negative, got -1"),
    ("train.buckets=[64,0]", "key 'train.buckets[1]': must be positive, got 0"),
    ("tasks.2.weight=-1", "key 'tasks[2].weight': must be non-negative, got -1.0"),
    ("tasks.0.max_train_examples=0", "key 'tasks[0].max_train_examples': must be positive, got 0"),
    ("model.random_init.num_layers=0", "key 'model.random_init.num_layers': must be positive, got 0"),
])
def test_out_of_range_values_are_refused_at_load(override, message):
    with pytest.raises(MtlError) as error:
        load_experiment(TINY, [override])
    assert str(error.value) == f"{TINY} with override {override!r}: {message}"


def test_null_optional_keys_are_not_range_checked():
    config = load_experiment(TINY, ["optim.clip_norm=null", "train.early_stopping_patience=null",
                                    "model.random_init=null"])
    assert config.optim.clip_norm is None and config.model.random_init is None


def test_freezing_more_layers_than_the_encoder_has_is_refused(tmp_path, isolated_cache, minilm_dir):
    config = _toy_config(tmp_path, minilm_dir)
    config = dataclasses_replace(config, optim=dataclasses_replace(config.optim, freeze_layers=3))
    with pytest.raises(MtlError, match=r"^key 'optim.freeze_layers': 3 is more than the encoder's 2 layers$"):
        Trainer(build_experiment(config), tmp_path / "w")


def test_a_frozen_encoder_run_with_fast_heads_trains_the_head_alone(tmp_path, isolated_cache, minilm_dir):
    """Linear probing from the shipped configs (they all set head_lr_scale): the run trains, the
    encoder stays bit for bit, and the Trainer's step takes no encoder gradient at all."""
    config = _toy_config(tmp_path, minilm_dir, steps=4)
    config = dataclasses_replace(config, optim=dataclasses_replace(config.optim, freeze_encoder=True, head_lr_scale=10.0))
    trainer = Trainer(build_experiment(config), tmp_path / "w")
    before = jax.tree.map(np.array, trainer.state.params["model"])
    batch = trainer.next_batch(0)[1]
    grads, _ = trainer.train_steps["toy_csv"].gradients(trainer.state, batch)
    assert jax.tree.leaves(grads["model"]["encoder"]) == [] and jax.tree.leaves(grads["model"]["heads"])
    trainer.positions["toy_csv"] = 0
    trainer.run()
    after = trainer.state.params["model"]
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before["encoder"])[0],
                                jax.tree.leaves(after["encoder"]), strict=True):
        np.testing.assert_array_equal(np.asarray(new), old, err_msg=str(path))
    assert not np.array_equal(np.asarray(after["heads"]["toy_csv"]["out"]["kernel"][...]),
                              np.asarray(before["heads"]["toy_csv"]["out"]["kernel"][...]))


def test_unknown_best_metric_is_refused_before_training(tmp_path, isolated_cache, minilm_dir):
    config = _toy_config(tmp_path, minilm_dir, best_metric="toy_csv/f1")
    with pytest.raises(MtlError, match=r"^key 'train.best_metric': 'toy_csv/f1' is not one of \['aggregate', "
                                       r"'toy_csv/accuracy', 'toy_csv/macro_f1', 'toy_csv/weighted_f1', 'toy_csv/mcc'\]$"):
        Trainer(build_experiment(config), tmp_path / "w")
    assert not (tmp_path / "w").exists()
    accepted = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, best_metric="toy_csv/macro_f1")), tmp_path / "m")
    accepted.checkpointer.close()


def test_mixing_rates_choose_the_task_of_each_step(tmp_path, minilm_dir):
    rates = ["train.sampling=rates", "tasks.0.rate=2", "tasks.1.rate=1", "tasks.2.rate=1"]
    trainer = Trainer(build_experiment(load_experiment(TINY, rates)), tmp_path / "w")
    trainer.checkpointer.close()
    assert trainer.sampler.probabilities.tolist() == [0.5, 0.25, 0.25]  # not the tasks' sizes
    tasks = Counter(trainer.tasks[trainer.sampler.task_at(step)] for step in range(4000))
    assert tasks["tweet_sentiment"] / 4000 == pytest.approx(0.5, abs=0.03)


def test_overrides_reach_list_items():
    base = load_experiment(TINY)
    config = load_experiment(TINY, ["tasks.1.overrides=[max_length=48]", "tasks.0.weight=2.5", "train.buckets.1=48"])
    assert config.tasks[1].overrides == ["max_length=48"] and config.tasks[0].weight == 2.5
    assert config.train.buckets[1] == 48 and len(config.train.buckets) == len(base.train.buckets)
    assert [t.task for t in config.tasks] == [t.task for t in base.tasks]
    assert config.tasks[2] == base.tasks[2]
    # A dotted key into a section that is None fills it with the schema's defaults.
    config = load_experiment(TINY, ["model.random_init=null", "model.random_init.hidden_size=16"])
    assert config.model.random_init.hidden_size == 16 and config.model.random_init.num_layers == 2


def test_a_batch_larger_than_a_train_split_names_the_task(tmp_path, isolated_cache, minilm_dir):
    with pytest.raises(MtlError, match=r"^toy_csv/train: 32 examples, fewer than one batch of 64 \(train.batch_size\)$"):
        Trainer(build_experiment(_toy_config(tmp_path, minilm_dir, batch_size=64)), tmp_path / "w")


def test_a_workdir_that_cannot_be_created_is_one_error(tmp_path, isolated_cache, minilm_dir):
    (tmp_path / "file").write_text("")
    with pytest.raises(MtlError, match=r"/file/w: cannot create the workdir \(Not a directory\)$"):
        Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "file" / "w")
    with pytest.raises(MtlError) as error:
        Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / "file")
    assert str(error.value) == f"{tmp_path / 'file'}: is a file; --workdir names the run's directory"
    assert (tmp_path / "file").read_text() == ""


def test_a_workdir_another_process_trains_in_is_refused_and_left_as_it_was(tmp_path, isolated_cache, minilm_dir):
    first = _toy_config(tmp_path, minilm_dir)
    Trainer(build_experiment(first), tmp_path / "w").run()
    files = {p: p.read_bytes() for p in sorted((tmp_path / "w").rglob("*")) if p.is_file()}
    # Another process holds the lock, as a run started earlier in another terminal would.
    holder = subprocess.Popen([sys.executable, "-c", "import filelock, sys; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
                               "print('held', flush=True); sys.stdin.read()", str(tmp_path / "w" / LOCK_FILE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        longer = _toy_config(tmp_path, minilm_dir, steps=12)
        with pytest.raises(MtlError, match=rf"^{tmp_path / 'w'}: another process is training in this workdir \(it holds "
                                           rf"{tmp_path / 'w' / LOCK_FILE}\); wait for it to end, or use another --workdir$"):
            Trainer(build_experiment(longer), tmp_path / "w").run()
        assert {p: p.read_bytes() for p in sorted((tmp_path / "w").rglob("*")) if p.is_file()} == files
    finally:
        holder.communicate("")
    # Once that process has ended, the same run resumes.
    Trainer(build_experiment(longer), tmp_path / "w").run()
    assert max(_losses(tmp_path / "w")) == 12


def test_a_damaged_checkpoint_is_one_error_naming_it_and_the_one_before(tmp_path, isolated_cache, minilm_dir):
    _trained(tmp_path, minilm_dir)  # checkpoints 4 and 8
    checkpoints = tmp_path / "a" / "checkpoints"
    data = max((checkpoints / "8" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with data.open("r+b") as f:  # a copy cut short
        f.truncate(data.stat().st_size // 2)
    said = (rf"{checkpoints}/8: cannot read this checkpoint \(OUT_OF_RANGE: Error reading \S+ in OCDBT database at "
            rf"local file \S+: Requested byte range \[\d+, \d+\) is not valid for value of size \d+\); move it out of "
            rf"{checkpoints} to use checkpoint 4")
    # One line: orbax's abandoned reads used to print hundreds of tracebacks after it.
    proc = subprocess.run(_mtl("evaluate", "--workdir", str(tmp_path / "a"), "--checkpoint", "latest"),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and re.fullmatch(f"mtl: error: {said}\n", proc.stderr), proc.stderr[-3000:]
    longer = _toy_config(tmp_path, minilm_dir, steps=12)
    with pytest.raises(MtlError, match=f"^{said}$"):
        Trainer(build_experiment(longer), tmp_path / "a").run()
    # Moved out as the message says, the run resumes from checkpoint 4.
    (checkpoints / "8").rename(tmp_path / "damaged")
    Trainer(build_experiment(longer), tmp_path / "a").run()
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [8, 12]
    assert [r["step"] for r in read_metrics(tmp_path / "a") if r["kind"] == "train"].count(5) == 2  # again, resumed at 4


def test_a_failed_save_is_one_error_without_orbax_tracebacks(tmp_path, isolated_cache, minilm_dir):
    config = tmp_path / "toy.yaml"
    config.write_text(to_yaml(_toy_config(tmp_path, minilm_dir, checkpoint_every=2)))

    # mtl, where a file past 1 MiB cannot be written, as on a full disk (EFBIG for ENOSPC); the
    # limit and the ignored SIGXFSZ pass through exec (preexec_fn would fork this threaded process).
    small_files = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); os.execv(sys.executable, sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", small_files, *_mtl("train", str(config), "--workdir", str(tmp_path / "w"))],
                          capture_output=True, text=True)
    # The save of step 2 fails in the background and is said at the next save; orbax's own
    # tracebacks (hundreds of lines) are not.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(rf"mtl: error: {tmp_path / 'w' / 'checkpoints'}: cannot save a checkpoint \(.*File too large.*\); "
                        r"once the cause is fixed, the same command starts over \(no checkpoint is saved\)",
                        proc.stderr.splitlines()[-1])


def test_cli_train_errors_are_one_line(tmp_path):
    proc = subprocess.run(_mtl("train", TINY, "train.bogus=1", "--workdir", str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mtl: error: ") and "key 'train.bogus'" in proc.stderr
    proc = subprocess.run(_mtl("evaluate", "--workdir", str(tmp_path / "none")), capture_output=True, text=True)
    assert proc.returncode == 2 and "not a training workdir" in proc.stderr


# ------------------------------------------------------------ transfer, predict, export

def _trained(tmp_path, minilm_dir, name="a"):
    trainer = Trainer(build_experiment(_toy_config(tmp_path, minilm_dir)), tmp_path / name)
    trainer.run()
    return trainer


def _with(config, **model):
    from dataclasses import replace

    return replace(config, model=replace(config.model, **model))


def test_transfer_loads_encoder_and_matching_heads(tmp_path, isolated_cache, minilm_dir, caplog):
    source = _trained(tmp_path, minilm_dir)
    saved = Checkpointer(tmp_path / "a" / "checkpoints")
    best = saved.best_step()
    saved.close()
    config = _with(_toy_config(tmp_path, minilm_dir, seed=3), init_from=str(tmp_path / "a"))
    with caplog.at_level("INFO"):
        target = build_experiment(config)
    assert "toy_csv: loaded" in caplog.text and "encoder: loaded" in caplog.text
    trained_params = Checkpointer(tmp_path / "a" / "checkpoints")
    tree = trained_params.restore_tree(best)["params"]["model"]
    trained_params.close()
    kernel = np.asarray(target.model.heads["toy_csv"].out.kernel[...])
    np.testing.assert_array_equal(kernel, np.asarray(tree["heads"]["toy_csv"]["out"]["kernel"]["value"]))
    assert source.tasks == ["toy_csv"]


def test_transfer_refuses_changed_labels_unless_reinitialised(tmp_path, isolated_cache, minilm_dir, caplog):
    _trained(tmp_path, minilm_dir)
    config = _with(_toy_config(tmp_path, minilm_dir), init_from=str(tmp_path / "a"))
    spec = Path(config.tasks[0].task)
    spec.write_text(spec.read_text().replace("- neg\n- pos", "- pos\n- neg"))
    with pytest.raises(MtlError, match=r"head 'toy_csv' was trained on labels \['neg', 'pos'\], this task has \['pos', 'neg'\]; list it in model.reinit_heads"):
        build_experiment(config)
    with caplog.at_level("INFO"):
        build_experiment(_with(config, reinit_heads=["toy_csv"]))
    assert "toy_csv: reinitialised" in caplog.text
    with pytest.raises(MtlError, match=r"^key 'model.reinit_heads': \['toy_cvs'\] are not among this run's heads \['toy_csv'\]$"):
        build_experiment(_with(config, reinit_heads=["toy_cvs"]))


def test_transfer_into_another_architecture_names_the_parameter(tmp_path, isolated_cache, minilm_dir):
    _trained(tmp_path, minilm_dir)
    config = _toy_config(tmp_path, minilm_dir)
    wider = _with(config, init_from=str(tmp_path / "a"),
                  random_init=dataclasses_replace(config.model.random_init, hidden_size=32, intermediate_size=64))
    with pytest.raises(MtlError, match=r"encoder parameter 'encoder.embeddings.norm.bias' is \(16,\) in the checkpoint, \(32,\) in this model"):
        build_experiment(wider)


def test_transfer_from_a_model_directory_says_where_it_goes(tmp_path, isolated_cache, minilm_dir):
    config = _toy_config(tmp_path, minilm_dir)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    with pytest.raises(MtlError) as error:
        build_experiment(_with(config, init_from=str(tmp_path / "export")))
    assert str(error.value) == (f"key 'model.init_from': {tmp_path / 'export'} is not a training workdir (no checkpoints/); "
                                "it holds a config.json: a Hugging Face model directory, such as an mtl export, goes in "
                                "model.encoder")
    with pytest.raises(MtlError) as error:
        build_experiment(_with(config, init_from=str(tmp_path / "nothing")))
    assert str(error.value) == f"key 'model.init_from': {tmp_path / 'nothing'} is not a training workdir (no checkpoints/)"


def test_transfer_between_scanned_and_looped_layers(tmp_path, isolated_cache, minilm_dir):
    """Scanning is a run option, not an architecture: a checkpoint trained with one layout
    initialises a model with the other, layer by layer; another depth is still refused."""
    _trained(tmp_path, minilm_dir)  # with the encoder's default, scanned layers
    config = _with(_toy_config(tmp_path, minilm_dir, seed=3), init_from=str(tmp_path / "a"))

    def per_layer(scan):
        model = build_experiment(_with(config, scan_layers=scan)).model
        assert model.encoder.config.scan_layers == scan
        return unstack_layers(flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))), "encoder.layers.")

    same, other = per_layer(True), per_layer(False)
    assert set(other) == set(same) and "encoder.layers.1.query.kernel" in other
    for name in same:
        np.testing.assert_array_equal(np.asarray(other[name]), np.asarray(same[name]), err_msg=name)
    deeper = _with(config, scan_layers=True,
                   random_init=dataclasses_replace(config.model.random_init, num_layers=3))
    with pytest.raises(MtlError, match=r"this model has encoder parameter 'encoder.layers.2.attention_norm.bias' \(16,\), which the checkpoint lacks"):
        build_experiment(deeper)
    shallower = _with(config, scan_layers=False,
                      random_init=dataclasses_replace(config.model.random_init, num_layers=1))
    with pytest.raises(MtlError, match=r"the checkpoint has encoder parameter 'encoder.layers.1\..*', which this model lacks"):
        build_experiment(shallower)


def test_a_checkpoint_chosen_by_its_step(tmp_path, isolated_cache, minilm_dir, monkeypatch, capsys, caplog):
    """evaluate, predict, export and a transfer each read the checkpoint saved at a step they are
    given; a step that is not saved is one error listing those that are, said before the model
    and data load."""
    import mtl.train.experiment
    from mtl.cli import main
    from mtl.inference import Predictor, export

    with caplog.at_level("INFO", logger="mtl"):
        _trained(tmp_path, minilm_dir)  # checkpoints 4 and 8, both evaluated
    checkpointer = Checkpointer(tmp_path / "a" / "checkpoints")
    best = checkpointer.best_step()
    assert caplog.messages[-1] == (f"the best checkpoint by train.best_metric (aggregate) is step {best}, the one "
                                   "later commands read unless given --checkpoint")
    other = ({4, 8} - {best}).pop()
    saved = checkpointer.restore_tree(other)["params"]["model"]
    assert checkpointer.describe_saved() == f"saved: {'4 (best), 8' if best == 4 else '4, 8 (best)'}"
    checkpointer.close()
    kernel = np.asarray(saved["heads"]["toy_csv"]["out"]["kernel"]["value"])
    assert not np.array_equal(kernel, load_trained(tmp_path / "a")[0]["model"]["heads"]["toy_csv"]["out"]["kernel"])

    results = evaluate(tmp_path / "a", checkpoint=str(other), predictions_file=tmp_path / "p.jsonl")  # as --checkpoint
    assert results["checkpoint_step"] == other
    predictor = Predictor.from_workdir(tmp_path / "a", other)
    np.testing.assert_array_equal(predictor.model.heads["toy_csv"].out.kernel[...], kernel)
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    texts = [line["text"] for line in lines]
    probs = [line["probs"]["pos"] for line in lines]
    assert probs == pytest.approx([r["probs"]["pos"] for r in predictor.predict("toy_csv", texts)], abs=1e-6)
    assert probs != pytest.approx([r["probs"]["pos"] for r in Predictor.from_workdir(tmp_path / "a").predict(
        "toy_csv", texts)], abs=1e-6)  # the best checkpoint's differ: the step was read, not the best
    out = export(tmp_path / "a", tmp_path / "exported", other)
    assert json.loads((out / "tasks.json").read_text())["step"] == other
    config = _with(_toy_config(tmp_path, minilm_dir, seed=3), init_from=str(tmp_path / "a"), init_checkpoint=str(other))
    np.testing.assert_array_equal(build_experiment(config).model.heads["toy_csv"].out.kernel[...], kernel)

    missing = rf"^{tmp_path / 'a'}: no checkpoint at step 5; saved: 4(?: \(best\))?, 8(?: \(best\))?$"
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would undo isolated_cache's too
        patch.setattr(mtl.train.experiment, "build_experiment", lambda *a: pytest.fail("built before the check"))
        with pytest.raises(MtlError, match=missing):
            evaluate(tmp_path / "a", checkpoint=5)
    with pytest.raises(MtlError, match=missing):
        Predictor.from_workdir(tmp_path / "a", 5)
    with pytest.raises(MtlError, match=missing):
        build_experiment(_with(config, init_checkpoint="5"))
    capsys.readouterr()
    assert main(["--no-compile-cache", "export", "--workdir", str(tmp_path / "a"), "--out", str(tmp_path / "e2"),
                 "--checkpoint", "last"]) == 2
    assert capsys.readouterr().err == ("mtl: error: --checkpoint: 'last' is not best, latest or a saved checkpoint's "
                                       "step number\n")
    assert not (tmp_path / "e2").exists()


def dataclasses_replace(obj, **changes):
    from dataclasses import replace

    return replace(obj, **changes)


def test_predict_and_export(tmp_path, isolated_cache, minilm_dir):
    import torch
    import transformers

    from mtl.inference import Predictor, export

    trainer = _trained(tmp_path, minilm_dir)
    predictor = Predictor.from_workdir(tmp_path / "a")
    results = predictor.predict("toy_csv", ["good good film", "film"])
    assert [set(r) for r in results] == [{"text", "label", "probs"}] * 2
    assert all(r["label"] in ("neg", "pos") and abs(sum(r["probs"].values()) - 1) < 1e-3 for r in results)
    with pytest.raises(MtlError, match=r"task 'nope' is not in this workdir; tasks: \['toy_csv'\]"):
        predictor.predict("nope", ["x"])

    out = export(tmp_path / "a", tmp_path / "exported")
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["good good film"], return_tensors="np")
    with torch.no_grad():
        hf = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    ours = predictor.model.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    np.testing.assert_allclose(ours, hf, atol=1e-5)
    tasks = json.loads((out / "tasks.json").read_text())["tasks"]
    assert tasks["toy_csv"]["labels"] == ["neg", "pos"] and tasks["toy_csv"]["head"] == "classification"
    # Another model's directory is left as it was; an earlier export may be written over.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(MtlError, match=rf"^{tmp_path / 'other'}: holds files that are not an mtl export \(config.json\); "
                                       "export into a new or empty directory, or one an earlier mtl export wrote$"):
        export(tmp_path / "a", tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["config.json"]
    with pytest.raises(MtlError) as error:
        export(tmp_path / "a", tmp_path / "other" / "config.json")
    assert str(error.value) == f"{tmp_path / 'other' / 'config.json'}: is a file; --out names the directory to export into"
    assert (tmp_path / "other" / "config.json").read_text() == "{}"
    assert export(tmp_path / "a", out) == out
    assert trainer.tasks == ["toy_csv"]


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_an_export_cut_short_keeps_the_earlier_export(tmp_path, isolated_cache, minilm_dir, monkeypatch, failure):
    """A full disk while the heads are written: OUT keeps the earlier export, file for file,
    and a new OUT is not left behind. safetensors reports the disk in an error of its own."""
    import errno

    from safetensors import SafetensorError

    import mtl.inference
    from mtl.inference import export

    _trained(tmp_path, minilm_dir)
    out = export(tmp_path / "a", tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save_file = mtl.inference.save_file

    def disk_full_halfway(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mtl.inference, "save_file", disk_full_halfway)
    with pytest.raises(MtlError, match=rf"^{out}: the export could not be written \(No space left on device\); "
                                       "the earlier export in it is kept$"):
        export(tmp_path / "a", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "no staging directory left, no file changed"
    with pytest.raises(MtlError, match=r"could not be written \(No space left on device\); nothing was left there$"):
        export(tmp_path / "a", tmp_path / "new" / "exported")
    assert not (tmp_path / "new" / "exported").exists()
    # An export killed outright leaves its staging directory: the next export clears it away.
    monkeypatch.setattr(mtl.inference, "save_file", real_save_file)
    (tmp_path / "new" / "exported" / ".export-killed").mkdir(parents=True)
    (tmp_path / "new" / "exported" / ".export-killed" / "model.safetensors").write_bytes(b"half")
    out = export(tmp_path / "a", tmp_path / "new" / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_predict_batches_texts_shortest_first_and_answers_in_their_order(tmp_path, isolated_cache, minilm_dir, caplog):
    from flax import nnx

    from mtl.inference import Predictor
    from mtl.models.heads import build_head
    from mtl.models.model import MultiTaskModel
    from mtl.tasks import TaskHead, load_tasks

    _trained(tmp_path, minilm_dir)
    trained = Predictor.from_workdir(tmp_path / "a")
    # A random tagging head beside the trained one: batching must not change any prediction.
    ner = load_tasks([str(write_task(tmp_path / "ner", dict(CONLL_SPEC, max_length=16),
                                     {"train.txt": CONLL_TRAIN, "dev.txt": CONLL_DEV}))])[0]
    heads = {"toy_csv": trained.model.head("toy_csv"),
             "toy_ner": build_head(ner.head, 16, ner.labels, ner.head_options, rngs=nnx.Rngs(3))}
    predictor = Predictor(MultiTaskModel(trained.model.encoder, heads), trained.tokenizer,
                          {**trained.tasks, "toy_ner": TaskHead.of(ner)}, {**trained.labels, "toy_ner": ner.labels},
                          trained.step, batch_size=4)
    shapes = []
    for task, step in predictor._steps.items():
        predictor._steps[task] = lambda params, batch, step=step: shapes.append(batch["input_ids"].shape) or step(params, batch)
    # 5 to 50 tokens, not in length order: toy_csv pads to buckets 32 and 64, toy_ner cuts some at 16.
    texts = [" ".join(["John", "visited", "Paris", "and", "New", "York"] * 10)[: 3 + 25 * (i * 7 % 11)] for i in range(11)]
    answers = {}
    for task in ("toy_csv", "toy_ner"):
        shapes.clear()
        with caplog.at_level(logging.WARNING):
            together = predictor.predict(task, texts)
            assert predictor.predict(task, texts[3:4]) == together[3:4]  # said once per task
        # 11 texts in batches of 4 rows (the last one padded), shortest first, each batch padded to
        # its longest text's bucket (tokens 4-17, 22-35 and 41-50); then text 3 (50 tokens) alone.
        assert shapes == {"toy_csv": [(4, 32), (4, 64), (4, 64), (1, 64)], "toy_ner": [(4, 16)] * 3 + [(1, 16)]}[task]
        answers[task] = together
        alone = [predictor.predict(task, [text])[0] for text in texts]
        assert [r["text"] for r in together] == texts
        for one, other in zip(together, alone, strict=True):
            assert {k: v for k, v in one.items() if k != "probs"} == {k: v for k, v in other.items() if k != "probs"}
            # Other batch shapes sum in other orders; the probabilities are rounded to 4 places.
            for label, p in one.get("probs", {}).items():
                assert abs(p - other["probs"][label]) <= 1.0001e-4
    # A token task also takes each text as its words: the tags of the text split at whitespace.
    def spans(results):
        return [{k: r[k] for k in ("tokens", "tags", "entities")} for r in results]

    assert spans(predictor.predict("toy_ner", [text.split() for text in texts])) == spans(answers["toy_ner"])
    given = predictor.predict("toy_ner", [["John", "visited", "Paris", ","]])[0]
    assert given["text"] == "John visited Paris ," and given["tokens"] == ["John", "visited", "Paris", ","]
    assert len(given["tags"]) == 4
    with pytest.raises(MtlError, match=r"^task 'toy_csv' reads whole texts: give strings, not lists of words$"):
        predictor.predict("toy_csv", [["good", "film"]])
    assert caplog.text.count("texts are longer than task") == 1  # toy_csv cuts at 128
    assert ("8 of 11 texts are longer than task 'toy_ner''s max_length of 16 tokens; only their first 16 are read, "
            "later words tagged O (said once per task)") in caplog.text

    # mtl predict streams stdin; a bad line stops it after every line before it has its result.
    lines = [json.dumps({"text": text}) for text in texts[:3]] + ['{"txt": 1}', json.dumps({"text": texts[3]})]
    proc = subprocess.run(_mtl("predict", "--workdir", str(tmp_path / "a"), "--task", "toy_csv", "--batch-size", "2"),
                          input="\n".join(lines) + "\n", capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == 'mtl: error: stdin:4: expected a JSON object with a "text" key\n'
    assert [json.loads(line) for line in proc.stdout.splitlines()] == answers["toy_csv"][:3]
    proc = subprocess.run(_mtl("predict", "--workdir", str(tmp_path / "a"), "--task", "toy_csv"),
                          input='{"tokens": ["good", "film"]}\n', capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == 'mtl: error: stdin:1: "tokens" are for token tasks; this task reads whole texts: give "text"\n'


def test_a_spec_edited_to_another_head_is_refused_and_predict_needs_no_spec(tmp_path, isolated_cache, minilm_dir):
    from mtl.inference import Predictor

    _trained(tmp_path, minilm_dir)
    texts = ["good good film", "film", "good " * 9]
    before = Predictor.from_workdir(tmp_path / "a").predict("toy_csv", texts)
    spec = tmp_path / "task" / "toy_csv.yaml"
    spec.write_text(spec.read_text() + "head_options: {pooling: mean}\n")  # same shapes, another meaning
    said = (f"{tmp_path / 'a'}: task 'toy_csv' was trained with head 'classification' and head_options {{}}, and its "
            "spec now gives 'classification' and {'pooling': 'mean'}; put them back, or use a new --workdir "
            "(model.init_from transfers the encoder)")
    with pytest.raises(MtlError) as error:
        evaluate(tmp_path / "a")
    assert str(error.value) == said
    with pytest.raises(MtlError) as error:
        Trainer(build_experiment(load_experiment(tmp_path / "a" / "config.yaml", ["train.steps=12"])), tmp_path / "a").run()
    assert str(error.value) == said
    # Predict reads the head from the checkpoint: the edit changes nothing, nor does the spec's absence.
    assert Predictor.from_workdir(tmp_path / "a").predict("toy_csv", texts) == before
    spec.rename(tmp_path / "elsewhere.yaml")
    assert Predictor.from_workdir(tmp_path / "a").predict("toy_csv", texts) == before


def test_a_pair_task_is_scored_as_predict_predicts_its_pairs_and_its_spec_cannot_drop_the_pair(
        tmp_path, isolated_cache, minilm_dir, monkeypatch, capsys, caplog):
    import io
    from unittest.mock import ANY

    from mtl.cli import main
    from mtl.data.pipeline import column, load_raw_splits
    from mtl.inference import Predictor
    from mtl.models.heads import ClassificationHead
    from mtl.tasks import load_task

    rows = "premise,hypothesis,gold\n" + "\n".join(
        f"{'good ' * (i % 5 + 1)}film {i},{'good' if i % 2 else 'bad'},{'yes' if i % 2 else 'no'}"
        for i in range(64))
    spec = write_task(tmp_path / "task", dict(CSV_SPEC, name="toy_pair", labels=["no", "yes"],
                                              columns={"text": "premise", "text_pair": "hypothesis", "label": "gold"},
                                              split={"seed": 0, "train": 0.5, "validation": 0.25, "test": 0.25}),
                      {"data.csv": rows})
    # The pretrained encoder with a fast head learns in a few steps that the label is the second text's.
    config = load_experiment(None, data={
        "model": {"encoder": str(minilm_dir)}, "tasks": [{"task": str(spec)}],
        "optim": {"learning_rate": 1e-4, "head_lr_scale": 100},
        "train": {"steps": 8, "batch_size": 8, "buckets": [16, 32], "eval_every": 8, "checkpoint_every": 8,
                  "tensorboard": False}})
    Trainer(build_experiment(config), tmp_path / "w").run()
    scored = {}
    score = ClassificationHead.score

    def spy(head, predicted, references):
        scored.update(predicted=[head.labels[i] for i in predicted])
        return score(head, predicted, references)

    monkeypatch.setattr(ClassificationHead, "score", spy)
    evaluate(tmp_path / "w", "validation")
    validation = load_raw_splits(load_task(spec))[0]["validation"]
    pairs = list(zip(column(validation, "text"), column(validation, "text_pair"), strict=True))
    predicted = [r["label"] for r in Predictor.from_workdir(tmp_path / "w").predict("toy_pair", pairs)]
    assert len(set(predicted)) == 2, predicted  # else any reading of the rows would pass
    assert scored["predicted"] == predicted
    with pytest.raises(MtlError, match=r"^task 'toy_pair' reads pairs of texts: give each input as \(text, text_pair\)$"):
        Predictor.from_workdir(tmp_path / "w").predict("toy_pair", ["good film"])
    with caplog.at_level("WARNING"):
        Predictor.from_workdir(tmp_path / "w").predict("toy_pair", [("good " * 200, "good"), ("film", "good")])
    assert ("1 of 2 pairs are longer than task 'toy_pair''s max_length of 128 tokens; each is cut to 128, the longer "
            "text first (said once per task)") in caplog.messages
    # mtl predict takes pairs as JSON lines, not as arguments. (Not -q, nor the compilation cache:
    # both would stay set for the tests that follow in this process.)
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "good film 3", "text_pair": "good"}\n'))
    capsys.readouterr()
    predict = ["--no-compile-cache", "predict", "--workdir", str(tmp_path / "w"), "--task", "toy_pair"]
    assert main(predict) == 0
    assert json.loads(capsys.readouterr().out) == {"text": "good film 3", "text_pair": "good", "label": "yes",
                                                   "probs": ANY}
    assert main([*predict, "good film"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ('mtl: error: task \'toy_pair\' reads pairs of texts: give them '
                                                        'as {"text": ..., "text_pair": ...} lines on stdin, not as '
                                                        'arguments')
    # A spec edited to read the premise alone would feed the trained head another input.
    spec.write_text(spec.read_text().replace("  text_pair: hypothesis\n", ""))
    with pytest.raises(MtlError) as error:
        evaluate(tmp_path / "w")
    assert str(error.value) == (f"{tmp_path / 'w'}: task 'toy_pair' was trained on pairs of texts, and its spec now "
                                "gives single texts (columns.text_pair); put it back, or use a new --workdir "
                                "(model.init_from transfers the encoder)")


def test_a_multiple_choice_task_trains_and_is_scored_as_predict_predicts_its_choices(
        tmp_path, isolated_cache, minilm_dir, monkeypatch, capsys):
    import io
    from unittest.mock import ANY

    from mtl.cli import main
    from mtl.data.pipeline import column, load_raw_splits
    from mtl.inference import Predictor
    from mtl.models.heads import MultipleChoiceHead
    from mtl.tasks import load_task

    animals = ["cat", "dog", "bird", "fish"]
    rows = [{"story": f"day {i}: the {animals[i % 4]} went out",
             "endings": [f"the {a} came back" for a in animals[i % 3:] + animals[:i % 3]],
             "answer": (i % 4 - i % 3) % 4} for i in range(64)]
    spec = write_task(tmp_path / "task", dict(CSV_SPEC, name="toy_choice", head="multiple_choice", labels=None,
                                              source={"format": "jsonl", "files": ["d.jsonl"]},
                                              columns={"text": "story", "choices": ["endings"], "label": "answer"}),
                      {"d.jsonl": "\n".join(json.dumps(r) for r in rows)})
    # The pretrained encoder with a fast head learns in a few steps to pick the ending that names the animal.
    config = load_experiment(None, data={
        "model": {"encoder": str(minilm_dir)}, "tasks": [{"task": str(spec)}],
        "optim": {"learning_rate": 1e-4, "head_lr_scale": 100},
        "train": {"steps": 12, "batch_size": 8, "buckets": [16, 32], "eval_every": 12, "checkpoint_every": 12,
                  "tensorboard": False}})
    results = Trainer(build_experiment(config), tmp_path / "w").run()
    assert results["toy_choice/accuracy"] > 0.5  # of 16 validation examples; chance is 0.25
    scored = {}
    score = MultipleChoiceHead.score

    def spy(head, predicted, references):
        scored.update(predicted=[head.labels[i] for i in predicted])
        return score(head, predicted, references)

    monkeypatch.setattr(MultipleChoiceHead, "score", spy)
    evaluate(tmp_path / "w", "validation", predictions_file=tmp_path / "p.jsonl")
    validation = load_raw_splits(load_task(spec))[0]["validation"]
    inputs = list(zip(column(validation, "text"), column(validation, "choices"), strict=True))
    predicted = Predictor.from_workdir(tmp_path / "w").predict("toy_choice", inputs)
    assert len({r["label"] for r in predicted}) > 1  # else any reading of the rows would pass
    assert scored["predicted"] == [r["label"] for r in predicted]
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(w["text"], w["choices"], w["label"], w["answer"]) for w in written] == [
        (r["text"], r["choices"], r["label"], r["answer"]) for r in predicted]
    assert all(w["gold"]["answer"] == w["choices"][int(w["gold"]["label"])] for w in written)
    with pytest.raises(MtlError, match=r"^task 'toy_choice' picks one of up to 4 choices: give each input as \(text, "
                                       r"\[1 to 4 choice texts\]\)$"):
        Predictor.from_workdir(tmp_path / "w").predict("toy_choice", [("the cat went out", list("abcde"))])
    # Fewer choices than trained with: the rest are padding, and get no probability.
    three = Predictor.from_workdir(tmp_path / "w").predict("toy_choice", [(
        "the dog went out", ["the cat came back", "the dog came back", "the bird came back"])])[0]
    assert list(three["probs"]) == ["0", "1", "2"] and sum(three["probs"].values()) == pytest.approx(1, abs=2e-4)
    # mtl predict takes {"text", "choices"} lines; a line with the wrong number of choices is named.
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"text": "the dog went out", "choices": [
        "the cat came back", "the dog came back", "the bird came back", "the fish came back"]}) + "\n"))
    capsys.readouterr()
    predict = ["--no-compile-cache", "predict", "--workdir", str(tmp_path / "w"), "--task", "toy_choice"]
    assert main(predict) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"text": "the dog went out", "choices": ANY, "label": ANY, "answer": ANY, "probs": ANY}
    assert printed["answer"] == printed["choices"][int(printed["label"])]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "x", "choices": ["a", "b", "c", "d", "e"]}\n'))
    assert main(predict) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ('mtl: error: stdin:1: "choices" must be a list of 1 to 4 texts '
                                                        '(this task picks one of up to 4), got ["a", "b", "c", "d", '
                                                        '"e"]')
    assert main([*predict, "the dog went out"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == ('mtl: error: task \'toy_choice\' picks one of several '
                                                        'choices: give {"text": ..., "choices": [...]} lines on stdin, '
                                                        'not arguments')


def test_predict_and_export_refuse_a_config_edited_to_another_model(tmp_path, isolated_cache, minilm_dir):
    from mtl.inference import Predictor, export

    _trained(tmp_path, minilm_dir)
    config = tmp_path / "a" / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 16", "hidden_size: 8"))
    said = (f"{tmp_path / 'a'}: checkpoint 8 does not fit config.yaml (edited since?): parameter "
            f"'encoder.embeddings.norm.bias' is (16,) in the checkpoint, (8,) in this model")
    for load in (lambda: Predictor.from_workdir(tmp_path / "a"), lambda: export(tmp_path / "a", tmp_path / "out")):
        with pytest.raises(MtlError) as error:
            load()
        assert str(error.value) == said
    assert not (tmp_path / "out").exists()


def test_a_split_some_tasks_lack_leaves_them_out_and_one_none_has_is_an_error(tmp_path, isolated_cache, minilm_dir, caplog):
    rows = "review,stars\n" + "\n".join(f"{'good ' * (i % 7 + 1)}film {i},{'pos' if i % 2 else 'neg'}" for i in range(32))
    spec = {**CSV_SPEC, "name": "no_test", "source": {"format": "csv", "splits": {"train": ["t.csv"], "validation": ["v.csv"]}}}
    spec.pop("split")
    no_test = write_task(tmp_path / "no_test", spec, {"t.csv": rows, "v.csv": rows})
    config = _toy_config(tmp_path, minilm_dir)
    both = dataclasses.replace(config, tasks=[*config.tasks, dataclasses.replace(config.tasks[0], task=str(no_test))])
    Trainer(build_experiment(both), tmp_path / "both").run()
    with caplog.at_level(logging.WARNING):
        results = evaluate(tmp_path / "both", "test")
    assert [k for k in results if k.endswith("/accuracy")] == ["toy_csv/accuracy"]
    assert f"{tmp_path / 'both'}: ['no_test'] have no 'test' split; evaluations leave them out" in caplog.text
    alone = dataclasses.replace(config, tasks=[dataclasses.replace(config.tasks[0], task=str(no_test))])
    Trainer(build_experiment(alone), tmp_path / "alone").run()
    with pytest.raises(MtlError) as error:
        evaluate(tmp_path / "alone", "test")
    assert str(error.value) == (f"{tmp_path / 'alone'}: no task has a 'test' split to evaluate on (train.eval_split); "
                                "their splits: {'no_test': ['train', 'validation']}")
    train_only = write_task(tmp_path / "train_only", {**spec, "name": "train_only", "source": {
        "format": "csv", "splits": {"train": ["t.csv"]}}}, {"t.csv": rows})
    config = dataclasses.replace(config, tasks=[dataclasses.replace(config.tasks[0], task=str(train_only))])
    with pytest.raises(MtlError) as error:
        Trainer(build_experiment(config), tmp_path / "never")
    assert str(error.value) == (f"{tmp_path / 'never'}: no task has a 'validation' split to evaluate on "
                                "(train.eval_split); their splits: {'train_only': ['train']}")
    assert not (tmp_path / "never").exists()


def test_a_head_option_the_head_refuses_names_the_spec(tmp_path, isolated_cache, minilm_dir):
    config = _toy_config(tmp_path, minilm_dir)
    spec = Path(config.tasks[0].task)
    spec.write_text(spec.read_text() + "head_options: {pooling: max}\n")
    with pytest.raises(MtlError) as error:
        build_experiment(config)
    assert str(error.value) == f"{spec}: key 'head_options': pooling 'max' is unknown; known: ['pooler', 'cls', 'mean']"
    # Set by the experiment's override of the spec, the error names it.
    spec.write_text(spec.read_text().replace("head_options: {pooling: max}\n", ""))
    overridden = dataclasses.replace(config, tasks=[dataclasses.replace(config.tasks[0], overrides=["head_options={pooling: max}"])])
    with pytest.raises(MtlError) as error:
        build_experiment(overridden)
    assert str(error.value) == (f"{spec} with override 'head_options={{pooling: max}}': key 'head_options': pooling 'max' "
                                "is unknown; known: ['pooler', 'cls', 'mean']")
