"""Packed blocks in a sharded model: this rank's part of a GGUF tensor's blocks, and the packed
counterparts of the vocabulary-split embedding and head.

Blocks split cleanly wherever the plan cuts between whole blocks: along output rows always (a row is a
run of blocks), along the input only where the cut falls on a block boundary. Worked example, Mixtral
8x7B as Q3_K (256-value blocks of 110 bytes), tp over 2 ranks: w2 [4096, 14336] splits its input at
7168 = 28 blocks, so rank 1 keeps bytes 28*110 .. 56*110 of every row; wo [4096, 4096] at 2048 = 8
blocks. A cut inside a block (a tiny test model's hidden size of 96 over 2 ranks of Q8_0's 32) leaves
that tensor to the float path (dequantized, then sliced).
"""

from __future__ import annotations

import torch

from ..parallel.dist import all_gather_last
from ..parallel.plan import Layout, slice_of
from ..parallel.shard import split_lookup
from ..quant.kernels import row_bytes
from ..quant.linear import PackedEmbedding, PackedLinear
from ..weights.gguf_quants import GGML_TYPES


def rank_blocks(target: str, blocks: tuple[torch.Tensor, int], layout: Layout) -> tuple[torch.Tensor, int] | None:
    """This rank's part of packed rows [..., out, row_bytes] of parameter `target` (whole when the plan
    does not split it; a view when the part is contiguous, else a copy of the part), or None when the
    cut falls inside a block."""
    part = slice_of(target, layout)
    if part is None:
        return blocks
    dim, start, stop = part
    rows, qtype = blocks
    if dim < rows.dim() - 1:  # whole experts, or whole rows
        piece = rows.narrow(dim, start, stop - start)
        return (piece if piece.is_contiguous() else piece.contiguous()), qtype
    block = GGML_TYPES[qtype].block_size
    if start % block or stop % block:
        return None
    first, last = row_bytes(qtype, start) if start else 0, row_bytes(qtype, stop)
    return rows[..., first:last].contiguous(), qtype  # [..., out, part's row_bytes]


class PackedVocabEmbedding(PackedEmbedding):
    """Packed rows [start, start + n) of the embedding (parallel.shard.VocabParallelEmbedding's
    counterpart): other ids give zeros here and their rows come from the ranks that hold them."""

    def __init__(self, packed: torch.Tensor, qtype: int, dim: int, start: int) -> None:
        super().__init__(packed, qtype, dim)
        self.start = start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return split_lookup(tokens, self.start, self.packed.shape[0], super().forward)

    def as_linear(self) -> PackedLinear:
        raise TypeError("a vocabulary-split embedding ties to a PackedGatheredHead, not a PackedLinear")


class PackedGatheredHead(PackedLinear):
    """The output head over this rank's packed vocabulary rows; logits of every rank gathered on the
    last dimension (parallel.shard.GatheredHead's counterpart)."""

    def __init__(self, packed: torch.Tensor, qtype: int, in_features: int, sizes: list[int]) -> None:
        super().__init__(packed, qtype, in_features)
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(super().forward(x), self.sizes)  # [..., V]
