"""Weight-only quantization of float checkpoints (`--quant int8|int4`) as a module swap.

The weights are written in GGUF's own block layouts, so they run on the same packed kernels as GGUF
files: int8 = Q8_0 (int8 values, one float16 scale per group of 32), int4 = Q4_1 (4-bit values, a float16
scale and minimum per group of 32). The scheme is recorded in `config.quant`. "bf16" and "f16" keep the
matrices as 16-bit rows (GGML's BF16 / F16) on the same kernels: how a float checkpoint loads in
bfloat16 or float16 where the compiled kernels are built (api.load), so that it decodes on the compiled
step with float32 activations.

Why int8 has a scale per 32 weights rather than one per output channel: on SmolLM2 (the perplexity test),
per-channel int8 moved perplexity by 1.7% (35.57 -> 34.96), groups of 32 stay well within 1%; the six
extra bytes per 32 weights (6%) buy that, and the same Q8_0 kernels run both."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from ..errors import RequestError
from ..model.moe import MoeFeedForward
from ..model.transformer import Transformer
from ..weights.gguf_quants import GGML_TYPES
from .kernels import INTERLEAVED
from .linear import PackedEmbedding, PackedExperts, PackedLinear, set_module

SCHEMES = {"int8": "Q8_0", "int4": "Q4_1", "bf16": "BF16", "f16": "F16"}
GROUP = 32
# Which linear layers are quantized: attention and dense feed-forward projections, and the output head
# (the token embedding too, as packed rows; Mixtral's experts as PackedExperts, its router stays float).
TARGETS = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output")


def type_id(name: str) -> int:
    return next(i for i, t in GGML_TYPES.items() if t.name == name)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """[N,K] float -> [N, K/32*34] uint8 Q8_0 blocks (d = max|x| / 127, q = round(x / d))."""
    n, k = w.shape
    groups = w.float().reshape(n, k // GROUP, GROUP)  # [N,G,32]
    d = groups.abs().amax(dim=-1, keepdim=True) / 127.0  # [N,G,1]
    q = torch.where(d > 0, groups / torch.where(d > 0, d, 1.0), 0.0).round().clamp(-128, 127).to(torch.int8)
    scale = d.to(torch.float16).view(torch.uint8).view(n, k // GROUP, 2)  # [N,G,2]
    return torch.cat((scale, q.view(torch.uint8)), dim=-1).reshape(n, -1)  # [N,G*34]


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """[N,K] float -> [N, K/32*20] uint8 Q4_1 blocks (x = d * q + m, q in 0..15)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // GROUP, GROUP)  # [N,G,32]
    lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)  # [N,G,1]
    d = (hi - lo) / 15.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    q = ((groups - lo) * inv + 0.5).floor().clamp(0, 15).to(torch.uint8)  # [N,G,32]
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # element j in the low nibble, j + 16 in the high one
    header = torch.cat((d.to(torch.float16), lo.to(torch.float16)), dim=-1).view(torch.uint8)  # [N,G,4]
    return torch.cat((header, nibbles), dim=-1).reshape(n, -1)  # [N,G*20]


def as_16bit(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """[N,K] float -> [N, 2K] uint8: the values rounded to `dtype` (bfloat16, float16) as packed rows;
    no rounding at all where the checkpoint stores that type (the loader's 16-bit packing)."""
    return lambda w: w.to(dtype).contiguous().view(torch.uint8)


SIXTEEN_BIT = {"bf16": torch.bfloat16, "f16": torch.float16}  # the 16-bit schemes and their dtypes
# scheme -> [N,K] float -> blocks
QUANTIZERS = {"int8": quantize_q8_0, "int4": quantize_q4_1} | {s: as_16bit(d) for s, d in SIXTEEN_BIT.items()}
ROW_CHUNK = 1024  # rows quantized at a time: bounds the float temporaries of a large matrix


def quantize_rows(rows: int, make: Callable[[int, int], torch.Tensor], scheme: str) -> torch.Tensor:
    """Quantize a [rows, K] matrix produced chunk by chunk by `make(start, stop)` -> packed rows. The
    16-bit schemes take the matrix whole: no float temporaries to bound, and where it already holds that
    type its own bytes are the rows (no copy: a copy freed at load stays resident in the allocator)."""
    if scheme in SIXTEEN_BIT:
        return QUANTIZERS[scheme](make(0, rows))
    out = None
    for start in range(0, rows, ROW_CHUNK):
        part = QUANTIZERS[scheme](make(start, min(start + ROW_CHUNK, rows)))  # [chunk, row_bytes]
        if out is None:  # one allocation for the result: chunk temporaries come and go around it
            out = torch.empty(rows, part.shape[1], dtype=torch.uint8)
        out[start : start + part.shape[0]] = part
    assert out is not None
    return out


def set_packed_embedding(model: Transformer, packed: torch.Tensor, qtype: int) -> None:
    """The token embedding as packed rows (only the rows looked up are decoded); a tied output head
    reads the same rows."""
    embedding = PackedEmbedding(packed, qtype, model.config.dim)
    model.tok_embeddings = embedding
    if model.config.tie_embeddings:
        model.output = embedding.as_linear()


def quantize_model(model: Transformer, scheme: str) -> Transformer:
    """Swap the float linear layers for packed ones in place; record the scheme in the config."""
    if scheme not in SCHEMES:
        raise RequestError(f"--quant {scheme!r} is not one of {', '.join(SCHEMES)}")
    qname = SCHEMES[scheme]
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and TARGETS.fullmatch(name) and module.in_features % GROUP == 0:
            packed = quantize_rows(module.out_features, rows_of(module.weight.detach()), scheme)
            set_module(model, name, PackedLinear(packed, type_id(qname), module.in_features))
    for name, module in list(model.named_modules()):
        if isinstance(module, MoeFeedForward):
            _quantize_experts(model, name, module, scheme)
    embedding = model.tok_embeddings
    if isinstance(embedding, nn.Embedding) and embedding.embedding_dim % GROUP == 0:
        packed = quantize_rows(embedding.num_embeddings, rows_of(embedding.weight.detach()), scheme)
        set_packed_embedding(model, packed, type_id(qname))
    model.config = model.config.with_(quant=scheme)
    from .step import fuse  # fused q/k/v and gate/up (the builder then picks the decode backend)

    fuse(model)
    return model


def summary(model: nn.Module) -> str:
    """The model's matrices by type, most first, as `--quant` left them: "Q8_0 x210, float x1" (a
    matrix whose rows are not whole groups of 32 stays float, as llama.cpp keeps such a tensor F16)."""
    counts: Counter[str] = Counter()
    as_stored = {r8: base for base, r8 in INTERLEAVED.items()}  # an interleaved layout: its file type
    for module in model.modules():
        if isinstance(module, (PackedLinear, PackedExperts, PackedEmbedding)):
            stored = as_stored.get(module.qtype, module.qtype)
            counts[GGML_TYPES[stored].name] += 1
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            counts["float"] += 1
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def _quantize_experts(model: Transformer, path: str, moe: MoeFeedForward, scheme: str) -> None:
    """Mixtral's stacked float experts -> PackedExperts, one projection at a time (its float stack is
    dropped as soon as the packed one replaces it), expert by expert within it."""
    qtype = type_id(SCHEMES[scheme])
    for w in ("w1", "w2", "w3"):
        stack = getattr(moe, w)
        if not isinstance(stack, torch.Tensor) or stack.shape[-1] % GROUP:
            continue
        experts, rows, cols = stack.shape
        packed = torch.empty(experts, rows, cols // GROUP * GGML_TYPES[qtype].type_size, dtype=torch.uint8)
        for e in range(experts):
            packed[e] = quantize_rows(rows, rows_of(stack[e].detach()), scheme)
        set_module(model, f"{path}.{w}", PackedExperts(packed, qtype, cols))


def rows_of(weight: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Rows [a, b) of a float matrix, as `quantize_rows` asks for them."""
    return lambda a, b: weight[a:b]
