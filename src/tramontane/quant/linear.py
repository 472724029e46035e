"""Module swaps that keep weights packed in GGML block layouts in memory and execute them packed.

`PackedLinear` replaces an `nn.Linear` whose weight is stored as GGML blocks: read so from a GGUF file
(Q4_0, Q4_1, Q8_0, K-quants, F16...) or quantized from a float checkpoint by `--quant int8|int4`
(quantize.py). The rows stay as blocks, and the matmul decodes them on the fly (see kernels.py).
`PackedEmbedding` does the same for the token embedding, decoding only the rows looked up. Both have a
`dequantize()` path, used by tests to compare with the dequantize-at-load model."""

from __future__ import annotations

import re
from typing import TypeGuard

import torch
from torch import nn

from ..model.layers import FeedForward, empty_embedding
from ..model.transformer import Transformer
from ..weights.gguf_quants import GGML_TYPES
from .kernels import dequantize_packed, ggml_blocks, greedy_rows, interleaved, lookup_rows, type_name
from .pages import huge_empty

# GGML type ids the packed kernels execute; other types are dequantized at load.
_PACKED_NAMES = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
PACKED_TYPES = {GGML_TYPES[i].name: i for i in GGML_TYPES if GGML_TYPES[i].name in _PACKED_NAMES}


def packed_matmul(x2: torch.Tensor, rows: torch.Tensor, qtype: int, k: int, run: int = 1) -> torch.Tensor:
    """x2 [M,k] @ W^T for packed rows W [N, row_bytes] -> [M,N] in x2's dtype; `run`: the rows of one
    sequence in x2 (kernels.tiles_from)."""
    from .kernels import matmul_2d, qmatmul

    if x2.dtype is torch.float32 and not (x2.requires_grad and torch.is_grad_enabled()):
        # The decoding hot path: the packed rows were checked when the module was built.
        return matmul_2d(x2.contiguous(), rows, qtype, k, torch.get_num_threads(), run)  # a view when contiguous
    return qmatmul(x2.float().reshape(-1, run, k), rows, qtype, k).to(x2.dtype).reshape(x2.shape[0], -1)


class PackedLinear(nn.Module):
    packed: torch.Tensor  # a buffer: [out_features, row_bytes] uint8

    def __init__(self, packed: torch.Tensor, qtype: int, in_features: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # [out_features, row_bytes] uint8
        self.qtype, self.in_features, self.out_features = qtype, in_features, packed.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, in] (T tokens of each sequence; 2-D: rows of their own) -> [..., T, out]."""
        run = x.shape[-2] if x.dim() >= 3 else 1
        y = packed_matmul(x.reshape(-1, self.in_features), self.packed, self.qtype, self.in_features, run)  # [M,N]
        return y.view(*x.shape[:-1], self.out_features)

    def greedy(self, x: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor | None:
        """Each row's argmax of self(x) plus `bias` (a logit_bias all rows share) for float32 rows x [M, in]
        -> [M] int64, where the kernels find it without every output (a Q8_0 head); None where they do not."""
        if x.dim() != 2 or x.dtype is not torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return None
        return greedy_rows(x.contiguous(), self.packed, self.qtype, self.in_features, torch.get_num_threads(), bias)

    @classmethod
    def concat(cls, parts: list[PackedLinear]) -> PackedLinear:
        """One module computing several projections of the same input (rows stacked): fewer calls. The
        stack lies on huge pages (quant/pages.py)."""
        rows = [p.packed for p in parts]
        out = huge_empty(sum(r.numel() for r in rows)).view(-1, *rows[0].shape[1:])
        return cls(torch.cat(rows, out=out), parts[0].qtype, parts[0].in_features)

    def split(self, sizes: list[int]) -> list[PackedLinear]:
        """The inverse of concat: modules over consecutive row ranges of the same packed rows (views; copies
        in GGML's layout when interleaved rows would split inside a group of 8)."""
        packed, qtype = self.packed, self.qtype
        if interleaved(qtype) and any(n % 8 for n in sizes):
            packed, qtype = ggml_blocks(packed, qtype, self.in_features)
        return [PackedLinear(rows, qtype, self.in_features) for rows in packed.split(sizes)]

    def dequantize(self) -> torch.Tensor:
        return dequantize_packed(self.packed, self.qtype, self.in_features)

    def ggml_blocks(self) -> tuple[torch.Tensor, int]:
        """The rows in GGML's own layout and their GGML type (what a GGUF file stores)."""
        return ggml_blocks(self.packed, self.qtype, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads `.weight`; costs a full decode)."""
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={type_name(self.qtype)}"


class PackedEmbedding(nn.Module):
    packed: torch.Tensor  # a buffer: [vocab, row_bytes] uint8

    def __init__(self, packed: torch.Tensor, qtype: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # [vocab, row_bytes] uint8
        self.qtype, self.dim = qtype, dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = lookup_rows(self.packed, tokens.reshape(-1), self.qtype, self.dim)  # [B*T,dim]
        return rows.view(*tokens.shape, self.dim)

    def as_linear(self) -> PackedLinear:
        """The tied output head over the same packed rows (no copy)."""
        return PackedLinear(self.packed, self.qtype, self.dim)

    def dequantize(self) -> torch.Tensor:
        return dequantize_packed(self.packed, self.qtype, self.dim)

    def ggml_blocks(self) -> tuple[torch.Tensor, int]:
        """The rows in GGML's own layout and their GGML type (what a GGUF file stores)."""
        return ggml_blocks(self.packed, self.qtype, self.dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()


class PackedExperts(nn.Module):
    """Mixtral's stacked expert matrices [E, out, in] kept as GGML blocks: `packed` [E, out, row_bytes]
    (a GGUF `*_exps` tensor as stored, often a view into the mapped file). Set in place of a
    MoeFeedForward's w1, w2 or w3 (model.moe.ExpertMatrices); each expert's rows are a contiguous slice,
    run by the same packed matmul as `PackedLinear`."""

    packed: torch.Tensor  # a buffer: [E, out_features, row_bytes] uint8

    def __init__(self, packed: torch.Tensor, qtype: int, in_features: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # [E, out_features, row_bytes] uint8
        self.qtype, self.in_features = qtype, in_features
        self.num_experts, self.out_features = packed.shape[0], packed.shape[1]

    def expert(self, e: int) -> PackedLinear:
        """Expert e's matrix as a PackedLinear over the same rows (no copy)."""
        return PackedLinear(self.packed[e], self.qtype, self.in_features)

    def matmul(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] @ W[e]^T -> [n, out]."""
        return packed_matmul(x, self.packed[e], self.qtype, self.in_features)  # expert e's rows: contiguous

    def dequantize(self) -> torch.Tensor:
        """float32 [E, out, in]."""
        e, n, _ = self.packed.shape
        flat = self.packed.reshape(e * n, -1)  # [E*out, row_bytes]
        return dequantize_packed(flat, self.qtype, self.in_features).view(e, n, self.in_features)

    def ggml_blocks(self) -> tuple[torch.Tensor, int]:
        """The stack in GGML's own layout [E, out, row_bytes] and its GGML type."""
        return ggml_blocks(self.packed, self.qtype, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, type={type_name(self.qtype)}"
        )


def _fusable(parts: list[object]) -> TypeGuard[list[PackedLinear]]:
    """Packed projections of one type and input width (an empty list is not)."""
    packed = [p for p in parts if isinstance(p, PackedLinear)]
    return len(packed) == len(parts) and len({(p.qtype, p.in_features) for p in packed}) == 1


# The parameters fuse_projections stacks into wqkv and w13: a loader's copies of their packed rows are copied
# again there (or onto huge pages, where they are of different types: _onto_huge_pages).
FUSED_PARTS = re.compile(r"layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight")


def fuse_projections(model: Transformer) -> None:
    """Stack q/k/v and gate/up of packed layers of one type into single modules (wqkv, w13); layers
    already fused stay as they are (a packed GGUF model quantized again with --quant)."""
    for block in model.blocks():
        att, ff = block.attention, block.feed_forward
        qkv: list[object] = [] if att.wqkv is not None else [att.wq, att.wk, att.wv]
        if _fusable(qkv):
            att.wqkv = PackedLinear.concat(qkv)
            del att.wq, att.wk, att.wv
        else:
            _onto_huge_pages(qkv)
        dense = isinstance(ff, FeedForward) and ff.w13 is None
        gate_up: list[object] = [ff.w1, ff.w3] if dense else []  # MoE: experts stay apart
        if _fusable(gate_up):
            ff.w13 = PackedLinear.concat(gate_up)
            del ff.w1, ff.w3
        else:
            _onto_huge_pages(gate_up)


def _onto_huge_pages(parts: list[object]) -> None:
    """The interleaved parts of a group that fuse_projections cannot stack (another type among them:
    Q4_K_M's Q6_K attn_v beside Q4_K q and k) copied onto huge pages (quant/pages.py): the loader left
    them in torch's memory for the stack that did not come."""
    for p in parts:
        if isinstance(p, PackedLinear) and interleaved(p.qtype):
            p.packed = huge_empty(p.packed.numel()).view(p.packed.shape).copy_(p.packed)


def unfuse_projections(model: Transformer) -> None:
    """Undo fuse_projections: wqkv back into wq, wk, wv and w13 into w1, w3, as views of the same packed
    rows (no copy). Code that wraps single projections (LoRA) needs them apart."""
    for block in model.blocks():
        att, ff = block.attention, block.feed_forward
        if isinstance(att.wqkv, PackedLinear):
            q, kv = att.n_heads * att.head_dim, att.n_kv_heads * att.head_dim
            att.wq, att.wk, att.wv = att.wqkv.split([q, kv, kv])  # rows [(H+2Hkv)*D] -> [H*D], [Hkv*D] x 2
            att.wqkv = None
        if isinstance(ff, FeedForward) and isinstance(ff.w13, PackedLinear):
            ff.w1, ff.w3 = ff.w13.split([ff.hidden_dim, ff.hidden_dim])  # rows [2F] -> [F] x 2
            ff.w13 = None


def dequantize_model(model: Transformer) -> None:
    """Replace every packed module by its float32 equivalent (nn.Linear, nn.Embedding); a plain float
    model results (config.quant None, no compiled decode path, tied output read from the embedding)."""
    unfuse_projections(model)
    config = model.config
    if config.tie_embeddings:
        model.output = None  # the float model reads the tied head from tok_embeddings
    for path, module in list(model.named_modules()):
        if isinstance(module, PackedExperts):
            owner, _, name = path.rpartition(".")
            moe = model.get_submodule(owner)
            delattr(moe, name)  # a module, back to a stacked float parameter [E, out, in]
            moe.register_parameter(name, nn.Parameter(module.dequantize(), requires_grad=False))
            continue
        if isinstance(module, PackedLinear):
            plain: nn.Module = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        elif isinstance(module, PackedEmbedding):
            plain = empty_embedding(module.packed.shape[0], module.dim, device="meta")
        else:
            continue
        plain.weight = nn.Parameter(module.dequantize(), requires_grad=False)
        set_module(model, path, plain)
    model.config = config.with_(quant=None)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path`; a parameter of that name (Mixtral's stacked experts) is removed first.
    The forward hooks of the module it replaces carry over (a sharded model's all-reduce after wo)."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if name in owner._parameters:
        delattr(owner, name)
    old = owner._modules.get(name)
    if old is not None and old is not module:
        module._forward_hooks.update(old._forward_hooks)
    setattr(owner, name, module)
