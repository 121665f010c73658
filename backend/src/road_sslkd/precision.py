"""Mixed precision: which lower-precision dtype, if any, a device trains and caches teacher outputs in.

CUDA uses bfloat16 where the GPU has it, else float16 (with a gradient scaler). On the CPU the instruction
flags alone mislead: with AVX512-BF16, a 2-core AMD EPYC trained the project's teachers 1.5-1.7x faster in
bfloat16 through oneDNN, a 2-core Intel Xeon (AVX512-BF16, no AMX exposed) 1.3-1.4x slower
(docs/benchmarks/training_speed.md and training_speed_xeon.md). So a CPU with the instructions trains in
bfloat16 only when a short probe finds it faster there (``cpu_bf16_pays``), or as ``ROAD_SSLKD_CPU_BF16``
(1 or 0) says; CPUs without them would only emulate it and stay in float32. Evaluation and the exported ONNX
models are always float32.
"""

from __future__ import annotations

import contextlib
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bfloat16 instructions (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


BF16_MIN_GAIN = 1.15  # below this the two dtypes are within the probe's noise: stay in float32
CPU_BF16_ENV = "ROAD_SSLKD_CPU_BF16"  # "1" or "0": the decision made elsewhere (bench's children), no probe


@lru_cache(maxsize=1)
def cpu_bf16_pays() -> bool:
    """Whether a bfloat16 training step beats float32 on this CPU by ``BF16_MIN_GAIN``: measured once per
    process (about a second) on two ResNet-style 3x3 convolutions, unless ``ROAD_SSLKD_CPU_BF16`` says. On the
    Intel Xeon the probe's ratio, 0.7-0.9, was the networks' own."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if not cpu_has_native_bf16():
        return False
    with torch.random.fork_rng(devices=[]):  # the probe's random weights must not shift a run's random streams
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                              nn.Conv2d(64, 64, 3, padding=1)).to(memory_format=torch.channels_last)
        image = torch.randn(8, 64, 64, 64).to(memory_format=torch.channels_last)

    def seconds(dtype: Optional[torch.dtype]) -> float:
        start = time.perf_counter()
        with torch.enable_grad():  # callers may first ask under no_grad
            with autocast(torch.device("cpu"), dtype):
                out = block(image)
            out.float().square().mean().backward()
        return time.perf_counter() - start

    # Other processes on the cores only ever add time, so the fastest of interleaved repeats compares the
    # dtypes; a median of one dtype's repeats, then the other's, once let a busy moment pick float32.
    times: dict[Optional[torch.dtype], list[float]] = {None: [], torch.bfloat16: []}
    for repeat in range(8):
        for dtype, values in times.items():
            elapsed = seconds(dtype)
            if repeat >= 2:  # the first two pick kernels
                values.append(elapsed)
    return min(times[None]) >= BF16_MIN_GAIN * min(times[torch.bfloat16])


def amp_dtype(device: torch.device, enabled: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for ``device``, or None to stay in float32."""
    if not enabled:
        return None
    if device.type == "cuda":
        # Emulated bfloat16 (T4, V100) is slow: those cards train in float16 with a gradient scaler.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_bf16_pays():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype``, or a no-op for float32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
