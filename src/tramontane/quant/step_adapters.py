"""The projections the compiled step runs, and LoRA adapters on them as `decode_block` buffers.

A block's four projections (wqkv, wo, w13, w2) reach the step either fused (one `PackedLinear`) or as
their parts (once LoRA adapters are installed: lora/layers.py splits the fused modules back into views
of the same rows; or where a GGUF file gives q, k and v different types): each a `PackedLinear` or a
LoRA wrapper over one. Parts whose packed rows lie back to back in one type run as the one packed
matrix they were, others as pieces of their own (`packed_pieces`). Each adapter becomes, per
projection, a slot of `decode_block`'s LoRA buffers (kernels.h, block_args): A [r, in] with the parts' A rows stacked, and
B [out, r] block-diagonal over the parts (zeros where a part has no adapter), with the adapter's scale
folded in. Worked example, wqkv of dim 8 with q 8 rows, k and v 4 rows each, adapter "x" of rank 2 on
q and v only: A = [A_q; A_v] [4, 8], B [16, 4] with B_q * s in rows 0..7, columns 0..1 and B_v * s in
rows 12..15, columns 2..3. The kernel adds t = A . x, then B . t, to the rows that chose the slot.

The step copies the adapters' values when it is built; its `current()` (with `watched_tensors`) tells
when they changed since (an adapter added or removed, a wrapper or a tensor swapped, or an in-place
update such as an optimizer step, which bumps a tensor's version; writes through `.data` bypass that
count and are not seen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
from torch import nn

from ..model.moe import MoeFeedForward
from ..model.transformer import Transformer, TransformerBlock
from .linear import PackedLinear

# (owner attribute, the fused module's name, the parts in output order) of each projection, in the
# order of decode_block's LoRA columns: wqkv, wo, w13, w2.
GROUPS = (
    ("attention", "wqkv", ("wq", "wk", "wv")),
    ("attention", "wo", ("wo",)),
    ("feed_forward", "w13", ("w1", "w3")),
    ("feed_forward", "w2", ("w2",)),
)


class Adapted(Protocol):
    """A LoRA wrapper over a projection (lora/layers.py's LoRALinear), as the step reads it."""

    base: nn.Module
    lora_A: nn.ParameterDict  # name -> [r, in]
    lora_B: nn.ParameterDict  # name -> [out, r]
    scales: dict[str, float]


class Selection(Protocol):
    """The model's adapter selection (lora/layers.py's AdapterSelection)."""

    active: str | None
    rows: torch.Tensor | None
    names: list[str]
    adapters: set[str]


def base_of(module: object) -> PackedLinear | None:
    """The packed projection a module computes with: itself, or the base of a LoRA wrapper over one."""
    if isinstance(module, PackedLinear):
        return module
    base = getattr(module, "base", None)
    return base if isinstance(base, PackedLinear) and hasattr(module, "lora_A") else None


def adapted(module: object) -> Adapted | None:
    """The module as a LoRA wrapper over a packed projection, or None."""
    return cast(Adapted, module) if not isinstance(module, PackedLinear) and base_of(module) is not None else None


def parts_of(owner: nn.Module, fused: str, parts: Sequence[str]) -> list[nn.Module] | None:
    """The modules computing projection `fused` of `owner`, in output order: [the fused PackedLinear], or
    its parts, each packed (or LoRA over packed) in a type of its own or not (GGUF's mixed recipes:
    Q4_K_M's attn_v is Q8_0 in some layers); None where a part is not packed."""
    whole = getattr(owner, fused, None)
    if isinstance(whole, PackedLinear):
        return [whole]
    modules = [getattr(owner, p, None) for p in parts]
    if any(b is None or not b.packed.is_contiguous() for b in map(base_of, modules)):
        return None
    return [m for m in modules if isinstance(m, nn.Module)]


def packed_pieces(modules: Sequence[nn.Module]) -> list[tuple[int, tuple[int, int, int]]]:
    """The packed matrices `parts_of`'s modules form, as (index of the piece's first part, (data_ptr,
    nbytes, qtype)): parts whose rows lie back to back in one type run as one matrix (as
    unfuse_projections leaves them); a part of another type, or elsewhere, starts the next."""
    pieces: list[tuple[int, tuple[int, int, int]]] = []
    end = key = None
    for i, m in enumerate(modules):
        b = base_of(m)
        assert b is not None  # parts_of checked
        ptr, nbytes = b.packed.data_ptr(), b.packed.nbytes
        if pieces and (b.qtype, b.in_features) == key and ptr == end:
            first, (start, size, qtype) = pieces[-1]
            pieces[-1] = (first, (start, size + nbytes, qtype))
        else:
            pieces.append((i, (ptr, nbytes, b.qtype)))
        end, key = ptr + nbytes, (b.qtype, b.in_features)
    return pieces


def selection_of(model: Transformer) -> Selection | None:
    return getattr(model, "lora_selection", None)


def adapter_names(model: Transformer) -> list[str]:
    """The installed adapters, in slot order."""
    sel = selection_of(model)
    return sorted(sel.adapters) if sel is not None else []


def _slot(modules: Sequence[nn.Module], name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Adapter `name` over the parts, flattened: A [r, in] (their A rows stacked), B [out, r]
    (block-diagonal, scale folded in), and r (0 where no part has it)."""
    a_rows, b_blocks = [], []
    for m in modules:
        base, wrapper = base_of(m), adapted(m)
        assert base is not None  # parts_of checked
        if wrapper is not None and name in wrapper.lora_A:
            a_rows.append(wrapper.lora_A[name].detach().float())
            b_blocks.append(wrapper.lora_B[name].detach().float() * wrapper.scales[name])
        else:
            b_blocks.append(torch.zeros(base.out_features, 0))
    if not a_rows:
        return torch.zeros(0), torch.zeros(0), 0
    a = torch.cat(a_rows)
    return a.reshape(-1), torch.block_diag(*b_blocks).reshape(-1), a.shape[0]


def layer_adapters(block: TransformerBlock, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_cols int32 [4, L+1] and the float32 `lora` values of every adapter slot of `block`'s
    projections (kernels.h, block_args). A Mixtral block's feed-forward has none here: adapters on its
    experts run through expert_lora, which keeps the block off the compiled step."""
    cols = torch.zeros(4, len(names) + 1, dtype=torch.int32)
    values: list[torch.Tensor] = []
    moe = isinstance(block.feed_forward, MoeFeedForward)
    for g, (owner_name, fused, parts) in enumerate(GROUPS):
        modules = [] if moe and g >= 2 else parts_of(getattr(block, owner_name), fused, parts) or []
        slots = [_slot(modules, name) for name in names]
        for s, (_, _, r) in enumerate(slots):
            cols[g, s + 1] = cols[g, s] + r
        values += [a for a, _, _ in slots] + [b for _, b, _ in slots]
    return cols, torch.cat(values) if values else torch.zeros(0)


def watched_tensors(model: Transformer, names: Sequence[str]) -> list[tuple[torch.Tensor, int]]:
    """Every adapter tensor the step copied, with its version now."""
    out = []
    for block in model.blocks():
        for owner_name, fused, parts in GROUPS:
            for m in parts_of(getattr(block, owner_name), fused, parts) or []:
                wrapper = adapted(m)
                for table in (wrapper.lora_A, wrapper.lora_B) if wrapper is not None else ():
                    out += [(table[n], table[n]._version) for n in names if n in table]
    return out


def row_slots(model: Transformer, names: Sequence[str], n: int) -> torch.Tensor:
    """Each of a step's n rows' adapter slot (int32 [n], -1 = none) from the model's selection: per row
    (the server's mixed batches) or one active adapter for all."""
    sel = selection_of(model)
    if sel is None:
        return torch.full((n,), -1, dtype=torch.int32)
    if sel.rows is None:
        slot = names.index(sel.active) if sel.active in names else -1
        return torch.full((n,), slot, dtype=torch.int32)
    if sel.rows.shape != (n,):
        raise ValueError(f"adapter rows has {list(sel.rows.shape)} entries for {n} rows of the step")
    lut = torch.tensor([names.index(m) if m in names else -1 for m in sel.names] + [-1], dtype=torch.int32)
    return lut[sel.rows]  # -1 indexes the appended -1
