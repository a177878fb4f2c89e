"""scripts/timing.py, the benchmarks' shared helpers: the device peak their MFU divides by."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import timing  # noqa: E402  (scripts/ is not a package)


def test_a_measured_peak_keeps_the_higher_of_two_measurements(monkeypatch):
    # A slow stretch during one measurement must not lower the peak (and inflate the MFU).
    import jax

    kind = jax.devices()[0].device_kind
    monkeypatch.setattr(timing, "SPEC_PEAKS", {})  # measured on any device, a GPU with a data sheet too
    monkeypatch.setattr(timing, "matmul_peak", lambda dtype: 2e11)
    peak, source = timing.device_peak("float32", earlier=5e11)
    assert peak == 5e11
    assert "0.50 before and 0.20 TFLOP/s after" in source
    peak, _ = timing.device_peak("float32", earlier=1e11)
    assert peak == 2e11
    assert timing.device_peak("float32") == (2e11, f"measured float32 matmul on {kind}")


def test_a_data_sheet_peak_is_not_measured(monkeypatch):
    import jax

    kind = jax.devices()[0].device_kind
    monkeypatch.setitem(timing.SPEC_PEAKS, (kind, "bfloat16"), 1e15)
    monkeypatch.setattr(timing, "matmul_peak", lambda dtype: pytest.fail("measured a data-sheet device"))
    assert timing.device_peak("bfloat16", earlier=3e11)[0] == 1e15


def test_matmul_peak_measures_a_positive_rate():
    assert 1e9 < timing.matmul_peak("float32") < 1e16
