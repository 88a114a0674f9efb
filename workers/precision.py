"""Which dtype the expert math runs in: `workers.compute_dtype` and, for `auto`, the weights'
storage and the hardware.

`auto` never computes in less precision than the weights are stored in, and uses BF16 only
where BF16 matmul is native (the issue's measure: on two CPU cores with AMX, BF16 matmul reaches
~2 TFLOP/s against ~0.4 TFLOP/s for float32; without AMX or AVX512-BF16 it is slower than
float32):

| stored as | GPU | CPU with AMX-BF16 / AVX512-BF16 | other CPU |
|---|---|---|---|
| float32 | float32 | float32 | float32 |
| float16 | float16 | float32 | float32 |
| bfloat16, fp8, mxfp4 | bfloat16 | bfloat16 | float32 |

The CPU's flags are read from /proc/cpuinfo in one place (`cpu_flags`); the decision is pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native BF16 matmul
_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in `cpuinfo` (empty where there is none,
    e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: Iterable[str]) -> bool:
    """Whether a CPU with these flags multiplies BF16 matrices natively (AMX or AVX512-BF16)."""
    return any(flag in NATIVE_BF16_FLAGS for flag in flags)


def compute_dtype(setting: str, storage: str, device_type: str, flags: Iterable[str] = ()) -> torch.dtype:
    """The expert math's dtype. setting: one of `COMPUTE_DTYPES`; storage: how the experts are
    stored (`ModelSpec.expert_dtype`); device_type: "cpu" or "cuda"; flags: the CPU's (for a
    CPU worker under `auto`)."""
    if setting not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {setting!r}")
    if setting != "auto":
        return _NAMED[setting]
    if storage == "float32":
        return torch.float32
    gpu = device_type == "cuda"
    if storage == "float16":
        return torch.float16 if gpu else torch.float32
    return torch.bfloat16 if gpu or native_bf16(flags) else torch.float32
