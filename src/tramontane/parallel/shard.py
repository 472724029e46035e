"""Apply a sharding plan to a built model (real or on the meta device, before its weights are read).

Each split parameter is narrowed to this rank's part (plan.py says which part); the modules learn their
local head counts and expert range; the vocabulary-split embedding and output head become
`VocabParallelEmbedding` / a gathering head; and forward hooks add the collectives: one all-reduce after
wo and one after the feed-forward (row-parallel partial sums, or the experts of other ranks), an
all-gather of the logits. The model code itself is unchanged."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .dist import all_gather_last, all_reduce_sum
from .plan import Layout, slice_of


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; other ids give zeros here and their rows come from the
    rank that holds them (all-reduce)."""

    def __init__(self, weight: torch.Tensor, start: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [n, dim]
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return split_lookup(tokens, self.start, self.weight.shape[0], lambda ids: F.embedding(ids, self.weight))


def split_lookup(
    tokens: torch.Tensor, start: int, rows: int, lookup: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Embeddings [B,T,dim] of `tokens` [B,T] from a table split by vocabulary: this rank looks up the
    ids in its rows [start, start + rows) (`lookup` of local ids), zeros for the others, then one
    all-reduce brings every rank's rows together. Shared by the float and the packed (build/) tables."""
    local = tokens - start
    mine = (local >= 0) & (local < rows)  # [B,T]
    h = lookup(torch.where(mine, local, 0))
    return all_reduce_sum(h * mine[..., None].to(h.dtype))  # [B,T,dim]


class GatheredHead(nn.Module):
    """The output head over this rank's vocabulary rows; logits of every rank gathered on the last dim.
    With tied embeddings it reads the embedding's rows (kept out of this module's state dict)."""

    def __init__(
        self, sizes: list[int], weight: torch.Tensor | None = None, tied: VocabParallelEmbedding | None = None
    ) -> None:
        super().__init__()
        self.sizes = sizes
        self._tied = (tied,) if tied is not None else ()  # a tuple: not registered as a submodule
        if weight is not None:
            self.weight = nn.Parameter(weight, requires_grad=False)  # [V/N, dim]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = self._tied[0].weight if self._tied else self.weight
        return all_gather_last(F.linear(h, weight), self.sizes)  # [..., V]


def _reduce_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(output)


def _narrow(model: nn.Module, layout: Layout) -> None:
    for name, param in list(model.named_parameters()):
        part = slice_of(name, layout)
        if part is None:
            continue
        dim, start, stop = part
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        piece = param.detach().narrow(dim, start, stop - start)
        setattr(owner, leaf, nn.Parameter(piece if piece.is_meta else piece.clone(), requires_grad=False))


def _check_shardable(model: nn.Module) -> None:
    if getattr(model, "lora_selection", None) is not None:
        raise ConfigError("LoRA adapters cannot be combined with tensor/expert parallelism yet")
    if getattr(model.config, "quant", None):
        raise ConfigError("packed (quantized) weights are not sharded yet: load the model as float weights")


def shard_model(model: nn.Module, layout: Layout) -> nn.Module:
    """Keep this rank's part of `model` (in place) and wire the collectives; returns the model."""
    _check_shardable(model)
    full = model.config
    _narrow(model, layout)
    local = layout.local_config(full)
    attention_split = layout.mode in ("tp", "tp+ep")
    for block in model.layers:
        att, ff = block.attention, block.feed_forward
        att.n_heads, att.n_kv_heads = local.n_heads, local.n_kv_heads
        if attention_split:
            att.wo.register_forward_hook(_reduce_output)
        if hasattr(ff, "expert_range"):
            ff.expert_range = layout.experts
        else:
            ff.hidden_dim = local.hidden_dim
        if attention_split or full.moe is not None:  # the feed-forward holds a part: sum the parts
            ff.register_forward_hook(_reduce_output)
    if attention_split:
        model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings.weight.data, layout.vocab[0])
        model.output = (
            GatheredHead(layout.vocab_sizes, tied=model.tok_embeddings)
            if full.tie_embeddings
            else GatheredHead(layout.vocab_sizes, weight=model.output.weight.data)
        )
    model.config = local
    model.parallel = layout
    return model
