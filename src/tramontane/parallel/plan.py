"""Sharding plans: parameter name pattern -> how it splits over ranks, applied once to a built model.

Tensor parallelism ("tp", Megatron-style): wq/wk/wv split by heads (column-parallel), wo by the same
heads along its input (row-parallel, one all-reduce after it); w1/w3 split along the hidden dimension
(column-parallel), w2 along its input (row-parallel, one all-reduce after the feed-forward); the
embedding and the output head split by vocabulary rows. Mixtral's experts split the same way inside
every expert. When there are fewer kv heads than ranks, each rank keeps the one kv head its query heads
use (kv heads are replicated).

Expert parallelism ("ep"): each rank holds E/N whole experts; every rank routes every token, computes
the tokens that chose its experts, and one all-reduce sums the experts' outputs. Attention is
replicated. "tp+ep": attention (and the vocabulary) split as in tp, experts as in ep.

Worked example, H = 32 query heads, Hkv = 8, N = 2: rank 1 holds query heads 16..31 (rows 16*D..32*D
of wq), kv heads 4..7, the wo columns of heads 16..31, hidden rows F/2..F of w1/w3 and columns F/2..F
of w2. With Hkv = 1 (N = 2), both ranks hold kv head 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import ConfigError

# pattern (fullmatch on our parameter names) -> split kind; the first matching row wins
TP_ATTENTION = [
    (r"tok_embeddings\.weight", "vocab"),
    (r"output\.weight", "vocab"),
    (r"layers\.\d+\.attention\.wq\.weight", "q_heads"),
    (r"layers\.\d+\.attention\.w[kv]\.weight", "kv_heads"),
    (r"layers\.\d+\.attention\.wo\.weight", "o_heads"),
]
TP_FFN = [
    (r"layers\.\d+\.feed_forward\.w[13]\.weight", "rows"),  # dense [F,dim]
    (r"layers\.\d+\.feed_forward\.w2\.weight", "cols"),  # dense [dim,F]
    (r"layers\.\d+\.feed_forward\.w[13]", "expert_rows"),  # experts [E,F,dim]
    (r"layers\.\d+\.feed_forward\.w2", "expert_cols"),  # experts [E,dim,F]
]
EP_EXPERTS = [(r"layers\.\d+\.feed_forward\.w[123]", "experts")]  # [E,...]: whole experts per rank
PLANS: dict[str, list[tuple[str, str]]] = {
    "tp": TP_ATTENTION + TP_FFN,
    "ep": EP_EXPERTS,
    "tp+ep": TP_ATTENTION + EP_EXPERTS + TP_FFN,  # dense layers of a model with both still split by tp
}
# Each kind: (dimension split, attribute of Layout giving this rank's [start, stop) along it)
KINDS = {
    "vocab": (0, "vocab"),
    "q_heads": (0, "q_rows"),
    "kv_heads": (0, "kv_rows"),
    "o_heads": (1, "q_rows"),
    "rows": (0, "hidden"),
    "cols": (1, "hidden"),
    "expert_rows": (1, "hidden"),
    "expert_cols": (2, "hidden"),
    "experts": (0, "experts"),
}


@dataclass(frozen=True)
class Layout:
    """This rank's ranges: [start, stop) of vocabulary rows, q-head rows, kv-head rows, hidden units
    and experts, and the vocabulary sizes of every rank (for gathering the logits)."""

    mode: str
    rank: int
    world: int
    vocab: tuple[int, int]
    vocab_sizes: list[int]
    q_rows: tuple[int, int]
    kv_rows: tuple[int, int]
    hidden: tuple[int, int]
    experts: tuple[int, int]

    @property
    def heads(self) -> tuple[int, int]:
        """(local query heads, local kv heads) per head_dim rows."""
        return self.q_rows, self.kv_rows

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The head counts and hidden size this rank's modules (and KV cache) hold; vocabulary full."""
        d = config.head_dim
        return config.with_(
            n_heads=(self.q_rows[1] - self.q_rows[0]) // d,
            n_kv_heads=(self.kv_rows[1] - self.kv_rows[0]) // d,
            hidden_dim=self.hidden[1] - self.hidden[0],
        )


def _even(total: int, world: int, rank: int, what: str) -> tuple[int, int]:
    if total % world:
        raise ConfigError(f"{what} = {total} does not split evenly over {world} ranks")
    size = total // world
    return rank * size, (rank + 1) * size


def _vocab_sizes(vocab: int, world: int) -> list[int]:
    base, extra = divmod(vocab, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def layout_for(config: ModelConfig, mode: str, rank: int, world: int) -> Layout:
    """Ranges for `rank` of `world` under plan `mode` ("tp", "ep", "tp+ep"); ConfigError when the
    model does not split (heads, hidden size or experts not divisible)."""
    if mode not in PLANS:
        raise ConfigError(f"parallel mode {mode!r} is not one of {', '.join(PLANS)}")
    if mode != "tp" and config.moe is None:
        raise ConfigError(f"parallel mode {mode!r} splits experts; {config.architecture} has none (use tp)")
    d, h, hkv = config.head_dim, config.n_heads, config.n_kv_heads
    tp_attention = mode in ("tp", "tp+ep")
    tp_ffn = mode == "tp" or config.moe is None
    if tp_attention:
        q0, q1 = _even(h, world, rank, "n_heads")
        if hkv >= world:
            k0, k1 = _even(hkv, world, rank, "n_kv_heads")
        else:  # fewer kv heads than ranks: keep the kv head this rank's query heads read
            if world % hkv:
                raise ConfigError(f"n_kv_heads = {hkv} neither splits over nor divides {world} ranks")
            k0 = q0 // (h // hkv)
            k1 = k0 + 1
        sizes = _vocab_sizes(config.vocab_size, world)
    else:
        q0, q1, k0, k1, sizes = 0, h, 0, hkv, [config.vocab_size]
    v0 = sum(sizes[:rank]) if tp_attention else 0
    hidden = _even(config.hidden_dim, world, rank, "hidden_dim") if tp_ffn else (0, config.hidden_dim)
    n_experts = config.moe.num_experts if config.moe else 0
    experts = _even(n_experts, world, rank, "num_experts") if mode in ("ep", "tp+ep") else (0, n_experts)
    return Layout(
        mode,
        rank,
        world,
        (v0, v0 + sizes[rank if tp_attention else 0]),
        sizes,
        (q0 * d, q1 * d),
        (k0 * d, k1 * d),
        hidden,
        experts,
    )


def split_of(name: str, mode: str) -> str | None:
    """The split kind of parameter `name` under plan `mode`, None = replicated."""
    for pattern, kind in PLANS[mode]:
        if re.fullmatch(pattern, name):
            return kind
    return None


def slice_of(name: str, layout: Layout) -> tuple[int, int, int] | None:
    """(dim, start, stop) of this rank's part of parameter `name`, None = the whole tensor."""
    kind = split_of(name, layout.mode)
    if kind is None:
        return None
    dim, attr = KINDS[kind]
    start, stop = getattr(layout, attr)
    return dim, start, stop
