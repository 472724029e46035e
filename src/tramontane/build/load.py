"""Assemble a ready `Transformer` from a model's weight files.

The model is built on the meta device and each tensor is read once (weights/ hands them out), straight
into its final dtype, then assigned: peak memory is the model plus one tensor in flight (plus the
packed GGUF file, which is mapped). Along the way: GGUF matrices of the types the packed kernels run
stay packed (quant/), HF q/k rows are un-permuted, experts are stacked, and under torchrun each rank
keeps only its part (parallel/)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import LoadError
from ..model import Transformer
from ..model.layers import rope_frequencies
from ..parallel.plan import Layout, layout_for, slice_of
from ..parallel.shard import shard_model
from ..quant.kernels import regroup, regroups, row_bytes
from ..quant.linear import FUSED_PARTS, PACKED_TYPES, PackedEmbedding, PackedExperts, PackedLinear, set_module
from ..quant.quantize import GROUP, SCHEMES, quantize_rows, rows_of, type_id
from ..quant.step import fuse
from ..weights import names
from ..weights.sources import GGUFSource, Reader, SafetensorsSource, open_source
from .heap import keep_freed_memory
from .sharded import PackedGatheredHead, PackedVocabEmbedding, rank_blocks


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    format: str  # "hf", "mistral", "gguf"
    path: Path
    weight_types: dict[str, int] = field(default_factory=dict)  # stored type name -> tensor count
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF metadata (tokenizer lives there)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    packed: bool = False,
    shard: tuple[str, int, int] | None = None,
    mmap: bool = True,
    quant: str | None = None,
) -> LoadedModel:
    """Read a model folder or GGUF file into a ready `Transformer` (eval mode, no gradients).

    packed=True keeps a GGUF file's quantized matrices as their blocks (see quant/linear.py), Mixtral's
    stacked `*_exps` experts included; with mmap=True (the default, as in llama.cpp) those blocks are
    views of the file's mapping, read from disk as they are first touched (only the experts tokens
    choose); mmap=False copies them into memory. Fusing q/k/v and gate/up copies those rows either way.
    shard = (mode, rank, world): keep only this rank's part of each tensor under the parallel plan `mode`
    ("tp", "ep", "tp+ep"; see parallel/plan.py); tensors are sliced as they are read, so the rank never
    holds the whole model.
    quant = "int8" | "int4": float matrices (Mixtral's experts one expert at a time) are quantized as they
    are read (quant/quantize.py), so the float model never exists whole: peak memory is the packed
    model plus one float tensor."""
    path = Path(path)
    fmt, config, source, name_map = open_source(path)
    layout = None
    if shard is not None:
        layout = layout_for(config, *shard)
    # Packed blocks stay packed under every plan: each rank keeps its rows, experts or whole-block
    # columns (build/sharded.py); a tensor cut inside a block is read as floats instead.
    packed = packed and fmt == "gguf"
    with torch.device("meta"):
        model = Transformer(config)
    if layout is not None:
        shard_model(model, layout)
    if quant is not None and (quant not in SCHEMES or layout is not None):
        raise LoadError(path, f"quantizing while loading takes int8 or int4, unsharded (got {quant!r})")
    if packed or quant:
        model.config = model.config.with_(quant=quant or "gguf")
    state = _assemble(model, config, source, name_map, dtype, progress, packed, layout, mmap, quant)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the modules own the tensors now: fusing projections below must not double them
    if packed or quant:
        fuse(model)
    model.inv_freq = rope_frequencies(config.head_dim, config.rope_theta)
    model.eval().requires_grad_(False)
    meta: dict[str, Any] = {}
    if isinstance(source, GGUFSource):
        meta = source.file.metadata
        source.file.close()  # unmaps now if every tensor was copied out, else when the last view goes
    # From here on the forwards reuse their freed activations' pages; after the load, not before it
    # (build/heap.py says why).
    keep_freed_memory()
    return LoadedModel(model, model.config, fmt, path, dict(source.types), meta)


def _assemble(
    model: Transformer,
    config: ModelConfig,
    source: SafetensorsSource | GGUFSource,
    name_map: names.NameMap,
    dtype: torch.dtype,
    progress: bool,
    packed: bool = False,
    layout: Layout | None = None,
    mmap: bool = True,
    quant: str | None = None,
) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    swapped: set[str] = set()
    experts: dict[str, set[int]] = {}
    quantized_experts: dict[str, set[int]] = {}
    items = source.items()
    if progress:
        from tqdm import tqdm

        # Shown only when loading takes more than a moment (tqdm's delay).
        items = tqdm(items, desc="loading weights", unit=" tensors", leave=False, delay=0.5)
    for name, read in items:
        try:
            m = name_map.map(name)
        except KeyError:
            raise LoadError(
                source.path, f"unexpected tensor {name!r}: not part of a {config.architecture} model"
            ) from None
        if m is None or (m.target == "output.weight" and config.tie_embeddings):
            continue
        if m.target not in expected:
            raise LoadError(
                source.path,
                f"tensor {name!r} maps to {m.target!r}, which this "
                f"configuration ({config.n_layers} layers, moe={config.moe}) lacks",
            )
        if packed and isinstance(source, GGUFSource) and m.transform is None and PACKABLE.fullmatch(m.target):
            # Rows the kernels regroup are read through the mapping straight into their new layout (no
            # intermediate copy: freed copies were left resident by the allocator), then its pages dropped.
            through = regroups(source.file.tensors[name].ggml_type)
            blocks = source.packed(name, PACKED_TYPES, mapped=mmap or through)
            if blocks is not None and layout is not None:
                blocks = rank_blocks(m.target, blocks, layout)
            if blocks is not None:
                _swap_packed(
                    model, source.path, name, m.target, blocks, expected, state, layout, own=through and not mmap
                )
                if through:
                    source.file.release(name)
                swapped.add(m.target)
                continue
        if layout is not None:
            m, tensor = _rank_part(m, read, layout, config)
            if tensor is None:
                continue  # an expert another rank holds
        else:
            tensor = _transform(read(), m.transform, config)
            if quant and PACKABLE.fullmatch(m.target) and expected[m.target][-1] % GROUP == 0:
                _quantize_read(model, source.path, name, m, tensor, expected, state, quant, quantized_experts)
                swapped.add(m.target)
                continue
        _place(source.path, name, m, tensor.to(dtype), expected[m.target], state, experts, dtype)
    if config.tie_embeddings and "tok_embeddings.weight" in swapped:
        embedding = model.tok_embeddings
        assert isinstance(embedding, PackedEmbedding)
        if isinstance(embedding, PackedVocabEmbedding) and layout is not None:
            model.output = PackedGatheredHead(embedding.packed, embedding.qtype, embedding.dim, layout.vocab_sizes)
        else:
            model.output = embedding.as_linear()
        state["output.packed"] = state["tok_embeddings.packed"]
    _check_complete(source.path, {k: v for k, v in expected.items() if k not in swapped}, state, experts)
    for target, seen in quantized_experts.items():
        if len(seen) != expected[target][0]:
            absent = sorted(set(range(expected[target][0])) - seen)
            raise LoadError(source.path, f"{target}: experts {absent} are missing")
    return state


# Matrices that may stay packed: the attention and dense feed-forward projections, output, embedding, and
# Mixtral's stacked experts (a parameter [E, out, in], no ".weight"; GGUF `*_exps`). Experts stored one
# tensor each (`ffn_gate.E`, an old GGUF layout) are dequantized.
PACKABLE = re.compile(
    r"(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output|tok_embeddings)\.weight"
    r"|layers\.\d+\.feed_forward\.w[123]"
)


def _swap_packed(
    model: Transformer,
    path: Path,
    name: str,
    target: str,
    blocks: tuple[torch.Tensor, int],
    expected: dict[str, tuple[int, ...]],
    state: dict[str, torch.Tensor],
    layout: Layout | None = None,
    own: bool = False,
) -> None:
    """Put a packed module where the float one was; its blocks go into the state dict. Under a plan that
    splits the vocabulary, the embedding and head become their packed vocabulary-split counterparts.
    own: the blocks are a view of the file that must not stay one (--no-mmap), unless regrouped anew."""
    rows, qtype = blocks
    shape = expected[target]  # [out, in], or [E, out, in] for stacked experts
    if tuple(rows.shape[:-1]) != shape[:-1] or rows.shape[-1] != row_bytes(qtype, shape[-1]):
        raise LoadError(
            path,
            f"tensor {name!r} holds {list(rows.shape[:-1])} rows of {rows.shape[-1]} bytes, "
            f"expected {list(shape[:-1])} rows of {shape[-1]} values",
        )
    module_path = target.removesuffix(".weight")
    # the interleaved types (quant/kernels.py); on huge pages but for the parts fuse() copies again
    regrouped, qtype = regroup(rows, qtype, shape[-1], huge=not FUSED_PARTS.fullmatch(target))
    rows = rows.clone() if own and regrouped is rows else regrouped
    with torch.device("meta"):
        module = _packed_module(module_path, torch.empty(rows.shape, dtype=torch.uint8), qtype, shape, layout)
    set_module(model, module_path, module)
    state[module_path + ".packed"] = rows


def _packed_module(
    module_path: str, rows: torch.Tensor, qtype: int, shape: tuple[int, ...], layout: Layout | None
) -> PackedLinear | PackedEmbedding | PackedExperts:
    """The packed module for parameter shape `shape` ([out, in], or [E, out, in] for stacked experts)."""
    split = layout if layout is not None and slice_of(module_path + ".weight", layout) is not None else None
    if len(shape) == 3:
        return PackedExperts(rows, qtype, shape[-1])
    if module_path == "tok_embeddings":
        if split is not None:  # the vocabulary split over ranks
            return PackedVocabEmbedding(rows, qtype, shape[-1], split.vocab[0])
        return PackedEmbedding(rows, qtype, shape[-1])
    if module_path == "output" and split is not None:
        return PackedGatheredHead(rows, qtype, shape[-1], split.vocab_sizes)
    return PackedLinear(rows, qtype, shape[-1])


def _quantize_read(
    model: Transformer,
    path: Path,
    name: str,
    m: names.Mapping,
    tensor: torch.Tensor,
    expected: dict[str, tuple[int, ...]],
    state: dict[str, torch.Tensor],
    scheme: str,
    seen: dict[str, set[int]],
) -> None:
    """Quantize a float matrix as it is read and put the packed module in place. Mixtral's experts go
    into one stack [E, out, row_bytes] made at the first of them, filled expert by expert (a file holds
    one tensor per expert, or all of them in one 3-D tensor)."""
    shape, qtype = expected[m.target], type_id(SCHEMES[scheme])
    if len(shape) == 2:
        if tuple(tensor.shape) != shape:
            raise LoadError(path, f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        packed = quantize_rows(shape[0], rows_of(tensor), scheme)
        _swap_packed(model, path, name, m.target, (packed, qtype), expected, state)
        return
    key = m.target + ".packed"
    if key not in state:
        stack = torch.empty(*shape[:2], row_bytes(qtype, shape[-1]), dtype=torch.uint8)  # [E, out, row_bytes]
        _swap_packed(model, path, name, m.target, (stack, qtype), expected, state)
    parts = [(m.expert, tensor)] if m.expert is not None else list(enumerate(tensor))
    done = seen.setdefault(m.target, set())
    for e, matrix in parts:
        if tuple(matrix.shape) != shape[1:] or not 0 <= e < shape[0] or e in done:
            raise LoadError(
                path,
                f"tensor {name!r}: expert {e} of shape {list(matrix.shape)} does not fit {list(shape)}"
                + (" (a duplicate)" if e in done else ""),
            )
        state[key][e] = quantize_rows(shape[1], rows_of(matrix), scheme)
        done.add(e)


def _transform(t: torch.Tensor, transform: str | None, config: ModelConfig) -> torch.Tensor:
    if transform == "q":
        return names.unpermute_rotary(t, config.n_heads)
    if transform == "k":
        return names.unpermute_rotary(t, config.n_kv_heads)
    return t


def _rank_part(
    m: names.Mapping, read: Reader, layout: Layout, config: ModelConfig
) -> tuple[names.Mapping, torch.Tensor | None]:
    """Read only this rank's part of a tensor. Per-expert tensors of HF/native files are slices of the
    stacked [E,...] target: their dims shift by one. The HF q/k row permutation acts within each head,
    and parts are whole heads: it is undone on the part, over the heads the part holds."""
    part = slice_of(m.target, layout)
    if part is None:
        return m, _transform(read(), m.transform, config)
    dim, start, stop = part
    if m.expert is not None:
        if dim == 0:  # whole experts per rank
            if not start <= m.expert < stop:
                return m, None
            return names.Mapping(m.target, m.transform, m.expert - start), _transform(read(), m.transform, config)
        dim -= 1
    tensor = read.part(dim, start, stop)
    if m.transform in ("q", "k"):
        tensor = names.unpermute_rotary(tensor, (stop - start) // config.head_dim)
    return m, tensor


def _place(
    path: Path,
    name: str,
    m: names.Mapping,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    state: dict[str, torch.Tensor],
    experts: dict[str, set[int]],
    dtype: torch.dtype,
) -> None:
    want = shape[1:] if m.expert is not None else shape
    if tuple(tensor.shape) != want:
        raise LoadError(path, f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(want)}")
    if m.expert is None:
        if m.target in state:
            raise LoadError(path, f"tensor {name!r} duplicates {m.target!r}")
        state[m.target] = tensor
        return
    if not 0 <= m.expert < shape[0]:
        raise LoadError(path, f"tensor {name!r}: expert {m.expert} but the model has {shape[0]} experts")
    stacked = state.setdefault(m.target, torch.empty(shape, dtype=dtype))
    seen = experts.setdefault(m.target, set())
    if m.expert in seen:
        raise LoadError(path, f"tensor {name!r} duplicates expert {m.expert}")
    stacked[m.expert].copy_(tensor)
    seen.add(m.expert)


def _check_complete(
    path: Path, expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], experts: dict[str, set[int]]
) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LoadError(path, f"missing tensors: {', '.join(missing[:5])}{more}")
    for target, seen in experts.items():
        if len(seen) != expected[target][0]:
            absent = sorted(set(range(expected[target][0])) - seen)
            raise LoadError(path, f"{target}: experts {absent} are missing")
