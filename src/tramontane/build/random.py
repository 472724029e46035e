"""Random weights with real shapes (`--random mistral-7b|mixtral-8x7b|CONFIG.json`), for benchmarks.

Nothing is downloaded: weights/random.py reads the presets and config files; here the model is made,
one tensor at a time, optionally quantized as it goes."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ModelConfig
from ..model import Transformer
from ..model.layers import rope_frequencies
from ..quant.kernels import row_bytes
from ..quant.linear import PackedEmbedding, PackedExperts, PackedLinear, set_module
from ..quant.quantize import SCHEMES, TARGETS, quantize_rows, type_id
from ..quant.step import fuse
from ..weights.random import PRESETS, random_config

__all__ = ["PRESETS", "meta_model", "random_config", "random_model"]


def meta_model(config: ModelConfig) -> Transformer:
    """The model on the meta device: shapes and parameter counts without memory."""
    with torch.device("meta"):
        return Transformer(config)


def random_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0, quant: str | None = None
) -> Transformer:
    """Weights ~ N(0, 0.02) (norms 1), materialised one tensor at a time. With quant ("int8", "int4")
    each matrix is quantized as soon as it exists, so peak memory is the packed model plus one matrix."""
    model = meta_model(config.with_(quant=quant) if quant else config)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=dtype)
            continue
        module = name.removesuffix(".weight")
        if quant and p.dim() == 3:  # Mixtral's stacked experts [E, out, in]: packed expert by expert
            state[name + ".packed"] = _packed_experts(model, name, p.shape, quant, gen)
        elif quant and (TARGETS.fullmatch(module) or module == "tok_embeddings"):
            cols = p.shape[1]
            packed = quantize_rows(p.shape[0], _normal_rows(cols, gen), quant)
            kind = PackedEmbedding if module == "tok_embeddings" else PackedLinear
            with torch.device("meta"):
                set_module(
                    model, module, kind(torch.empty(packed.shape, dtype=torch.uint8), type_id(SCHEMES[quant]), cols)
                )
            state[module + ".packed"] = packed
        else:
            state[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(dtype)
    model.load_state_dict(state, assign=True)
    del state  # the modules own the tensors now: fusing projections below must not double them
    model.inv_freq = rope_frequencies(config.head_dim, config.rope_theta)
    if quant:
        if config.tie_embeddings:
            embedding = model.tok_embeddings
            assert isinstance(embedding, PackedEmbedding)  # quantized with the matrices above
            model.output = embedding.as_linear()
        fuse(model)
    return model.eval().requires_grad_(False)


def _packed_experts(model: Transformer, name: str, shape: torch.Size, quant: str, gen: torch.Generator) -> torch.Tensor:
    """Put a (meta) PackedExperts at `name` and return its blocks [E, out, row_bytes], made one expert
    at a time (the float stack never exists)."""
    experts, rows, cols = shape
    qtype = type_id(SCHEMES[quant])
    packed = torch.empty(experts, rows, row_bytes(qtype, cols), dtype=torch.uint8)
    for e in range(experts):
        packed[e] = quantize_rows(rows, _normal_rows(cols, gen), quant)
    with torch.device("meta"):
        set_module(model, name, PackedExperts(torch.empty(packed.shape, dtype=torch.uint8), qtype, cols))
    return packed


def _normal_rows(cols: int, gen: torch.Generator) -> Callable[[int, int], torch.Tensor]:
    """quantize_rows' `make(start, stop)`: rows start..stop-1 of a [rows, cols] matrix ~ N(0, 0.02)."""

    def make(start: int, stop: int) -> torch.Tensor:
        return torch.randn(stop - start, cols, generator=gen) * 0.02

    return make
