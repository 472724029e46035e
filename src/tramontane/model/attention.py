"""Grouped-query attention with an optional sliding window, reading and writing the caller's cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import Cache
from .layers import apply_rope, attention_mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.sliding_window
        self.wq: nn.Module = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk: nn.Module = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv: nn.Module = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo: nn.Module = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Each projection is an nn.Linear until a module swap makes it packed, LoRA-wrapped or sharded.
        self.wqkv: nn.Module | None = None  # set by quant.linear.fuse_projections (replaces wq, wk, wv)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is None:
            return self.wq(x), self.wk(x), self.wv(x)
        kv = self.n_kv_heads * self.head_dim
        return self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)  # [B,T,(H+2Hkv)*D]

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: torch.Tensor,
        cache: Cache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B,T,dim], positions [B,T] -> [B,T,dim]. Without a cache, `mask` [B,1,T,T] (default: causal
        over positions, with the window) says which tokens see which."""
        b, t, _ = x.shape
        q, k, v = self._project(x)
        q = q.view(b, t, self.n_heads, self.head_dim)  # [B,T,H*D] -> [B,T,H,D]
        k = k.view(b, t, self.n_kv_heads, self.head_dim)  # [B,T,Hkv*D] -> [B,T,Hkv,D]
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B,Hkv,T,D]
            if mask is None:
                mask = attention_mask(positions, positions, self.window)  # [B,1,T,T]
        else:
            keys, values, key_pos = cache.update(self.layer, k, v)  # [B,Hkv,S,D], [B,S]
            mask = cache.mask(positions, key_pos, self.window)  # [B,1,T,S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.to(q.dtype),
            values.to(q.dtype),  # [B,H,T,D], [B,Hkv,S,D]
            attn_mask=mask,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )  # [B,H,T,D]
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # [B,T,H*D]
