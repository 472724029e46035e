"""Write a built model as a GGUF file the way llama.cpp's converter lays it out.

Architecture `llama` (llama.cpp runs Mistral, Mixtral and Llama-shaped models under it), llama.cpp's
tensor names (the inverse of names.GGUF_NAMES), q/k rows in the interleaved order our model already
uses, no output.weight when the embeddings are tied, Mixtral experts stacked as *_exps. Packed modules
(GGUF blocks from a file or from `--quant`) are written as their blocks, unchanged; fused q/k/v and
gate/up modules are split back into their rows. Float matrices are written as F32 or F16, norms as F32.
The tokenizer is given as GGUF key/values (`tokenizer.ggml.*`), e.g. the metadata of the source file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..progress import tracked
from ._protocols import fused, is_packed, layers, model_config

# Our module path (per layer "{i}") -> llama.cpp tensor name, for 2-D matrices and norms.
TENSOR_NAMES = {
    "tok_embeddings": "token_embd",
    "norm": "output_norm",
    "output": "output",
    "layers.{i}.attention.wq": "blk.{i}.attn_q",
    "layers.{i}.attention.wk": "blk.{i}.attn_k",
    "layers.{i}.attention.wv": "blk.{i}.attn_v",
    "layers.{i}.attention.wo": "blk.{i}.attn_output",
    "layers.{i}.attention_norm": "blk.{i}.attn_norm",
    "layers.{i}.ffn_norm": "blk.{i}.ffn_norm",
    "layers.{i}.feed_forward.w1": "blk.{i}.ffn_gate",
    "layers.{i}.feed_forward.w2": "blk.{i}.ffn_down",
    "layers.{i}.feed_forward.w3": "blk.{i}.ffn_up",
    "layers.{i}.feed_forward.gate": "blk.{i}.ffn_gate_inp",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
FLOAT_TYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # name -> (numpy dtype, GGUF file_type)
# name -> (GGML type, llama.cpp's file_type "MOSTLY_*", elements per block): the gguf package quantizes the
# simple formats, gguf_quants.QUANTIZERS the K-quants
BLOCK_TYPES = {
    "q8_0": (8, 7, 32),
    "q4_0": (2, 2, 32),
    "q4_1": (3, 3, 32),
    "q5_0": (6, 8, 32),
    "q5_1": (7, 9, 32),
    "q4_k": (12, 15, 256),
    "q6_k": (14, 18, 256),
}
# A matrix whose rows are not whole super-blocks of a K-quant is written in the 32-value type llama.cpp's
# quantizer falls back to (so a model with 576-wide rows, SmolLM2's, still shrinks under q4_k); one whose
# rows are not whole 32-value blocks either, as float16 (llama.cpp's last resort too).
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}


def architecture_metadata(config: ModelConfig) -> dict[str, Any]:
    """The llama.* keys llama.cpp reads for this configuration."""
    p = "llama."
    meta: dict[str, Any] = {
        p + "context_length": config.max_seq_len,
        p + "embedding_length": config.dim,
        p + "block_count": config.n_layers,
        p + "feed_forward_length": config.hidden_dim,
        p + "attention.head_count": config.n_heads,
        p + "attention.head_count_kv": config.n_kv_heads,
        p + "attention.layer_norm_rms_epsilon": float(config.norm_eps),
        p + "rope.freq_base": float(config.rope_theta),
        p + "rope.dimension_count": config.head_dim,
        p + "vocab_size": config.vocab_size,
    }
    if config.head_dim * config.n_heads != config.dim:
        meta[p + "attention.key_length"] = meta[p + "attention.value_length"] = config.head_dim
    if config.sliding_window is not None:
        meta[p + "attention.sliding_window"] = config.sliding_window
    if config.moe is not None:
        meta[p + "expert_count"] = config.moe.num_experts
        meta[p + "expert_used_count"] = config.moe.num_experts_per_tok
    return meta


def _weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module | torch.Tensor]]:
    """(our module path, module or expert tensor) for everything written, fused modules split later."""
    yield "tok_embeddings", model.get_submodule("tok_embeddings")
    for i, block in enumerate(layers(model)):
        yield f"layers.{i}.attention_norm", block.get_submodule("attention_norm")
        att = block.get_submodule("attention")
        for name in ("wq", "wk", "wv", "wo"):
            if name in att._modules:  # wq, wk, wv are gone once fused into wqkv
                yield f"layers.{i}.attention.{name}", att.get_submodule(name)
        yield f"layers.{i}.ffn_norm", block.get_submodule("ffn_norm")
        ff = block.get_submodule("feed_forward")
        for name in ("gate", "w1", "w2", "w3"):
            if name in ff._modules:  # dense projections (w1, w3 gone once fused into w13), the experts' gate
                yield f"layers.{i}.feed_forward.{name}", ff.get_submodule(name)
            elif name in ff._parameters:  # the experts' stacked matrices [E, out, in]
                yield f"layers.{i}.feed_forward.{name}", ff.get_parameter(name)
    yield "norm", model.get_submodule("norm")
    if getattr(model, "output", None) is not None and not model_config(model).tie_embeddings:  # None: tied
        yield "output", model.get_submodule("output")


def _split_fused(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, int]]:
    """Packed rows of fused modules split back into q, k, v and w1, w3: (our path, rows, qtype)."""
    c = model_config(model)
    kv = c.n_kv_heads * c.head_dim
    for i, block in enumerate(layers(model)):
        wqkv, w13 = fused(block.get_submodule("attention"), "wqkv"), fused(block.get_submodule("feed_forward"), "w13")
        if wqkv is not None:
            rows, qtype = wqkv.ggml_blocks()
            q, k, v = rows.split([c.n_heads * c.head_dim, kv, kv])  # [(H+2Hkv)*D, bytes] rows
            for name, part in (("wq", q), ("wk", k), ("wv", v)):
                yield f"layers.{i}.attention.{name}", part, qtype
        if w13 is not None:
            rows, qtype = w13.ggml_blocks()
            w1, w3 = rows.split(c.hidden_dim)  # [2F, bytes] -> 2 x [F, bytes]
            yield f"layers.{i}.feed_forward.w1", w1, qtype
            yield f"layers.{i}.feed_forward.w3", w3, qtype


def _gguf_name(path: str) -> str:
    """Our module path -> llama.cpp tensor name ("layers.3.attention.wq" -> "blk.3.attn_q.weight")."""
    parts = path.split(".")
    if parts[0] == "layers":
        return TENSOR_NAMES["layers.{i}." + ".".join(parts[2:])].format(i=parts[1]) + ".weight"
    return TENSOR_NAMES[path] + ".weight"


def _expert_name(path: str) -> str:
    """ "layers.3.feed_forward.w1" (stacked experts) -> "blk.3.ffn_gate_exps.weight"."""
    layer, name = path.split(".")[1], path.rsplit(".", 1)[1]
    return f"blk.{layer}.{EXPERT_NAMES[name]}.weight"


def tensors(model: torch.nn.Module, float_type: str = "f32") -> Iterator[tuple[str, np.ndarray, int | None]]:
    """(GGUF name, array, GGML type of packed rows, or None for a float array)."""
    np_dtype = FLOAT_TYPES[float_type][0]
    for path, item in _weights(model):
        if is_packed(item):
            rows, qtype = item.ggml_blocks()
            blocks = rows.numpy()  # [out, row_bytes], or packed experts [E, out, row_bytes]
            yield _expert_name(path) if blocks.ndim == 3 else _gguf_name(path), blocks, qtype
            continue
        weight = (item if isinstance(item, torch.Tensor) else item.get_parameter("weight")).detach().float()
        if weight.dim() == 3:  # Mixtral experts [E, rows, cols]
            yield _expert_name(path), weight.numpy().astype(np_dtype), None
        else:  # norms stay float32, as llama.cpp's converter keeps them
            yield _gguf_name(path), weight.numpy().astype(np.float32 if weight.dim() == 1 else np_dtype), None
    for path, rows, qtype in _split_fused(model):
        yield _gguf_name(path), rows.numpy(), qtype


def write_gguf(
    model: torch.nn.Module,
    path: str | Path,
    tokenizer: Mapping[str, Any] | None = None,
    name: str = "tramontane",
    float_type: str = "f32",
    quant: str | None = None,
    progress: bool = False,
) -> Path:
    """Write `model` (built, packed or float) to `path` as GGUF; returns the path. `quant` (q8_0, q4_0,
    q4_1, q5_0, q5_1, q4_k, q6_k) quantizes the float matrices from float32 (norms and Mixtral's router stay
    float32; a matrix whose rows are not whole blocks of `quant` takes its FALLBACK, or float16).
    `progress`: show the tensors quantized and written (progress.py)."""
    import gguf

    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    if quant is not None and quant not in BLOCK_TYPES:
        raise ValueError(f"quant must be one of {', '.join(BLOCK_TYPES)}, got {quant!r}")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(BLOCK_TYPES[quant][1] if quant else FLOAT_TYPES[float_type][1])
    for key, value in {**architecture_metadata(model_config(model)), **dict(tokenizer or {})}.items():
        _add_value(writer, key, value)
    work = tensors(model, "f32" if quant else float_type)  # quantized from float32
    for gguf_name, array, qtype in tracked(work, None, f"writing {path.name}", "tensors", progress):
        target = _block_type(gguf_name, array, quant) if qtype is None and quant is not None else None
        if target is not None:
            qtype = BLOCK_TYPES[target][0]
            array = _quantize(array.astype(np.float32), qtype)
        elif qtype is None and quant is not None and _quantized_kind(gguf_name, array):
            array = array.astype(np.float16)  # rows of no block type's whole blocks
        if qtype is None:
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, array, raw_shape=array.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _quantized_kind(gguf_name: str, array: np.ndarray) -> bool:
    """Matrices, but a Mixtral router (`ffn_gate_inp`: the rows that pick experts), which llama.cpp's
    quantizer never quantizes either."""
    return not gguf_name.endswith("ffn_gate_inp.weight") and array.ndim >= 2


def _block_type(gguf_name: str, array: np.ndarray, quant: str) -> str | None:
    """The block type a float tensor is written in under `quant`: quant where its rows are whole blocks of
    it, else quant's FALLBACK where they are whole blocks of that; None: not a matrix to quantize, or no
    block type fits (then float16)."""
    if not _quantized_kind(gguf_name, array):
        return None
    fits = [t for t in (quant, FALLBACK.get(quant)) if t and array.shape[-1] % BLOCK_TYPES[t][2] == 0]
    return fits[0] if fits else None


def _quantize(array: np.ndarray, qtype: int) -> np.ndarray:
    import gguf

    from .gguf_quants import QUANTIZERS

    if qtype in QUANTIZERS:
        return QUANTIZERS[qtype](array)
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType(qtype))


def _add_value(writer: Any, key: str, value: Any) -> None:
    if key in ("general.architecture",) or key.startswith("GGUF."):
        return  # written by the writer itself
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        writer.add_array(key, list(value))
    else:
        raise ValueError(f"GGUF metadata {key!r}: cannot write a {type(value).__name__}")
