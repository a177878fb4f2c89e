"""metrics.jsonl survives a reader beside the writer and a run killed in the middle of a record;
what a run prints as it goes where stderr is a log file."""

import errno
import importlib.util
import io
import json
import logging
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mtl.tracking import MetricsWriter, Progress, RecordNotWritten, read_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_metrics.py"


def _write(workdir, *records):
    writer = MetricsWriter(workdir, tensorboard=False)
    for step, values in records:
        writer.write(step, "train", values)
    writer.close()


def test_records_round_trip_however_long_the_line(tmp_path):
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
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{tmp_path / 'metrics.jsonl'}, line 2: not a JSON record (Expecting value)"


def _tensorboard_records(workdir) -> list:
    """Every Event of the workdir's event files, each record's framing and checksums checked."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data):  # TFRecord's masked CRC-32C
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events = []
    for path in sorted((workdir / "events").iterdir()):
        assert path.name.startswith("events.out.tfevents."), path.name  # the name TensorBoard reads
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(body)
            events.append(Event.FromString(body))
            pos += 16 + length
    return events


def test_tensorboard_events_hold_every_finite_value(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(10, "train", {"a/loss": 0.5, "lr": 1e-3, "a/grad": float("nan")})
    writer.write(20, "eval", {"a/accuracy": 0.75, "aggregate": 0.75})
    writer.close()
    first, *events = _tensorboard_records(tmp_path)
    assert first.file_version == "brain.Event:2"
    assert [(e.step, {v.tag: round(v.simple_value, 6) for v in e.summary.value}) for e in events] == [
        (10, {"train/a/loss": 0.5, "train/lr": 1e-3}),
        (20, {"eval/a/accuracy": 0.75, "eval/aggregate": 0.75}),
    ]


def test_events_a_full_disk_refuses_turn_tensorboard_off_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """tensorboardX's SummaryWriter wrote from a thread of its own: a full disk killed that
    thread, its queue filled up, and the run hung at its next log."""
    from tensorboardX.record_writer import RecordWriter

    write = RecordWriter.write
    written = []

    def fills_up_after_three(self, data):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data)
        return write(self, data)

    monkeypatch.setattr(RecordWriter, "write", fills_up_after_three)
    writer = MetricsWriter(tmp_path)
    logging_thread = threading.Thread(
        target=lambda: [writer.write(step, "train", {"a/loss": 1 / step}) for step in range(1, 51)], daemon=True)
    with caplog.at_level(logging.WARNING, logger="mtl.tracking"):
        logging_thread.start()
        logging_thread.join(timeout=60)
        assert not logging_thread.is_alive(), "writing the records hung"
        writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 51))
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'events'}: cannot write TensorBoard events (No space left on device); "
        "TensorBoard stops here, metrics.jsonl goes on"]
    assert [e.step for e in _tensorboard_records(tmp_path)] == [0, 1, 2]  # what was written is readable


def test_a_record_metrics_jsonl_cannot_take_is_one_error(tmp_path, monkeypatch):
    _write(tmp_path, (1, {"a/loss": 0.5}))
    writer = MetricsWriter(tmp_path, tensorboard=False)

    def full_disk(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._file, "write", full_disk)
    with pytest.raises(RecordNotWritten, match=rf"^{tmp_path / 'metrics.jsonl'}: cannot append the step 2 record "
                                               r"\(No space left on device\)$"):
        writer.write(2, "train", {"a/loss": 0.25})
    writer.close()


def test_plot_curves_keep_the_later_record_of_a_step_a_resumed_run_logged_again(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
    plot_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_metrics)
    # steps 1-3 logged, killed, resumed from the step-2 checkpoint: steps 3-4 logged again
    _write(tmp_path, (1, {"a/loss": 0.9}), (2, {"a/loss": 0.8}), (3, {"a/loss": 0.75}))
    _write(tmp_path, (3, {"a/loss": 0.7}), (4, {"a/loss": 0.6}))
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(4, "eval", {"a/accuracy": 0.5, "a/loss": 0.1, "aggregate": 0.5})
    writer.close()
    losses, scores = plot_metrics.curves(read_metrics(tmp_path))
    assert losses == {"a": {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6}}
    assert scores == {"a": {"accuracy": {4: 0.5}}}


def test_progress_prints_lines_where_stderr_is_not_a_terminal(capsys):
    """A batch job's log gets one line per logged step and per evaluation, not a bar's
    carriage returns; the evaluation line leaves per-class metrics to metrics.jsonl."""
    now = [0.0]
    progress = Progress(100, 0, clock=lambda: now[0])
    for _ in range(25):
        progress.step()
    now[0] = 20.0  # 25 steps in 20 s, the last window at 2 steps/s
    progress.logged(25, {"wnut_ner": 2.5, "bbc_topic": 1.25}, 2.0)
    progress.evaluated(50, "validation", {"bbc_topic/accuracy": 0.75, "bbc_topic/f1/tech": 0.5, "aggregate": 0.6})
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "step 25/100: loss bbc_topic 1.2500, wnut_ner 2.5000; 2.00 steps/s, ETA 01:00",
        "step 50/100: validation: bbc_topic/accuracy 0.7500, aggregate 0.6000",
    ]


def test_progress_shows_each_tasks_primary_metric_beside_the_headline_ones(capsys):
    """A task that selects on a metric outside the headline set (CoLA on mcc) still sees it."""
    progress = Progress(100, 0, primary=["cola/mcc"])
    progress.evaluated(50, "validation", {"cola/accuracy": 0.75, "cola/mcc": 0.5, "cola/weighted_f1": 0.7,
                                          "bbc_topic/mcc": 0.4, "aggregate": 0.5})
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "step 50/100: validation: cola/accuracy 0.7500, cola/mcc 0.5000, aggregate 0.5000"]


def test_progress_eta_runs_at_the_mean_rate_since_the_start_not_the_last_window(capsys):
    """A resumed run counts from its own first step; a fast window after an evaluation does not
    make the ETA collapse to zero."""
    now = [100.0]
    progress = Progress(100, 40, clock=lambda: now[0])
    now[0] = 130.0  # 10 steps in 30 s, compile included
    progress.logged(50, {"a": 1.0}, 0.4)
    now[0] = 131.0
    progress.logged(60, {"a": 1.0}, 10.0)
    progress.close()
    assert [line.split("ETA ")[1] for line in capsys.readouterr().err.splitlines()] == ["02:30", "01:02"]


def test_progress_of_a_secondary_process_prints_nothing(capsys):
    progress = Progress(10, 0, enabled=False)
    progress.step()
    progress.logged(1, {"a": 1.0}, 1.0)
    progress.evaluated(1, "validation", {"aggregate": 0.5})
    progress.close()
    assert capsys.readouterr().err == ""


def test_each_progress_line_is_one_write(monkeypatch):
    """A Ctrl-C lands between two Python calls, never inside one: a line written in two parts
    (text, then newline) could get the interrupt warning glued onto it."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stderr", Recorder())
    progress = Progress(10, 0, clock=lambda: 1.0)
    progress.logged(5, {"a": 1.0}, 2.0)
    progress.evaluated(5, "validation", {"aggregate": 0.5})
    progress.close()
    assert [w for w in writes if w] == ["step 5/10: loss a 1.0000; 2.00 steps/s, ETA 00:00\n",
                                        "step 5/10: validation: aggregate 0.5000\n"]
