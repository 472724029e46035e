"""The compiled decode step: whole transformer blocks of a one-token step in one C call each.

A decoding step (one new token per sequence) through the module path costs about fifteen PyTorch
operations per block, each a few microseconds of dispatch: for a small model that overhead, not the
weights, sets the speed. `CompiledStep` is a decode backend (model/backend.py) for models whose blocks
are all packed (fused wqkv and w13 `PackedLinear`s, dense SwiGLU, float32 norms; or a Mixtral block:
`PackedExperts` stacks and a float32 router, every expert held here) decoding on the float32 offline
`KVCache`: it runs each block as one call of the compiled `decode_block` (RMSNorm, packed projections,
RoPE, cache write, attention over the visible slots, SwiGLU or the routed experts; see quant/csrc/).
Prefill chunks take the module path. Both compute the same float32 arithmetic; they differ by
rounding order only (tests compare them). `build.select_backend` decides where it serves.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.cache import Cache, KVCache
from ..model.layers import FeedForward
from ..model.moe import MoeFeedForward
from ..model.transformer import Transformer, TransformerBlock
from . import kernels
from .linear import PackedExperts, PackedLinear, fuse_projections


def _block_fits(block: TransformerBlock) -> bool:
    att, ff = block.attention, block.feed_forward
    return (
        all(isinstance(m, PackedLinear) for m in (att.wqkv, att.wo))
        and (_dense_fits(ff) or _moe_fits(ff))
        and block.attention_norm.weight.dtype == torch.float32
        and block.ffn_norm.weight.dtype == torch.float32
    )


def _dense_fits(ff: nn.Module) -> bool:
    return type(ff) is FeedForward and all(isinstance(m, PackedLinear) for m in (ff.w13, ff.w2))


def _moe_fits(ff: nn.Module) -> bool:
    """A whole Mixtral feed-forward (every expert here, no adapters, no hooks: not a rank's part of one)
    with packed experts and a float32 router."""
    return (
        type(ff) is MoeFeedForward
        and ff.expert_lora is None
        and ff.expert_range == (0, ff.num_experts)
        and not ff._forward_hooks
        and all(isinstance(getattr(ff, w), PackedExperts) for w in ("w1", "w2", "w3"))
        and type(ff.gate) is nn.Linear
        and ff.gate.weight.dtype == torch.float32
        and ff.top_k <= 64
    )


def _packed(module: nn.Module | None) -> PackedLinear:
    if not isinstance(module, PackedLinear):
        raise TypeError(f"the compiled step runs packed projections, not {type(module).__name__}")
    return module


def fuse(model: Transformer) -> None:
    """Fuse the packed projections of `model` (q/k/v into wqkv, gate/up into w13): a module swap that
    the compiled step needs and that the module path runs faster too."""
    fuse_projections(model)


class CompiledStep:
    """Decode backend running every block of a one-token step through the compiled `decode_block`."""

    name = "compiled"

    def __init__(self, model: Transformer) -> None:
        if not self.fits(model):
            raise ValueError("the compiled step needs a model whose blocks are all packed (dense, or Mixtral's)")
        config = model.config
        self.model = model
        self.shape = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim)
        moe = config.moe
        self.experts = (moe.num_experts, moe.num_experts_per_tok) if moe is not None else (0, 0)
        self.eps = float(config.norm_eps)
        self.window = config.sliding_window or 0
        ext = kernels.extension()
        assert ext is not None  # fits() checked that the kernels are built
        self._run = ext.decode_block
        self._weights = [_block_buffers(block) for block in model.blocks()]  # fixed while this backend serves
        self._modules = _step_modules(model)

    @staticmethod
    def fits(model: Transformer) -> bool:
        """Whether the compiled kernels are built and every block of `model` is packed, dense, float32,
        and whole: a rank's part of a sharded model (`model.parallel`) needs the collectives its
        modules' hooks run, which one C call per block would skip."""
        whole = getattr(model, "parallel", None) is None
        return kernels.available() and whole and all(_block_fits(b) for b in model.blocks())

    def supports(self, cache_kind: type[Cache], dtype: torch.dtype) -> bool:
        """The offline float32 `KVCache` only (the paged pool comes with the serving-speed work)."""
        return issubclass(cache_kind, KVCache) and dtype is torch.float32

    def current(self) -> bool:
        """False once any block's norm or packed projection was swapped (LoRA, re-quantization, ...)."""
        now = _step_modules(self.model)
        return len(now) == len(self._modules) and all(a is b for a, b in zip(self._modules, now))

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, cache)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
        """tokens, positions [B,1] -> final normed hidden states [B,1,dim]."""
        if not isinstance(cache, KVCache) or cache.k[0].dtype is not torch.float32 or tokens.shape[1] != 1:
            raise TypeError("CompiledStep.decode takes one token per row on a float32 KVCache")
        h, rope, _ = self.model.embed(tokens, positions, cache)  # [B,1,dim], complex [B,1,1,D/2]
        return self.model.norm(self.run_blocks(h.float(), positions, rope, cache))

    def run_blocks(self, h: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h [B,1,dim] float32 (updated in place), positions [B,1], rope complex [B,1,1,D/2] -> [B,1,dim]."""
        h = h.contiguous()
        cos_sin = torch.view_as_real(rope).contiguous()  # [B,1,1,D/2] complex -> [B,1,1,D/2,2] float
        qpos = positions[:, 0].contiguous()  # [B] int64
        kpos = cache.pos  # [B,S], this step's positions already recorded by cache.begin
        # (B, dim, H, Hkv, D, F, S); the kernel checks every buffer's nbytes against what these need
        shape, threads = (h.shape[0], *self.shape, cache.size, *self.experts), torch.get_num_threads()
        step = {"x": _buffer(h), "cos_sin": _buffer(cos_sin), "kpos": _buffer(kpos), "qpos": _buffer(qpos)}
        for i, weights in enumerate(self._weights):
            buffers = {**step, **weights, "k_cache": _buffer(cache.k[i]), "v_cache": _buffer(cache.v[i])}
            self._run(shape, buffers, self.eps, self.window, threads)
        return h


def _buffer(t: torch.Tensor, qtype: int | None = None) -> tuple[int, ...]:
    """(data_ptr, nbytes) of a contiguous CPU tensor for `decode_block`; (data_ptr, nbytes, qtype) for a packed
    weight. The kernel checks each nbytes against the extent the shapes need before touching the memory."""
    if not (t.is_contiguous() and t.is_cpu):
        raise ValueError(
            f"decode_block takes contiguous CPU tensors, got {t.dtype} {list(t.shape)} on {t.device}"
            f"{'' if t.is_contiguous() else ', not contiguous'}"
        )
    return (t.data_ptr(), t.nbytes) if qtype is None else (t.data_ptr(), t.nbytes, qtype)


_UNUSED = (0, 0)  # a buffer the block does not read: no bytes (the kernel checks it needs none)


def _block_buffers(block: TransformerBlock) -> dict[str, tuple[int, ...]]:
    """A block's norms and packed weights as `decode_block` buffers (they do not move while it serves)."""
    att, ff = block.attention, block.feed_forward
    out = {
        "attn_norm": _buffer(block.attention_norm.weight),
        "ffn_norm": _buffer(block.ffn_norm.weight),
        **{name: _buffer(m.packed, m.qtype) for name, m in (("wqkv", _packed(att.wqkv)), ("wo", _packed(att.wo)))},
    }
    if isinstance(ff, MoeFeedForward):  # _block_fits said: packed experts, float32 router
        stacks = {name: _experts(getattr(ff, w)) for name, w in (("w1e", "w1"), ("w3e", "w3"), ("w2", "w2"))}
        out |= {name: _buffer(m.packed, m.qtype) for name, m in stacks.items()}
        return out | {"gate": _buffer(ff.gate.weight), "w13": (*_UNUSED, 0)}
    assert isinstance(ff, FeedForward)
    dense = {"w13": _packed(ff.w13), "w2": _packed(ff.w2)}
    out |= {name: _buffer(m.packed, m.qtype) for name, m in dense.items()}
    return out | {"gate": _UNUSED, "w1e": (*_UNUSED, 0), "w3e": (*_UNUSED, 0)}


def _experts(module: object) -> PackedExperts:
    if not isinstance(module, PackedExperts):
        raise TypeError(f"the compiled step runs packed experts, not {type(module).__name__}")
    return module


def _step_modules(model: Transformer) -> list[object]:
    """Every module and tensor the compiled step reads, in order (identity tells a swap)."""
    out: list[object] = []
    for block in model.blocks():
        att, ff = block.attention, block.feed_forward
        names = ("w1", "w2", "w3", "gate") if isinstance(ff, MoeFeedForward) else ("w13", "w2")
        projections = [att.wqkv, att.wo, *(getattr(ff, n, None) for n in names)]
        # the packed tensors too: the step holds their addresses, a replaced one must not be read
        out += [block.attention_norm.weight, block.ffn_norm.weight, ff, *projections]
        out += [getattr(m, "packed", None) for m in projections]
        out += [getattr(getattr(ff, "gate", None), "weight", None)]  # the router's float32 matrix
        # Mixtral: adapters set on the experts, or a rank's range of them, change what the block computes
        out += [getattr(ff, "expert_lora", None), getattr(ff, "expert_range", None)]
    return out
