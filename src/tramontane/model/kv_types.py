"""How a KV cache stores keys and values: float32, float16, bfloat16, or Q8_0 (`--kv-dtype`).

Each head's key (and value) of a token is a row of D elements, stored as one of four types:

    f32   4 bytes an element, exact
    bf16  2 bytes, rounded to nearest even (torch's .to(torch.bfloat16))
    f16   2 bytes, rounded to nearest even (torch's .to(torch.float16))
    q8_0  34 bytes per 32 elements (GGML's Q8_0, as llama.cpp's `-ctk q8_0` cache): a float16 scale
          d = max|x| / 127 and 32 int8 q = round(x / d), read back as d * q

Worked example (q8_0): a block whose largest magnitude is 2.54 gets d = 0.02 (stored as the half
0.02000427...), and x = -1.0 becomes q = round(-1.0 / 0.02) = -50, read back as -1.0002.

The compiled step (quant/csrc/blocks.c `tram_enc_row`) rounds exactly as `encode` does here, so the
module path and the compiled step read the same keys: they differ by the order of their sums only.
Rounding ties go to even in both (GGML's reference rounds them away from zero; a tie is rare and
either reads back within the same step). NaN keys are not bit for bit alike (torch's own paths
disagree on a NaN's bits); a model producing them has failed already.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

_BLOCK = 32  # elements per Q8_0 block
_Q8_BYTES = 2 + _BLOCK  # float16 scale, then the int8 values


@dataclass(frozen=True)
class KvType:
    """One way of storing a cache row: its name, its GGML type id (what the compiled step is told), the
    torch dtype of the stored tensor and, for the block types, elements and bytes per block."""

    name: str
    ggml: int
    storage: torch.dtype
    block: int = 1
    block_bytes: int = 0

    def width(self, head_dim: int) -> int:
        """Stored elements (of `storage`) of one row of head_dim elements."""
        if self.block == 1:
            return head_dim
        if head_dim % self.block:
            raise ConfigError(
                f"a {self.name} KV cache stores rows in blocks of {self.block} elements; this model's head_dim "
                f"is {head_dim} (choose --kv-dtype f32, bf16 or f16)"
            )
        return head_dim // self.block * self.block_bytes

    def row_bytes(self, head_dim: int) -> int:
        return self.width(head_dim) * self.storage.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] floats -> [..., width] stored."""
        if self.block == 1:
            return x.to(self.storage)
        return _q8_0_encode(x)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """[..., width] stored -> [..., D] (float32 for Q8_0; the float types as stored)."""
        if self.block == 1:
            return stored
        return _q8_0_decode(stored)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """x as a cache of this type gives it back (float32 for Q8_0; else x's rounding to `storage`)."""
        return self.decode(self.encode(x))


F32 = KvType("f32", 0, torch.float32)
KV_TYPES = {
    "f32": F32,
    "bf16": KvType("bf16", 30, torch.bfloat16),
    "f16": KvType("f16", 1, torch.float16),
    "q8_0": KvType("q8_0", 8, torch.uint8, _BLOCK, _Q8_BYTES),
}
_BY_DTYPE = {t.storage: t for t in KV_TYPES.values() if t.block == 1}


def kv_type(value: str | torch.dtype | KvType) -> KvType:
    """A KV type from its name (`--kv-dtype`), a float dtype, or itself."""
    if isinstance(value, KvType):
        return value
    if isinstance(value, torch.dtype):
        if value not in _BY_DTYPE:
            raise ConfigError(f"no KV cache stores {value}; choose one of {', '.join(KV_TYPES)}")
        return _BY_DTYPE[value]
    aliases = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16", "float16": "f16", "fp16": "f16", "q8": "q8_0"}
    name = aliases.get(value.lower(), value.lower())
    if name not in KV_TYPES:
        raise ConfigError(f"unknown KV cache type {value!r}; choose one of {', '.join(KV_TYPES)}")
    return KV_TYPES[name]


def _q8_0_encode(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> uint8 [..., D/32 * 34]: per block of 32, the float16 scale's bytes then the int8 values.
    Every division is elementwise between tensors (IEEE, as the C encoder's)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, _BLOCK)  # [..., D/32, 32]
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # [..., D/32, 1]
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.ones_like(d) / torch.where(d != 0, d, 1.0)
    inv = torch.where((d != 0) & inv.isfinite(), inv, 0.0)  # a block below ~4e-37: 1/d is inf, q = 0
    q = torch.round(blocks * inv).clamp(-127, 127).to(torch.int8)  # half to even, as rintf
    scale = d.to(torch.float16).view(torch.uint8)  # [..., D/32, 2] (little-endian half)
    return torch.cat((scale, q.view(torch.uint8)), dim=-1).flatten(-2)  # [..., D/32 * 34]


def _q8_0_decode(stored: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D/32 * 34] -> float32 [..., D]: d * q per block."""
    blocks = stored.reshape(*stored.shape[:-1], -1, _Q8_BYTES)  # [..., D/32, 34]
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # [..., D/32, 1]
    q = blocks[..., 2:].contiguous().view(torch.int8).float()  # [..., D/32, 32]
    return (d * q).flatten(-2)
