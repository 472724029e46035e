"""Name-mapping tables from each weight format to ours, and the named transforms applied at load.

Our names follow Mistral's native layout (mistral-inference), with Mixtral's experts stacked:
`layers.{i}.feed_forward.w1` is [E,F,dim]. A table row is (pattern, target, transform): `{0}` in the
target is the layer number; the transform `expert` takes the expert index from the second group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Transforms: "q" / "k" undo the Hugging Face rotary row permutation of wq / wk (HF rotates halves,
# Mistral's native layout and GGUF rotate interleaved pairs); "expert" stacks expert tensors.
HF_NAMES: list[tuple[str, str, str | None]] = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "output.weight", None),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{0}.attention.wq.weight", "q"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{0}.attention.wk.weight", "k"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{0}.attention.wv.weight", None),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attention.wo.weight", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attention_norm.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.ffn_norm.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.feed_forward.w1.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.feed_forward.w2.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.feed_forward.w3.weight", None),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{0}.feed_forward.gate.weight", None),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", "layers.{0}.feed_forward.w1", "expert"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", "layers.{0}.feed_forward.w2", "expert"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", "layers.{0}.feed_forward.w3", "expert"),
]
HF_IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

NATIVE_NAMES: list[tuple[str, str, str | None]] = [
    (r"(tok_embeddings\.weight|norm\.weight|output\.weight)", "{0}", None),
    (
        r"layers\.(\d+)\.((attention\.w[qkvo]|attention_norm|ffn_norm|feed_forward\.w[123])\.weight)",
        "layers.{0}.{1}",
        None,
    ),
    (r"layers\.(\d+)\.(?:feed_forward|block_sparse_moe)\.gate\.weight", "layers.{0}.feed_forward.gate.weight", None),
    (
        r"layers\.(\d+)\.(?:feed_forward|block_sparse_moe)\.experts\.(\d+)\.w1\.weight",
        "layers.{0}.feed_forward.w1",
        "expert",
    ),
    (
        r"layers\.(\d+)\.(?:feed_forward|block_sparse_moe)\.experts\.(\d+)\.w2\.weight",
        "layers.{0}.feed_forward.w2",
        "expert",
    ),
    (
        r"layers\.(\d+)\.(?:feed_forward|block_sparse_moe)\.experts\.(\d+)\.w3\.weight",
        "layers.{0}.feed_forward.w3",
        "expert",
    ),
]
NATIVE_IGNORED: list[str] = []

# llama.cpp's tensor names; its converter already writes wq/wk rows in the interleaved order.
GGUF_NAMES: list[tuple[str, str, str | None]] = [
    (r"token_embd\.weight", "tok_embeddings.weight", None),
    (r"output_norm\.weight", "norm.weight", None),
    (r"output\.weight", "output.weight", None),
    (r"blk\.(\d+)\.attn_q\.weight", "layers.{0}.attention.wq.weight", None),
    (r"blk\.(\d+)\.attn_k\.weight", "layers.{0}.attention.wk.weight", None),
    (r"blk\.(\d+)\.attn_v\.weight", "layers.{0}.attention.wv.weight", None),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.{0}.attention.wo.weight", None),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.{0}.attention_norm.weight", None),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{0}.ffn_norm.weight", None),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{0}.feed_forward.w1.weight", None),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.{0}.feed_forward.w2.weight", None),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.{0}.feed_forward.w3.weight", None),
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", "layers.{0}.feed_forward.gate.weight", None),
    (r"blk\.(\d+)\.ffn_gate_exps\.weight", "layers.{0}.feed_forward.w1", None),
    (r"blk\.(\d+)\.ffn_down_exps\.weight", "layers.{0}.feed_forward.w2", None),
    (r"blk\.(\d+)\.ffn_up_exps\.weight", "layers.{0}.feed_forward.w3", None),
    (r"blk\.(\d+)\.ffn_gate\.(\d+)\.weight", "layers.{0}.feed_forward.w1", "expert"),
    (r"blk\.(\d+)\.ffn_down\.(\d+)\.weight", "layers.{0}.feed_forward.w2", "expert"),
    (r"blk\.(\d+)\.ffn_up\.(\d+)\.weight", "layers.{0}.feed_forward.w3", "expert"),
]
GGUF_IGNORED = [r"rope_freqs\.weight"]


@dataclass(frozen=True)
class Mapping:
    target: str
    transform: str | None
    expert: int | None


class NameMap:
    def __init__(self, table: list[tuple[str, str, str | None]], ignored: list[str]) -> None:
        self._rows = [(re.compile(p), t, x) for p, t, x in table]
        self._ignored = [re.compile(p) for p in ignored]

    def map(self, name: str) -> Mapping | None:
        """Our name for a file's tensor; None for tensors to skip. KeyError for unknown names."""
        for pattern, target, transform in self._rows:
            m = pattern.fullmatch(name)
            if m:
                groups = m.groups()
                expert = int(groups[1]) if transform == "expert" else None
                return Mapping(target.format(*groups), transform, expert)
        if any(p.fullmatch(name) for p in self._ignored):
            return None
        raise KeyError(name)


HF = NameMap(HF_NAMES, HF_IGNORED)
NATIVE = NameMap(NATIVE_NAMES, NATIVE_IGNORED)
GGUF = NameMap(GGUF_NAMES, GGUF_IGNORED)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half row order back to interleaved pairs, per head: w [H*D, dim] -> [H*D, dim].

    Within a head HF stores rows (x0, x2, x4, ..., x1, x3, ...); we want (x0, x1, x2, x3, ...)."""
    rows, cols = w.shape
    halves = w.reshape(n_heads, 2, rows // n_heads // 2, cols)  # [H,2,D/2,dim]
    return halves.transpose(1, 2).reshape(rows, cols)  # [H,D/2,2,dim] -> [H*D,dim]


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved pairs to HF's rotate-half row order (inverse of unpermute_rotary)."""
    rows, cols = w.shape
    pairs = w.reshape(n_heads, rows // n_heads // 2, 2, cols)  # [H,D/2,2,dim]
    return pairs.transpose(1, 2).reshape(rows, cols)  # [H,2,D/2,dim] -> [H*D,dim]
