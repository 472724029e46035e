"""What this machine's CPU can do, and the compute dtype that follows from it."""

from __future__ import annotations

import functools
import platform

import torch

from .errors import RequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX512-BF16 or AMX on x86, BF16 on Arm), not emulation."""
    flags = cpu_flags()
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str | torch.dtype | None, fmt: str) -> torch.dtype:
    """None / "auto": bfloat16 for float checkpoints where the CPU supports it, float32 otherwise.

    GGUF files run in float32: their packed kernels accumulate in float32 anyway."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if fmt != "gguf" and cpu_supports_bf16() else torch.float32
    if dtype not in DTYPES:
        raise RequestError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
