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


def _cpuinfo(flags: str, **fields) -> str:
    lines = [f"{key.replace('_', ' ')}\t: {value}" for key, value in fields.items()] + [f"flags\t\t: {flags}"]
    block = "processor\t: 0\n" + "\n".join(lines) + "\n"
    return block + "\n" + block.replace("processor\t: 0", "processor\t: 1").replace(flags, "other")


@pytest.mark.parametrize(
    ("flags", "fields", "expected"),
    [
        ("fpu avx avx2 fma", dict(model_name="AMD EPYC", cpu_family=25, model=1),
         "AMD EPYC, family 25 model 1, AVX2 (no AVX-512)"),
        ("avx2 avx512f avx512bw", dict(model_name="AMD EPYC", cpu_family=25, model=17),
         "AMD EPYC, family 25 model 17, AVX-512"),
        ("avx2 avx512f amx_bf16 amx_tile", dict(model_name="Intel(R) Xeon(R) Processor", cpu_family=6, model=143),
         "Intel(R) Xeon(R) Processor, family 6 model 143, AVX-512, AMX"),
        ("fp asimd", dict(CPU_implementer="0x41"), "unknown CPU, neither AVX2 nor AVX-512"),
    ],
)
def test_the_cpu_is_described_by_its_first_processor(flags, fields, expected):
    # What tells the benchmark records' machines apart: the same code runs at other ratios without AVX-512.
    import os

    assert timing.cpu_description(_cpuinfo(flags, **fields)) == f"{expected}, {os.cpu_count()} cores"


def test_a_cpu_without_proc_cpuinfo_is_named_by_platform(monkeypatch):
    import os
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert timing.cpu_description("") == f"arm, {os.cpu_count()} cores"
