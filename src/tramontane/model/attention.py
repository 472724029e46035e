"""Grouped-query attention with an optional sliding window, reading and writing the caller's cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .layers import apply_rope, attention_mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.sliding_window
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None) -> torch.Tensor:
        """x [B,T,dim], positions [B,T] -> [B,T,dim]."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)  # [B,T,H,D]
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B,T,Hkv,D]
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B,T,Hkv,D]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B,Hkv,T,D]
            mask = attention_mask(positions, positions, self.window)  # [B,1,T,T]
        else:
            keys, values, key_pos = cache.update(self.layer, k, v)  # [B,Hkv,S,D], [B,S]
            mask = cache.mask(positions, key_pos, self.window)  # [B,1,T,S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),  # [B,H,T,D], [B,Hkv,S,D]
            attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads,
        )  # [B,H,T,D]
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # [B,T,H*D]
