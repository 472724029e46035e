"""Random GGUF files of real shapes, written one tensor at a time (`--random mixtral-8x7b --quant q3_k`).

For speed and memory work on shapes no machine here could quantize from floats (Mixtral 8x7B: 46.7 B
parameters): every matrix is random *valid* blocks of the chosen type (random bits, with small finite
float16 scales where a quantizer writes its scales and minimums), made and written one tensor at a time
through the gguf package's streaming writer, so memory stays at one tensor whatever the file's size.
Norms are ones, Mixtral's router float32 N(0, 1). The layout is llama.cpp's (gguf_writer.py's names and
metadata); the vocabulary is the caller's (a placeholder for random weights)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from .gguf_quants import GGML_TYPES
from .gguf_writer import EXPERT_NAMES, TENSOR_NAMES, _add_value, architecture_metadata

# Byte offsets of the float16 fields (scales, minimums) inside one block of each type; the other bytes
# are quantized values or packed sub-block scales, valid whatever their bits.
F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q2_K": (80, 82),  # scales[16], qs[64], then d and dmin
    "Q3_K": (108,),  # hmask[32], qs[64], scales[12], then d
    "Q4_K": (0, 2),  # d, dmin first
    "Q5_K": (0, 2),
    "Q6_K": (208,),  # ql[128], qh[64], scales[16], then d
}
# llama.cpp's file_type ("MOSTLY_*") of a file whose matrices are all of one type
FILE_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11, "Q4_K": 15}
FILE_TYPES |= {"Q5_K": 17, "Q6_K": 18}
TYPE_IDS = {GGML_TYPES[i].name: i for i in GGML_TYPES}


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """[rows, row_bytes] uint8 of valid `type_name` blocks, float16 fields uniform in (-scale, scale)."""
    info = GGML_TYPES[TYPE_IDS[type_name]]
    if cols % info.block_size:
        raise ConfigError(f"rows of {cols} values are not whole {type_name} blocks of {info.block_size}")
    blocks = rng.integers(0, 256, (rows * cols // info.block_size, info.type_size), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        fields = rng.uniform(-scale, scale, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, at : at + 2] = fields.view(np.uint8)
    return blocks.reshape(rows, -1)


def tensor_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, shape in torch order, kind) of every tensor: kind "matrix" (one [out, in] or an expert
    stack [E, out, in]), "norm" or "router"."""
    c, kv = config, config.n_kv_heads * config.head_dim
    yield "token_embd.weight", (c.vocab_size, c.dim), "matrix"
    for i in range(c.n_layers):

        def name(ours: str, i: int = i) -> str:
            return TENSOR_NAMES["layers.{i}." + ours].format(i=i) + ".weight"

        yield name("attention_norm"), (c.dim,), "norm"
        yield name("attention.wq"), (c.n_heads * c.head_dim, c.dim), "matrix"
        yield name("attention.wk"), (kv, c.dim), "matrix"
        yield name("attention.wv"), (kv, c.dim), "matrix"
        yield name("attention.wo"), (c.dim, c.n_heads * c.head_dim), "matrix"
        yield name("ffn_norm"), (c.dim,), "norm"
        if c.moe is None:
            yield name("feed_forward.w1"), (c.hidden_dim, c.dim), "matrix"
            yield name("feed_forward.w2"), (c.dim, c.hidden_dim), "matrix"
            yield name("feed_forward.w3"), (c.hidden_dim, c.dim), "matrix"
            continue
        e = c.moe.num_experts
        yield name("feed_forward.gate"), (e, c.dim), "router"
        for w, shape in (("w1", (c.hidden_dim, c.dim)), ("w2", (c.dim, c.hidden_dim)), ("w3", (c.hidden_dim, c.dim))):
            yield f"blk.{i}.{EXPERT_NAMES[w]}.weight", (e, *shape), "matrix"
    yield TENSOR_NAMES["norm"] + ".weight", (c.dim,), "norm"
    if not c.tie_embeddings:
        yield TENSOR_NAMES["output"] + ".weight", (c.vocab_size, c.dim), "matrix"


def _array(shape: tuple[int, ...], kind: str, type_name: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "norm":
        return np.ones(shape, np.float32)
    if kind == "router":
        return rng.standard_normal(shape).astype(np.float32)
    rows = int(np.prod(shape[:-1]))
    return random_blocks(type_name, rows, shape[-1], rng).reshape(*shape[:-1], -1)  # [(E,) out, row_bytes]


def write_random_gguf(
    config: ModelConfig, type_name: str, path: str | Path, tokenizer: Mapping[str, Any], seed: int = 0
) -> Path:
    """Write a GGUF file of `config`'s shapes whose matrices are random valid `type_name` blocks."""
    import gguf

    type_name = type_name.upper()
    if type_name not in F16_FIELDS:
        raise ConfigError(f"random GGUF type {type_name!r} is not one of {', '.join(F16_FIELDS).lower()}")
    path = Path(path)
    raw = gguf.GGMLQuantizationType(TYPE_IDS[type_name])
    shapes = list(tensor_shapes(config))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random {type_name}")
    writer.add_file_type(FILE_TYPES[type_name])
    for key, value in {**architecture_metadata(config), **dict(tokenizer)}.items():
        _add_value(writer, key, value)
    info = GGML_TYPES[TYPE_IDS[type_name]]
    for name, shape, kind in shapes:
        if kind == "matrix":
            row_bytes = shape[-1] // info.block_size * info.type_size
            byte_shape = (*shape[:-1], row_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, shape, kind in shapes:
        writer.write_tensor_data(_array(shape, kind, type_name, rng))  # one tensor in memory at a time
    writer.close()
    return path
