"""metrics.jsonl survives a reader beside the writer and a run killed in the middle of a record."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtl.tracking import MetricsWriter, read_metrics


def _write(workdir, *records):
    writer = MetricsWriter(workdir, tensorboard=False)
    for step, values in records:
        writer.write(step, "train", values)
    writer.close()


def test_records_round_trip_including_a_line_longer_than_any_buffer(tmp_path):
    wide = {f"task/metric_{i}": i / 7 for i in range(2000)}  # ~60 kB on one line
    _write(tmp_path, (1, {"a/loss": 0.5}), (2, wide))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1] == {"step": 2, "kind": "train", **wide}


def test_reader_skips_the_line_still_being_written(tmp_path):
    _write(tmp_path, (1, {"a/loss": 0.5}))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "kind": "eval", "a/accura')  # what a reader sees mid-write
    assert read_metrics(tmp_path) == [{"step": 1, "kind": "train", "a/loss": 0.5}]


def test_next_writer_cuts_off_the_record_a_killed_run_left_unfinished(tmp_path):
    _write(tmp_path, (1, {"a/loss": 0.5}))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "kind": "train", "a/lo')
    _write(tmp_path, (2, {"a/loss": 0.25}))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert read_metrics(tmp_path)[-1]["a/loss"] == 0.25


def test_a_corrupt_finished_line_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"step": 2, oops\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_metrics(tmp_path)


def test_plot_script_reports_a_corrupt_line_in_one_message(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\nnot json\n')
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_metrics.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{tmp_path / 'metrics.jsonl'}, line 2: not a JSON record (Expecting value)"
