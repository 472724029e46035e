"""What the weight writers read of a built model, typed without importing it (weights/ sits below model/
and quant/: tests/test_layering.py).

torch types every attribute of a module as `Tensor | Module`. The writers reach submodules and
parameters through torch's typed `get_submodule` / `get_parameter`, and the rest through the helpers
here: the configuration, the blocks, and packed matrices (quant.linear's PackedLinear and
PackedEmbedding, described by the protocols below). A helper meets something else than it expects
only with a model that is not a tramontane Transformer: TypeError."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeGuard

import torch
from torch import nn

from ..config import ModelConfig


class PackedMatrix(Protocol):
    """A matrix module holding GGUF blocks (quant.linear.PackedLinear, PackedEmbedding)."""

    packed: torch.Tensor  # uint8 rows [out, row_bytes]
    qtype: int  # the blocks' type: GGML's, or a layout of the kernels' own (quant.kernels.regroup)

    def dequantize(self) -> torch.Tensor:
        """The matrix in float32 [out, in]."""
        ...

    def ggml_blocks(self) -> tuple[torch.Tensor, int]:
        """The rows in GGML's own layout and their GGML type (what a GGUF file stores)."""
        ...


class FusedMatrix(PackedMatrix, Protocol):
    """Packed projections stacked by rows into one module (wqkv, w13: quant.linear.fuse_projections)."""

    def split(self, sizes: list[int]) -> Sequence[nn.Module]:
        """Packed modules over consecutive row ranges (views of the same blocks)."""
        ...


def is_packed(item: object) -> TypeGuard[PackedMatrix]:
    """Whether `item` (a module or a tensor) holds packed blocks."""
    return getattr(item, "packed", None) is not None


def is_fused(item: object) -> TypeGuard[FusedMatrix]:
    """Whether `item` holds packed blocks that split back into modules (PackedLinear, not PackedEmbedding)."""
    return is_packed(item) and hasattr(item, "split")


def as_packed(module: nn.Module) -> PackedMatrix:
    """`module`, a matrix module that is not nn.Linear / nn.Embedding, as the packed matrix it must be."""
    if not is_packed(module):
        raise TypeError(f"{type(module).__name__} is neither a float (nn.Linear, nn.Embedding) nor a packed matrix")
    return module


def fused(parent: nn.Module, name: str) -> FusedMatrix | None:
    """parent.<name> (wqkv of an attention, w13 of a feed-forward): None until packed projections are fused."""
    module = getattr(parent, name, None)
    if module is None:
        return None
    if not is_fused(module):
        raise TypeError(f"{type(parent).__name__}.{name} is a {type(module).__name__}, not fused packed rows")
    return module


def model_config(model: nn.Module) -> ModelConfig:
    """The model's `config`."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{type(model).__name__} has no ModelConfig `config`: not a tramontane model")
    return config


def layers(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    blocks = model.get_submodule("layers")
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.layers is a {type(blocks).__name__}, not an nn.ModuleList")
    return blocks
