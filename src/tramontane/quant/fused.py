"""Whole transformer blocks of a decoding step in one compiled call each.

A decoding step (one new token per sequence) through the module path costs about fifteen PyTorch
operations per block, each a few microseconds of dispatch: for a small model that overhead, not the
weights, sets the speed. `install(model)` attaches a `FusedDecode` to a model whose blocks are all
packed (fused wqkv and w13 `GGUFLinear`s, dense SwiGLU, float32 norms). `Transformer.hidden_states`
hands it the one-token steps that run on a float32 `KVCache`; it runs each block as one call of the
compiled `decode_block` (RMSNorm, packed projections, RoPE, cache write, attention over the visible
slots, SwiGLU; see `run_block` in _kernels.c). Everything else (prefill chunks, the paged cache of the
server, training, models it does not fit) takes the module path. Both compute the same float32
arithmetic; they differ by rounding order only (tests compare them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.cache import KVCache
from ..model.layers import FeedForward
from . import kernels
from .linear import GGUFLinear, fuse_projections


def _fits(block: nn.Module) -> bool:
    att, ff = block.attention, block.feed_forward
    return (type(ff) is FeedForward and isinstance(att.wqkv, GGUFLinear) and isinstance(att.wo, GGUFLinear)
            and isinstance(ff.w13, GGUFLinear) and isinstance(ff.w2, GGUFLinear)
            and block.attention_norm.weight.dtype == torch.float32
            and block.ffn_norm.weight.dtype == torch.float32)


class FusedDecode:
    """Runs every block of a one-token step through `_kernels.decode_block`."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.blocks = list(model.layers)
        self.shape = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim)
        self.eps = float(config.norm_eps)
        self.window = config.sliding_window or 0
        self._run = kernels.extension().decode_block

    def accepts(self, h: torch.Tensor, cache: object) -> bool:
        """Whether this step can run fused: one token per row, float32, a float32 KVCache, no grad."""
        return (type(cache) is KVCache and h.shape[1] == 1 and h.dtype is torch.float32
                and cache.k[0].dtype is torch.float32 and not (h.requires_grad and torch.is_grad_enabled()))

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [B,1,dim] float32 (updated in place), positions [B,1], rope complex [B,1,1,D/2] -> [B,1,dim]."""
        h = h.contiguous()
        cos_sin = torch.view_as_real(rope).contiguous()  # [B,1,1,D/2] complex -> [B,1,1,D/2,2] float
        qpos = positions[:, 0].contiguous()  # [B] int64
        kpos = cache.pos  # [B,S], this step's positions already recorded by cache.begin
        dim, n_heads, n_kv, head_dim, hidden = self.shape
        b, s, threads = h.shape[0], cache.size, torch.get_num_threads()
        ptrs = (cos_sin.data_ptr(), kpos.data_ptr(), qpos.data_ptr())
        for i, block in enumerate(self.blocks):
            att, ff = block.attention, block.feed_forward
            self._run(
                h.data_ptr(), b, dim, n_heads, n_kv, head_dim, hidden,
                block.attention_norm.weight.data_ptr(), block.ffn_norm.weight.data_ptr(), self.eps,
                att.wqkv.packed.data_ptr(), att.wqkv.qtype, att.wo.packed.data_ptr(), att.wo.qtype,
                ff.w13.packed.data_ptr(), ff.w13.qtype, ff.w2.packed.data_ptr(), ff.w2.qtype,
                ptrs[0], cache.k[i].data_ptr(), cache.v[i].data_ptr(), s, ptrs[1], ptrs[2],
                self.window, threads,
            )
        return h


def install(model: nn.Module) -> bool:
    """Fuse the packed projections of `model` (q/k/v, gate/up), then attach a FusedDecode when the
    compiled kernels are built and every block fits; returns whether it attached one."""
    fuse_projections(model)
    if not kernels.available() or not hasattr(model, "layers") or not all(_fits(b) for b in model.layers):
        return False
    model.step_kernel = FusedDecode(model)
    return True
