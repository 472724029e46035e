"""The transformer: Mistral, Mixtral (= Mistral + config.moe) and Llama-shaped models."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import Attention
from .cache import Cache
from .layers import FeedForward, RMSNorm, attention_mask, empty_embedding, rope_cos_sin, rope_frequencies
from .moe import MoeFeedForward


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward: nn.Module
        if config.moe is None:
            self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        else:
            self.feed_forward = MoeFeedForward(config.dim, config.hidden_dim, config.moe)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: torch.Tensor,
        cache: Cache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), positions, rope, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B,T] and absolute positions [B,T] (-1 = padding) in, logits [B,T,V] out."""

    inv_freq: torch.Tensor  # a buffer (register_buffer below): RoPE inverse frequencies [D/2]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # nn.Embedding, or a packed / vocabulary-parallel one after a module swap (quant/, parallel/)
        self.tok_embeddings: nn.Module = empty_embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # The head: nn.Linear, a packed or tensor-parallel module once loaded; None when tied to tok_embeddings.
        self.output: nn.Module | None = (
            None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        )
        # Computed on the CPU even where the model is built on the meta device: arithmetic on meta
        # tensors goes through torch._refs, which imports torch._dynamo (see layers.empty_embedding).
        inv_freq = rope_frequencies(config.head_dim, config.rope_theta, device=torch.device("cpu"))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Recompute each block's activations in the backward pass instead of keeping them (training).
        self.gradient_checkpointing = False

    def blocks(self) -> list[TransformerBlock]:
        """The blocks, typed (an nn.ModuleList yields plain Modules to a type checker)."""
        return cast(list[TransformerBlock], list(self.layers))

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: Cache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B,T,dim] through the modules. segments [B,T] (no cache): packed
        sequences of a row attend only within their segment."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        h, rope, mask = self.embed(tokens, positions, cache, segments)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if checkpointing:
                h = checkpoint(block, h, positions, rope, cache, mask, use_reentrant=False)
            else:
                h = block(h, positions, rope, cache, mask)
        return self.norm(h)

    def embed(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache | None, segments: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What every backend does before the blocks: embeddings [B,T,dim], RoPE rotations (complex
        [B,T,1,D/2]) and, without a cache, the mask [B,1,T,T]; with one, the cache is told the positions."""
        mask = None
        if cache is not None:
            cache.begin(positions)
        else:
            mask = attention_mask(positions, positions, self.config.sliding_window, segments)  # [B,1,T,T]
        rope = rope_cos_sin(positions, self.inv_freq)  # complex [B,T,1,D/2]
        return self.tok_embeddings(tokens.clamp(min=0)), rope, mask

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [...,dim] -> logits [...,V] in float32."""
        if self.output is None:  # tied: the embedding's weight (packed and sharded models set an output)
            weight = self.tok_embeddings.weight
            assert isinstance(weight, torch.Tensor)
            return torch.nn.functional.linear(h, weight).float()
        y = self.output(h)
        return y if y.dtype is torch.float32 else y.float()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: Cache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens, positions, cache, segments))
