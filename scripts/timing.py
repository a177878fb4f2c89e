"""Helpers shared by the benchmark scripts: timing, encoder shapes, device peaks."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

# Random-init encoder shapes (--random-init): the speed of a step depends on shapes, not weights,
# and a BERT-base-size run needs no download.
SHAPES = {
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),  # all-MiniLM-L6-v2
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}
VOCAB = 30522  # BERT's uncased WordPiece vocabulary

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, by jax device_kind and dtype.
SPEC_PEAKS = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989.4e12,
    ("NVIDIA H100 80GB HBM3", "float32"): 494.7e12,  # TF32 tensor cores, XLA's default fp32 matmul
    ("NVIDIA H200", "bfloat16"): 989.4e12,
    ("NVIDIA H200", "float32"): 494.7e12,
}


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU as the benchmark records name it: "AMD EPYC, family 25 model 1, AVX2 (no AVX-512),
    2 cores". The same code runs at different ratios on different CPUs of one name (AVX-512 or
    not, AMX or not), so every benchmark prints this with its figures. `cpuinfo`: the text of
    /proc/cpuinfo, read when None; elsewhere than Linux, what `platform` knows."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    cores = f"{os.cpu_count()} cores"
    if not fields:
        return f"{platform.processor() or platform.machine()}, {cores}"
    name = fields.get("model name", "unknown CPU")
    flags = set(fields.get("flags", "").split())
    isa = ("AVX-512" if "avx512f" in flags else "AVX2 (no AVX-512)" if "avx2" in flags
           else "neither AVX2 nor AVX-512")
    if "amx_tile" in flags:
        isa += ", AMX"
    family = f", family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    return f"{name}{family}, {isa}, {cores}"


def call_times(fn: Callable[[], object], iters: int, warm_up: bool = True) -> list[float]:
    """Wall time of each of `iters` calls of `fn`, after one warm-up call (compile, caches)."""
    if warm_up:
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of `fn` over `iters` calls, after one warm-up call."""
    return statistics.median(call_times(fn, iters))


@dataclasses.dataclass(frozen=True)
class StepCost:
    """A step's median wall time, and what the kernel cost it on average: on CPU, memory that a
    framework frees and allocates afresh every step is mapped and zeroed again, one page fault per
    4 KiB page, and that system time is part of the step (README, Benchmarks)."""

    seconds: float
    page_faults: float
    system_seconds: float

    def kernel(self) -> str:
        return f"{self.page_faults:,.0f} page faults, {self.system_seconds * 1e3:.0f} ms system CPU a step"


def step_cost(fn: Callable[[], object], iters: int) -> StepCost:
    """`median_time` of `fn`, with the page faults and system CPU time of the timed calls (this
    process's, all threads)."""
    fn()  # the warm-up call (compile, caches), outside the counts
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = call_times(fn, iters, warm_up=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return StepCost(statistics.median(times), (after.ru_minflt - before.ru_minflt) / iters,
                    (after.ru_stime - before.ru_stime) / iters)


def matmul_peak(dtype: str = "float32") -> float:
    """Measured FLOP/s of one large square matmul in `dtype` on JAX's default device: the best of
    20 calls, because a peak is what the device can reach, and on a shared 2-core machine single
    calls of the same matmul vary by 2x (100-208 GFLOP/s measured in one process)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / min(call_times(lambda: f(a).block_until_ready(), 20))


def device_peak(dtype: str, earlier: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the data sheet's figure for a known accelerator, else
    a measured matmul (CPUs have no meaningful data-sheet figure for XLA).

    `earlier`: this run's measurement from before its timed steps. The higher of the two is kept:
    one measurement takes under a second, and a slow stretch of a shared machine that long once
    gave 0.2 instead of 0.5 TFLOP/s on a Zen 5, which inflated that run's MFU to over 100%."""
    import jax

    kind = jax.devices()[0].device_kind
    if (kind, dtype) in SPEC_PEAKS:
        return SPEC_PEAKS[kind, dtype], f"{kind} data sheet, dense {dtype}"
    now = matmul_peak(dtype)
    if earlier is None:
        return now, f"measured {dtype} matmul on {kind}"
    return max(earlier, now), (f"measured {dtype} matmul on {kind}, the higher of {earlier / 1e12:.2f} before "
                               f"and {now / 1e12:.2f} TFLOP/s after the steps")


def device_memory_peak_gb() -> float | None:
    """Peak bytes JAX's allocator held on the default device (None where it does not say: CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def parse_mesh(text: str | None):
    """"data=2,fsdp=4" (the `mesh` config keys) as a MeshSection; None: the default mesh."""
    from mtl.config import MeshSection

    if not text:
        return MeshSection()
    try:
        return MeshSection(**{k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))})
    except (TypeError, ValueError):
        raise SystemExit(
            f"--mesh {text!r}: expected axis=size pairs such as data=2,fsdp=4 (axes: data, fsdp, tensor)") from None
