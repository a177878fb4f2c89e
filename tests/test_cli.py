"""The `mtl` command as a user runs it: in a subprocess, through the console script."""

import os
import shutil
import subprocess
import sys

import pytest

MTL = shutil.which("mtl") or f"{sys.executable} -m mtl.cli"


def run_mtl(*args, env=None):
    return subprocess.run([*MTL.split(), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_embed_prints_similarities(minilm_dir):
    proc = run_mtl("embed", "A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today.")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "bert, 6 layers, hidden 384" in proc.stdout
    row0 = [float(x) for x in lines[-3].split()[1:]]
    assert row0[0] == pytest.approx(1.0, abs=1e-3)
    assert row0[1] == pytest.approx(0.755, abs=0.005)
    assert abs(row0[2]) < 0.05


def test_bad_model_is_one_clear_line(tmp_path):
    proc = run_mtl("embed", "--model", "no-such-org/no-such-model", env={"MTL_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("mtl: error: cannot resolve model 'no-such-org/no-such-model'. Tried:")
    assert "Traceback" not in proc.stderr


def test_fetch_prints_a_directory(tiny_hf):
    proc = run_mtl("fetch", str(tiny_hf["bert"][1]))
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(tiny_hf["bert"][1])


@pytest.mark.slow
def test_data_prints_counts(minilm_dir):
    import json

    proc = run_mtl("data", "wnut_ner", "--compact")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["task"] == "wnut_ner" and summary["rows_read"] == 2394
    assert sum(summary["tokens"].values()) == 46469


def test_data_unknown_task_is_one_line():
    proc = run_mtl("data", "no_such_task")
    assert proc.returncode == 2
    assert proc.stderr.startswith("mtl: error: task 'no_such_task' is neither a file nor a shipped task")
    assert "Traceback" not in proc.stderr


def test_mtl_notes_print_by_default_and_quiet_hides_them(minilm_dir):
    """Where the model came from (and a resume step, transferred heads) is worth seeing without -v."""
    loud = run_mtl("fetch", "sentence-transformers/all-MiniLM-L6-v2")
    quiet = run_mtl("-q", "fetch", "sentence-transformers/all-MiniLM-L6-v2")
    assert loud.returncode == quiet.returncode == 0
    assert loud.stdout == quiet.stdout == f"{minilm_dir}\n"
    assert "INFO mtl.assets: model 'sentence-transformers/all-MiniLM-L6-v2' resolved from" in loud.stderr
    assert quiet.stderr == ""


def test_overrides_may_follow_the_options():
    from mtl.cli import parse_args

    args = parse_args(["train", "c.yaml", "train.steps=3", "--workdir", "w", "optim.learning_rate=0.1"])
    assert (args.config, args.workdir, args.overrides) == ("c.yaml", "w", ["train.steps=3", "optim.learning_rate=0.1"])
    assert parse_args(["meta-train", "m.yaml", "--workdir", "w", "meta.shots=1"]).overrides == ["meta.shots=1"]


@pytest.mark.parametrize("argv", [["train", "c.yaml", "--workdir", "w", "--bogus"],
                                  ["train", "c.yaml", "--workdir", "w", "no_equals_sign"],
                                  ["evaluate", "--workdir", "w", "train.steps=3"]])
def test_stray_arguments_are_one_usage_error(argv, capsys):
    from mtl.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"mtl: error: unrecognized arguments: {argv[-1]}"


@pytest.mark.parametrize("line, message", [
    ("not json", "stdin:2: invalid JSON (Expecting value at column 1)"),
    ('{"text": "a"', "stdin:2: invalid JSON (Expecting ',' delimiter at column 13)"),  # the end of the line
    ('{"txt": "a"}', 'stdin:2: expected a JSON object with a "text" key'),
    ('["a"]', 'stdin:2: expected a JSON object with a "text" key'),
    ('{"text": 3}', 'stdin:2: "text" must be a string, got 3'),
    ('{"text": ["a", "b"]}', 'stdin:2: "text" must be a string, got ["a", "b"]'),
    # A lone surrogate: JSON may escape one, and Python reads undecodable stdin bytes as one.
    ('{"text": "ok \\ud800"}', 'stdin:2: "text" is not valid UTF-8 (at character 3)'),
    ('{"text": "ok \udcff"}', 'stdin:2: "text" is not valid UTF-8 (at character 3)'),
])
def test_predict_names_the_bad_stdin_line(line, message):
    import io

    from mtl import MtlError
    from mtl.cli import _jsonl_texts

    texts = _jsonl_texts(io.StringIO(f'{{"text": "fine"}}\n{line}\n'))
    assert next(texts) == "fine"
    with pytest.raises(MtlError) as error:
        next(texts)
    assert str(error.value) == message


@pytest.mark.parametrize("line, message", [
    ('{"tokens": "a b"}', 'stdin:2: "tokens" must be a list of words (non-blank strings), got "a b"'),
    ('{"tokens": ["a", " "]}', 'stdin:2: "tokens" must be a list of words (non-blank strings), got ["a", " "]'),
    ('{"tokens": ["a", 3]}', 'stdin:2: "tokens" must be a list of words (non-blank strings), got ["a", 3]'),
    ('{"tokens": ["a", "\\udcff"]}', 'stdin:2: "tokens" word 2 is not valid UTF-8 (at character 0)'),
    ('{"txt": "a"}', 'stdin:2: expected a JSON object with a "text" key or a "tokens" list'),
])
def test_a_token_task_reads_stdin_lines_of_words(line, message):
    import io

    from mtl import MtlError
    from mtl.cli import _jsonl_texts

    texts = _jsonl_texts(io.StringIO(f'{{"tokens": ["Paris", ","]}}\n{line}\n'), tokens=True)
    assert next(texts) == ["Paris", ","]
    with pytest.raises(MtlError) as error:
        next(texts)
    assert str(error.value) == message
    # No words is a sentence of its own, as a blank text is (Predictor.predict gives it no tags).
    assert list(_jsonl_texts(io.StringIO('{"tokens": []}\n{"text": ""}\n'), tokens=True)) == [[], ""]
    # A task that reads whole texts takes no lists of words.
    with pytest.raises(MtlError, match=r'^stdin:1: "tokens" are for token tasks; this task reads whole texts: give "text"$'):
        next(_jsonl_texts(io.StringIO('{"tokens": ["a"]}\n')))


@pytest.mark.parametrize("line, message", [
    ('{"text": "a"}', 'stdin:2: expected a JSON object with "text" and "text_pair" keys: this task reads pairs of texts'),
    ('{"text": "a", "text_pair": null}', 'stdin:2: "text_pair" must be a string, got null'),
    ('{"text": 1, "text_pair": "b"}', 'stdin:2: "text" must be a string, got 1'),
    ('{"text": "a", "text_pair": "\udcff"}', 'stdin:2: "text_pair" is not valid UTF-8 (at character 0)'),
])
def test_a_pair_task_reads_stdin_lines_of_two_texts(line, message):
    import io

    from mtl import MtlError
    from mtl.cli import _jsonl_texts

    texts = _jsonl_texts(io.StringIO(f'{{"text": "a cat sleeps", "text_pair": "a cat"}}\n{line}\n'), pairs=True)
    assert next(texts) == ("a cat sleeps", "a cat")
    with pytest.raises(MtlError) as error:
        next(texts)
    assert str(error.value) == message
    # A task on one text would drop a second one: it is refused, not ignored.
    with pytest.raises(MtlError, match=r'^stdin:1: "text_pair" is for tasks on pairs of texts; this task reads one text$'):
        next(_jsonl_texts(io.StringIO('{"text": "a", "text_pair": "b"}\n')))


def test_texts_that_are_not_unicode_are_one_line():
    # Undecodable bytes in argv reach Python as lone surrogates.
    proc = subprocess.run([*MTL.split(), "embed", "fine", b"caf\xe9".decode("utf-8", "surrogateescape")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.endswith("mtl: error: sentence 2 is not valid UTF-8 (at character 3)\n")


@pytest.mark.parametrize("argv", [["meta-test", "--workdir", "w", "--episodes", "0"],
                                  ["meta-test", "--workdir", "w", "--shots", "-1"],
                                  ["embed", "--max-length", "0"]])
def test_counts_below_one_are_a_usage_error(argv, capsys):
    """--episodes 0 used to fall back to the config's count without a word."""
    from mtl.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {argv[-2]}: must be at least 1, got {argv[-1]}")


def test_help_and_usage_errors_import_neither_jax_nor_transformers():
    """`import mtl` is lazy, so `mtl --help` and a bad command line answer in a moment."""
    probe = ("import sys, mtl, mtl.cli\n"
             "try:\n    mtl.cli.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('jax', 'transformers', 'torch', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_the_public_names_load_on_first_use():
    import mtl
    from mtl.models.encoder import Encoder

    assert mtl.Encoder is Encoder
    assert all(getattr(mtl, name) is not None for name in mtl.__all__)
    assert set(mtl.__all__) == set(mtl._PUBLIC) and set(mtl.__all__) <= set(dir(mtl))
    with pytest.raises(AttributeError, match="no attribute 'Encodr'"):
        mtl.Encodr  # noqa: B018
