"""GGML tensor types: their block geometry, and vectorised dequantization kernels.

Every kernel takes the raw bytes of a tensor as a uint8 tensor of shape [N, type_size] (N blocks) and
returns float32 [N, block_size]. Block layouts are ggml's `block_*` structs (ggml-common.h, all
little-endian); the arithmetic order matches ggml's `dequantize_row_*` (ggml-quants.c), so results are
bit-identical to the `gguf` package's numpy reference. Later packed kernels can reuse the same
per-format split of fields.

Notation in shape comments: N blocks, S sub-blocks per block, L elements per sub-block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256  # elements per K-quant super-block


@dataclass(frozen=True)
class GGMLType:
    """Geometry of one GGML tensor type: `block_size` elements are stored in `type_size` bytes."""

    name: str
    block_size: int
    type_size: int


def _k(name: str, extra: int) -> GGMLType:
    return GGMLType(name, QK_K, extra)


# Every type id of ggml's `enum ggml_type` that is still in use (ids 4, 5, 31-33, 36-38 were removed
# upstream and are refused as unknown). Sizes are sizeof(block_*) from ggml-common.h.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 2 + 16),
    3: GGMLType("Q4_1", 32, 2 + 2 + 16),
    6: GGMLType("Q5_0", 32, 2 + 4 + 16),
    7: GGMLType("Q5_1", 32, 2 + 2 + 4 + 16),
    8: GGMLType("Q8_0", 32, 2 + 32),
    9: GGMLType("Q8_1", 32, 4 + 4 + 32),
    10: _k("Q2_K", 2 + 2 + QK_K // 16 + QK_K // 4),
    11: _k("Q3_K", 2 + QK_K // 4 + QK_K // 8 + 12),
    12: _k("Q4_K", 2 + 2 + 12 + QK_K // 2),
    13: _k("Q5_K", 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    14: _k("Q6_K", 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    15: _k("Q8_K", 4 + QK_K + QK_K // 8),
    16: _k("IQ2_XXS", 2 + QK_K // 4),
    17: _k("IQ2_XS", 2 + QK_K // 4 + QK_K // 32),
    18: _k("IQ3_XXS", 2 + QK_K // 4 + QK_K // 8),
    19: _k("IQ1_S", 2 + QK_K // 8 + QK_K // 16),
    20: GGMLType("IQ4_NL", 32, 2 + 16),
    21: _k("IQ3_S", 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    22: _k("IQ2_S", 2 + QK_K // 4 + QK_K // 16),
    23: _k("IQ4_XS", 2 + 2 + QK_K // 2 + QK_K // 64),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: _k("IQ1_M", QK_K // 8 + QK_K // 16 + QK_K // 32),
    30: GGMLType("BF16", 1, 2),
    34: _k("TQ1_0", 2 + 4 * 13),
    35: _k("TQ2_0", 2 + 64),
    39: GGMLType("MXFP4", 32, 1 + 16),
    40: GGMLType("NVFP4", 64, 4 + 32),
    41: GGMLType("Q1_0", 128, 2 + 16),
}

Dequantizer = Callable[[torch.Tensor], torch.Tensor]

_U8 = torch.uint8
_SHIFT_NIBBLE = torch.tensor([0, 4], dtype=_U8)
_SHIFT_PAIRS = torch.tensor([0, 2, 4, 6], dtype=_U8)
_SHIFT_BITS = torch.arange(8, dtype=_U8)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 field at byte `start` of every block, as float32 [N, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, B] bytes -> [N, 2B]: the B low nibbles, then the B high nibbles (ggml's 32-element blocks)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[N, B] bytes -> [N, 8B] single bits, little-endian: element 8*b + i is bit i of byte b."""
    return ((qh.unsqueeze(-1) >> _SHIFT_BITS) & 1).flatten(1)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32).clone()


def _f16_elems(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).to(torch.float32)


def _bf16_elems(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.bfloat16).to(torch.float32)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_0: d f16 | qs[16]; y = d * (q - 8)
    q = _nibbles(blocks[:, 2:18]).to(torch.float32).sub_(8)
    return q.mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_1: d f16 | m f16 | qs[16]; y = d * q + m
    q = _nibbles(blocks[:, 4:20]).to(torch.float32)
    return q.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_0: d f16 | qh u32 (5th bit of each element) | qs[16]; y = d * (q - 16)
    q = _nibbles(blocks[:, 6:22]) | (_bits(blocks[:, 2:6]) << 4)
    return q.to(torch.float32).sub_(16).mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_1: d f16 | m f16 | qh u32 | qs[16]; y = d * q + m
    q = _nibbles(blocks[:, 8:24]) | (_bits(blocks[:, 4:8]) << 4)
    return q.to(torch.float32).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q8_0: d f16 | qs int8[32]; y = d * q
    q = blocks[:, 2:34].view(torch.int8).to(torch.float32)
    return q.mul_(_f16(blocks, 0))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q2_K: scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16.
    # Element 128*h + 32*j + l is bits 2j..2j+1 of qs[32*h + l]; its sub-block (of 16) is element // 16.
    n = blocks.shape[0]
    sc = blocks[:, 0:16]
    dl = _f16(blocks, 80) * (sc & 0x0F).to(torch.float32)  # [N, S=16]
    ml = _f16(blocks, 82) * (sc >> 4).to(torch.float32)
    q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> _SHIFT_PAIRS.view(1, 1, 4, 1)) & 3  # [N, 2, 4, 32]
    q = q.reshape(n, 16, 16).to(torch.float32)  # [N, S, L]
    return q.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).reshape(n, QK_K)


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from bytes 0-7 (low nibbles, then high nibbles),
    bits 4-5 of scale i from byte 8 + i % 4 at shift 2 * (i // 4); minus 32."""
    n = packed.shape[0]
    low = _nibbles(packed[:, 0:8])  # [N, 16]
    high = ((packed[:, 8:12].unsqueeze(1) >> _SHIFT_PAIRS.view(1, 4, 1)) & 3).reshape(n, 16)
    return (low | (high << 4)).to(torch.float32).sub_(32)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q3_K: hmask[32] | qs[64] | scales[12] | d f16. Element 128*h + 32*j + l has low bits
    # 2j..2j+1 of qs[32*h + l] and high bit 4h + j of hmask[l]; a clear high bit means "minus 4".
    n = blocks.shape[0]
    dl = _f16(blocks, 108) * _q3_k_scales(blocks[:, 96:108])  # [N, S=16]
    low = (blocks[:, 32:96].reshape(n, 2, 1, 32) >> _SHIFT_PAIRS.view(1, 1, 4, 1)) & 3  # [N, 2, 4, 32]
    high = (blocks[:, 0:32].unsqueeze(1) >> _SHIFT_BITS.view(1, 8, 1)) & 1  # [N, 8 = 4h + j, 32]
    q = (low.reshape(n, 16, 16) | (high.reshape(n, 16, 16) << 2)).to(torch.float32).sub_(4)
    return q.mul_(dl.unsqueeze(-1)).reshape(n, QK_K)


def _k4_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4), as float32 [N, 8]."""
    s0, s1, s2 = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)), dim=1)
    mins = torch.cat((s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)), dim=1)
    return scales.to(torch.float32), mins.to(torch.float32)


def _q4_k_like(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Shared tail of Q4_K/Q5_K: y = (d * scale) * q - (dmin * min) per sub-block of 32."""
    n = blocks.shape[0]
    scales, mins = _k4_scales_mins(blocks[:, 4:16])
    dl = (_f16(blocks, 0) * scales).unsqueeze(-1)  # [N, S=8, 1]
    ml = (_f16(blocks, 2) * mins).unsqueeze(-1)
    return q.reshape(n, 8, 32).to(torch.float32).mul_(dl).sub_(ml).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_K: d f16 | dmin f16 | scales[12] | qs[128]. Element 64*j + 32*h + l is nibble h of
    # qs[32*j + l]; its sub-block (of 32) is 2j + h.
    n = blocks.shape[0]
    q = blocks[:, 16:144].reshape(n, 4, 1, 32) >> _SHIFT_NIBBLE.view(1, 1, 2, 1)  # [N, 4, 2, 32]
    return _q4_k_like(blocks, q & 0x0F)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_K: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]. As Q4_K, plus a fifth bit: bit s
    # of qh[l] for element l of sub-block s.
    n = blocks.shape[0]
    low = (blocks[:, 48:176].reshape(n, 4, 1, 32) >> _SHIFT_NIBBLE.view(1, 1, 2, 1)) & 0x0F
    high = (blocks[:, 16:48].unsqueeze(1) >> _SHIFT_BITS.view(1, 8, 1)) & 1  # [N, S=8, 32]
    return _q4_k_like(blocks, low.reshape(n, 8, 32) | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q6_K: ql[128] | qh[64] | scales int8[16] | d f16. Element 128*h + 32*k + l takes nibble
    # k // 2 of ql[64*h + 32*(k % 2) + l] and bits 2k..2k+1 of qh[32*h + l]; minus 32.
    n = blocks.shape[0]
    low = (blocks[:, 0:128].reshape(n, 2, 1, 64) >> _SHIFT_NIBBLE.view(1, 1, 2, 1)) & 0x0F  # [N,2,2,64]
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT_PAIRS.view(1, 1, 4, 1)) & 3  # [N,2,4,32]
    q = (low.reshape(n, 16, 16) | (high.reshape(n, 16, 16) << 4)).to(torch.float32).sub_(32)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)  # [N, S=16]
    dl = (_f16(blocks, 208) * scales).unsqueeze(-1)
    return q.mul_(dl).reshape(n, QK_K)


# type id -> kernel; the keys are exactly the types `GGUFFile.load` can dequantize.
DEQUANTIZERS: dict[int, Dequantizer] = {
    0: _f32,
    1: _f16_elems,
    30: _bf16_elems,
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    8: _q8_0,
    10: _q2_k,
    11: _q3_k,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
}

_CHUNK_BYTES = 1 << 20  # dequantize ~1 MiB of blocks at a time: keeps temporaries in cache


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Dequantize the raw bytes (uint8, 1-D, a whole number of blocks) of a tensor of `ggml_type`
    into a flat float32 tensor. Raises KeyError for a type without a kernel, ValueError for a bad size."""
    kernel = DEQUANTIZERS[ggml_type]
    info = GGML_TYPES[ggml_type]
    if raw.dtype != _U8 or raw.dim() != 1 or raw.numel() % info.type_size:
        raise ValueError(f"expected 1-D uint8 bytes, a multiple of {info.type_size}, for {info.name}")
    blocks = raw.view(-1, info.type_size)  # [N, type_size]
    n_blocks = blocks.shape[0]
    step = max(1, _CHUNK_BYTES // info.type_size)
    if n_blocks <= step:
        return kernel(blocks).reshape(-1)
    out = torch.empty(n_blocks, info.block_size, dtype=torch.float32)
    for start in range(0, n_blocks, step):
        out[start : start + step] = kernel(blocks[start : start + step])
    return out.reshape(-1)


# ---- quantizing to K-quant blocks (the gguf package quantizes only the simple formats) ----------
# Plain round-to-nearest with min/max scales per sub-block, in exactly the layouts the dequantizers
# above read (llama.cpp's quantizers also search scales iteratively; these are simpler, a little less
# accurate, and read the same everywhere).


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """[N] float -> [N, 2] bytes of float16."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] (K a multiple of 256) -> Q4_K blocks [..., K // 256 * 144] uint8."""
    rows = x.reshape(-1, QK_K // 32, 32).astype(np.float32)  # [N, S=8, 32]
    low = np.minimum(rows.min(axis=-1), 0.0)  # [N, 8]
    sub_scale = (rows.max(axis=-1) - low) / 15.0
    d = sub_scale.max(axis=-1) / 63.0  # [N]
    dmin = (-low).max(axis=-1) / 63.0
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(sub_scale / np.where(d16 > 0, d16, 1)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-low / np.where(dmin16 > 0, dmin16, 1)[:, None]), 0, 63).astype(np.uint8)
    step = (d16[:, None] * sc)[..., None]  # [N, 8, 1]
    offset = (dmin16[:, None] * mn)[..., None]
    q = np.clip(np.rint((rows + offset) / np.where(step > 0, step, 1)), 0, 15).astype(np.uint8)  # [N, 8, 32]
    packed = np.empty((rows.shape[0], 12), np.uint8)  # get_scale_min_k4, inverted
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # sub-blocks 2j (low nibbles) and 2j+1 (high) share qs[32j:32j+32]
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), packed, qs], axis=1)  # [N, 144]
    return blocks.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] (K a multiple of 256) -> Q6_K blocks [..., K // 256 * 210] uint8."""
    rows = x.reshape(-1, QK_K // 16, 16).astype(np.float32)  # [N, S=16, 16]
    sub_scale = np.abs(rows).max(axis=-1) / 31.0  # q in -31..31 (-32 is never needed)
    d16 = (sub_scale.max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)  # [N]
    sc = np.clip(np.rint(sub_scale / np.where(d16 > 0, d16, 1)[:, None]), 0, 127).astype(np.int8)
    step = (d16[:, None] * sc)[..., None]
    q = (np.clip(np.rint(rows / np.where(step > 0, step, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = q & 0x0F, q >> 4  # [N, h=2, k=4, l=32]
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(-1, 128)  # ql[64h + 32m + l]: k = m and m + 2
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d16)], axis=1)  # [N, 210]
    return blocks.reshape(*x.shape[:-1], -1)


QUANTIZERS = {12: quantize_q4_k, 14: quantize_q6_k}  # GGML type -> quantizer (K-quants, 256 per block)
