"""Mixed precision: which lower-precision dtype, if any, a device trains and caches teacher outputs in.

CUDA uses bfloat16 where the GPU has it, else float16 (with a gradient scaler). CPUs with native bfloat16
instructions (AVX512-BF16 or AMX) train the project's teachers 1.5-1.7x faster in bfloat16 through
oneDNN (docs/benchmarks/training_speed.md); other CPUs would only emulate it, slower than float32, so they
stay in float32. Evaluation and the exported ONNX models are always float32.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch


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


def amp_dtype(device: torch.device, enabled: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for ``device``, or None to stay in float32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``dtype``, or a no-op for float32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
