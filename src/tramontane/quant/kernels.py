"""Packed matmul (placeholder until the compiled kernels land): dequantize, then F.linear."""

from __future__ import annotations

import torch

from ..weights.gguf_quants import dequantize


def available() -> bool:
    return False


def dequantize_packed(packed: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    return dequantize(packed.reshape(-1), qtype).view(packed.shape[0], k)


def qmatmul(x: torch.Tensor, packed: torch.Tensor, qtype: int, k: int, n_threads: int | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), dequantize_packed(packed, qtype, k))
