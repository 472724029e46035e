"""Packed GGUF matmul: float32 activations times weights kept as GGUF blocks.

`qmatmul(x, packed, qtype, k)` computes `x @ W.T` where W [N, k] is stored as N rows of GGML blocks
(`packed`, uint8 [N, row_bytes]). The compiled extension `_kernels` (C sources in csrc/; built by
setup.py, optional) decodes the blocks in registers and accumulates in float32, threaded over the N
output rows; without it, the weight is dequantized with `weights.gguf_quants` and F.linear runs.

For many activation rows (M > DEQUANTIZE_ABOVE_M[isa]) under the exact setting, or of a type without
an integer kernel, the weight is dequantized once, threaded, and F.linear's sgemm does the rest; with
AVX-512 the packed kernel is faster at every M measured. The prompt of 64+ tokens takes AMX-BF16 tiles
where the CPU has them (`tiles_from`, below).

Activations. The packed kernels of the K-quants (Q2_K to Q6_K) take x rounded to int8 per 256
elements, those of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 per 32 (integer kernels, AVX2 and AVX-512 with
VNNI, and AMX tiles for the interleaved legacy types' and Q4_K's batches where the CPU has them: the
same bits), as
llama.cpp does: the quants are multiplied as bytes, so decoding keeps up with the memory bandwidth.
"q8" rounds x once (llama.cpp's setting): each result differs from `x @ dequantize(W).T` by the
rounding of x, at most half a step of 1/127 of each block's largest |x| per element; enough, on
SmolLM2-135M, to change 5 to 8 of 10 greedy chat answers of 128 tokens somewhere along the way (issue
18's bound asks for at most 1). "q16", the default, adds what that rounding left as a second int8 row,
rounded at 1/256 of the first one's step, and sums the two rows' products (matmul.c): at most 1/32512 of
each block's largest |x| per element (1/65024 but where a remainder of half a step rounds to 128 steps
and is clamped to 127), 127-254x closer, and 9 or 10 of 10 answers identical to the exact path's on each
of six SmolLM2 files (perplexity within 0.004%). The second row shares the weights' reading and
unpacking with the first (the kernels apply each unpacked block to every activation row), so it costs
integer multiply-adds, not bandwidth; the interleaved kernels of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 add the
two as one integer, 256 q1 + q2, and scale it once (Q8_0's, for many rows, as one int16 row: half the
multiplies of two int8 rows).
The integer kernel runs at every M (decode's few rows keep their accumulators in registers), so that a
row's result does not depend on how many rows share the call: a served request's answer does not depend
on the batch it lands in, the module path's included (its dense route, past DEQUANTIZE_ABOVE_M rows,
takes only the types without an integer kernel and the exact setting). "f32" (the exact path:
`set_activations("f32")`, the environment variable TRAMONTANE_ACTIVATIONS=f32, or the CLI's --exact) keeps every activation float32: results then match
`x @ dequantize(W).T` to float32 rounding. Every other type always runs float32 activations.

Interleaved Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K and Q3_K. Where the integer kernel runs, the loader
hands Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K and Q3_K matrices to `regroup`, which interleaves each group of 8 rows block by block (the 8 rows' scales
together, the K-quants' sub-block scales arranged for one shuffle each, then 4 bytes of each row in
turn: csrc/blocks.h) into a new tensor of type Q4_0_R8 ... Q5_1_R8, ids of ours past
GGML's. Its kernel reads a block's 8 scales with one load and gets one row's dot product per int32
lane, with no horizontal sum: 1.2-2x the row-by-row kernels at 1 to 64 activation rows for Q4_0/Q4_1
(SmolLM2's 1536x576 and 576x1536, and 4096x4096, on the dev machine), 1.1-1.6x for Q4_K and Q6_K
(Mixtral-shaped 2816x1024 to 14336x4096; Q6_K at one row: 0.9-1.3x, as fast as the row kernel on a
Mistral-shaped model's decode), 1.5-1.9x for Q3_K (the same shapes, M = 1 to 64: its kernel's unpacking
of 2 + 1 bits per weight ran at 18 GB/s against a 35 GB/s bandwidth probe; 28 GB/s interleaved),
1.2-1.6x for Q8_0 (SmolLM2's head and 4096-wide shapes), 1.3-2.7x for Q5_0 and Q5_1 over their
row kernels (SmolLM2's 576-wide rows, which llama-quantize's Q4_K_M and Q5_K_M recipes write as Q5_0
and Q5_1: 3072x576 at one row 98 -> 36 us), as llama.cpp's repacked Q4_0, Q4_K and Q8_0
are. At one activation row (decoding) the legacy types' kernel walks 4 groups of rows at once, so
that each thread streams 4 parts of the matrix (1.2x on a 14336x4096 Q4_0 read from DRAM). At many
rows, with VNNI, Q4_K and Q6_K take two groups at once in 512-bit vectors, each instruction serving 16
rows (1.2x and 1.26x on 4096x4096 at 64 rows; the same bits), and under "q16" Q4_K meets a pair's mins
once, its first row's sums carrying both rows' (matmul.c's pair_sums), and its two rows' products as one
integer, 256 q1 + q2 per two sub-blocks, before the scales (half the multiplies; not where AMX tiles
run). Ranges of whole groups of 8 rows stay contiguous (splits of fused projections); `lookup_rows`
gathers an embedding's rows out of their groups; `ggml_blocks` gives the writers GGML's layout back. Switched to "f32" after load, interleaved
matrices compute through a copy in GGML's layout
made at every call (exact, slow: the loader interleaves only under the integer settings).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F

from ..weights.gguf_quants import GGML_TYPES, dequantize
from .pages import huge_empty

_ext: ModuleType | None
try:  # the compiled kernels are optional (a failed build leaves the fallback); types: _kernels.pyi
    _ext = importlib.import_module("._kernels", __package__)
except ImportError as exc:  # pragma: no cover - depends on the build
    _ext = None
    if not (isinstance(exc, ModuleNotFoundError) and (exc.name or "").endswith("_kernels")):
        # built, but it does not load (a stale or mismatched build): say so rather than run 10x slower
        warnings.warn(
            f"tramontane: the compiled kernels are installed but do not load ({exc}); running the much slower "
            "PyTorch fallback. Rebuild them (`python setup.py build_ext --inplace` in a checkout) or reinstall",
            RuntimeWarning,
            stacklevel=1,
        )

# GGML type ids the compiled kernels run (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K,
# Q6_K, BF16); the fallback handles the same set.
# Q4_0_R8 ... Q5_1_R8 are not GGML's: Q4_0, Q4_1, Q4_K, Q6_K, Q3_K, Q8_0, Q5_0 and Q5_1 interleaved 8 rows
# by 8 for their integer kernels (see above; csrc/blocks.h).
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q6_K = 2, 3, 6, 7, 8, 11, 12, 14
Q4_0_R8, Q4_1_R8, Q4_K_R8, Q6_K_R8, Q3_K_R8, Q8_0_R8, Q5_0_R8, Q5_1_R8 = 66, 67, 68, 69, 70, 71, 72, 73
INTERLEAVED = {Q4_0: Q4_0_R8, Q4_1: Q4_1_R8, Q8_0: Q8_0_R8, Q4_K: Q4_K_R8, Q6_K: Q6_K_R8, Q3_K: Q3_K_R8}
INTERLEAVED |= {Q5_0: Q5_0_R8, Q5_1: Q5_1_R8}
_BASE = {v: k for k, v in INTERLEAVED.items()}
SUPPORTED_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30, *_BASE})
_GEOMETRY = {t: (GGML_TYPES[t].block_size, GGML_TYPES[t].type_size) for t in SUPPORTED_TYPES if t in GGML_TYPES}
_GEOMETRY |= {r8: _GEOMETRY[base] for r8, base in _BASE.items()}  # per row; rows come in groups of 8

# Above this many activation rows (per instruction set of the compiled kernels), dequantize once and
# let F.linear's sgemm do the work where the integer kernels do not run (_integer_kernel); None: the
# packed kernel at every M. Measured on the dev machine (AMD EPYC, 2 threads, Q4_1 1536x576): the
# AVX-512 kernel beat dequantize + F.linear (and even a pre-dequantized dense F.linear) at every M up to
# 512; the AVX2 kernel up to about M=64; the portable C path only for a few rows.
DEQUANTIZE_ABOVE_M: dict[str, int | None] = {"avx512": None, "avx2": 64, "scalar": 4}


ACTIVATIONS = ("q8", "q16", "f32")
# GGML type -> elements per activation scale of its integer-activation kernel: the K-quants (Q2_K..Q6_K)
# per 256, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 per 32.
Q8_TYPES = {
    10: 256,
    11: 256,
    12: 256,
    13: 256,
    14: 256,
    2: 32,
    3: 32,
    6: 32,
    7: 32,
    8: 32,
    Q4_0_R8: 32,
    Q4_1_R8: 32,
    Q4_K_R8: 256,
    Q6_K_R8: 256,
    Q3_K_R8: 256,
    Q8_0_R8: 32,
    Q5_0_R8: 32,
    Q5_1_R8: 32,
}
DEFAULT_ACTIVATIONS = "q16"  # the extension's own default (matmul.c)
_setting = DEFAULT_ACTIVATIONS if _ext is not None else "f32"  # mirrors the extension's setting


def set_activations(name: str) -> str:
    """Use activations `name` ("q16", "q8" or "f32", see above) in every packed matmul of this process;
    returns the previous setting. Without the compiled kernels everything is "f32" already."""
    global _setting
    if name not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {name!r}")
    if _ext is None:
        return "f32"
    _setting = name
    return _ext.set_activations(name)


def activations() -> str:
    """The activations setting in use ("q8", "q16" or "f32")."""
    return _setting


def _integer() -> bool:
    """Whether the integer kernels run (q16 or q8: the setting is read on every matmul)."""
    return _setting != "f32"


def _activations_from_env() -> None:
    wanted = os.environ.get("TRAMONTANE_ACTIVATIONS")
    if wanted is None:
        return
    if wanted not in ACTIVATIONS:
        raise ValueError(f"TRAMONTANE_ACTIVATIONS must be one of {', '.join(ACTIVATIONS)}, not {wanted!r}")
    set_activations(wanted)


_activations_from_env()


def available() -> bool:
    """Whether the compiled kernels were built and import."""
    return _ext is not None


def extension() -> ModuleType | None:
    """The compiled module itself (None when it was not built), for callers of its other entry points."""
    return _ext


def isa() -> str:
    """The instruction set the compiled kernels use ('avx512', 'avx2', 'scalar'), or 'none'."""
    return _ext.isa() if _ext is not None else "none"


def interleaved(qtype: int) -> bool:
    """Whether `qtype` is one of the interleaved layouts (rows in groups of 8)."""
    return qtype in _BASE


def type_name(qtype: int) -> str:
    """The name of a type id the kernels may hold (GGML's, or e.g. "Q4_0 (interleaved)")."""
    if qtype in _BASE:
        return f"{GGML_TYPES[_BASE[qtype]].name} (interleaved)"
    return GGML_TYPES[qtype].name if qtype in GGML_TYPES else repr(qtype)


def regroups(qtype: int) -> bool:
    """Whether regroup() makes a new tensor of a matrix of `qtype` (so that a loader need not map it)."""
    return qtype in INTERLEAVED and _integer() and isa() not in ("scalar", "none")


def regroup(rows: torch.Tensor, qtype: int, k: int, huge: bool = False) -> tuple[torch.Tensor, int]:
    """A matrix's packed rows [..., N, row_bytes] of `k` elements as the kernels run them fastest: Q4_0,
    Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K and Q3_K interleaved into a new tensor (Q4_0_R8, ...) where their
    integer kernel runs (activations q16 or q8, a vector instruction set) and N is a multiple of 8;
    anything else as it is. Decided at load. huge: the new tensor on huge pages (quant/pages.py), for a
    matrix that stays as it is (the loader's parts of fused projections are copied again by the fusing)."""
    if not (regroups(qtype) and rows.dim() >= 2 and rows.shape[-2] % 8 == 0):
        return rows, qtype
    return _interleaved(rows, qtype, k, to_r8=True, huge=huge), INTERLEAVED[qtype]


def ggml_blocks(rows: torch.Tensor, qtype: int, k: int) -> tuple[torch.Tensor, int]:
    """The inverse of regroup(): rows in GGML's own layout (a new tensor when interleaved) and their type."""
    if qtype not in _BASE:
        return rows, qtype
    return _interleaved(rows, _BASE[qtype], k, to_r8=False), _BASE[qtype]


def _interleaved(rows: torch.Tensor, base: int, k: int, *, to_r8: bool, huge: bool = False) -> torch.Tensor:
    assert _ext is not None  # the interleaved types exist only where the extension made them
    src = rows.contiguous()
    out = huge_empty(src.numel()).view(src.shape) if huge else torch.empty_like(src)
    n = src.numel() // row_bytes(base, k)
    _ext.interleave((src.data_ptr(), src.numel()), (out.data_ptr(), out.numel()), n, k, base, to_r8)
    return out


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one packed row of `k` elements of `qtype` (validated)."""
    geometry = _GEOMETRY.get(qtype)
    if geometry is None:
        raise ValueError(f"GGML type {type_name(qtype)} is not supported by the packed kernels")
    if not isinstance(k, int) or k <= 0 or k % geometry[0]:
        raise ValueError(
            f"row length k={k!r} must be a positive multiple of {type_name(qtype)}'s block size {geometry[0]}"
        )
    return k // geometry[0] * geometry[1]


def _check_packed(packed: torch.Tensor, qtype: int, k: int) -> None:
    # The hot path of every call: plain attribute checks, messages built only on failure.
    rb = row_bytes(qtype, k)
    if not (
        isinstance(packed, torch.Tensor)
        and packed.dtype == torch.uint8
        and packed.dim() == 2
        and packed.shape[1] == rb
        and packed.is_cpu
        and packed.is_contiguous()
    ):
        if not isinstance(packed, torch.Tensor):
            raise ValueError(f"packed weight must be a tensor, got {type(packed).__name__}")
        raise ValueError(
            f"packed weight must be a contiguous CPU uint8 tensor [N, {rb}] "
            f"({type_name(qtype)} rows of {k}), got {packed.dtype} {list(packed.shape)} "
            f"on {packed.device}{'' if packed.is_contiguous() else ', not contiguous'}"
        )


def _check_x(x: torch.Tensor, k: int) -> None:
    if not (
        isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.is_cpu and x.dim() >= 1 and x.shape[-1] == k
    ):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"activations must be a tensor, got {type(x).__name__}")
        raise ValueError(
            f"activations must be a float32 CPU tensor [..., {k}], got {x.dtype} {list(x.shape)} on {x.device}"
        )


def use_dense(m: int) -> bool:
    """Whether a matmul of m activation rows goes through dequantize + sgemm (DEQUANTIZE_ABOVE_M)."""
    limit = DEQUANTIZE_ABOVE_M.get(isa(), 16)
    return limit is not None and m > limit


def _integer_kernel(qtype: int, k: int) -> bool:
    """Whether a matmul past the dense route's M runs the extension's integer kernel instead: wherever the
    integer activations meet a type that has one, at every M, so that a row's result does not depend on
    how many rows share the call. (Dequantize + sgemm is faster for a small plain K-quant matrix at many
    rows on AVX2, measured on a Zen 3: Q5_K 1024 x 1024 at M = 512 2.5x, at 128 1.7x, at 65 1.1x; it gave
    the module path's rows other bits past 64 rows than below, a prompt's logits other bits than the
    decoding rows' beside it.)"""
    return _integer() and qtype in Q8_TYPES and k % Q8_TYPES[qtype] == 0 and isa() != "scalar"


def integer_everywhere(qtypes: Iterable[int]) -> bool:
    """Whether matrices of these types all run their integer kernel at every M (activations q16 or q8, a vector
    pass; the interleaved types at any size, the others' rows a multiple of their block as GGUF's are)."""
    return _integer() and isa() not in ("scalar", "none") and all(t in Q8_TYPES for t in qtypes)


def _threads(n_threads: int | None) -> int:
    if n_threads is None:
        return torch.get_num_threads()
    if not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
    return n_threads


def dequantize_packed(packed: torch.Tensor, qtype: int, k: int, n_threads: int | None = None) -> torch.Tensor:
    """Packed rows uint8 [N, row_bytes] -> float32 [N, k]."""
    _check_packed(packed, qtype, k)
    threads = _threads(n_threads)
    n = packed.shape[0]
    if _ext is None:
        return dequantize(packed.reshape(-1), qtype).view(n, k)
    out = torch.empty(n, k, dtype=torch.float32)
    if n:
        _ext.dequantize_rows(
            (packed.data_ptr(), packed.numel()), (out.data_ptr(), out.numel() * 4), n, k, qtype, threads
        )
    return out


def lookup_rows(packed: torch.Tensor, idx: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """Rows idx (int64 [n], each in [0, N)) of packed rows [N, row_bytes] -> float32 [n, k]: an embedding
    lookup, interleaved rows gathered out of their group of 8."""
    _check_packed(packed, qtype, k)
    if _ext is None:
        return dequantize_packed(packed[idx], qtype, k)
    idx = idx.to(torch.int64).contiguous()
    out = torch.empty(idx.numel(), k, dtype=torch.float32)
    _ext.lookup_rows(
        (packed.data_ptr(), packed.numel()),
        (idx.data_ptr(), idx.numel() * 8),
        (out.data_ptr(), out.numel() * 4),
        packed.shape[0],
        k,
        qtype,
    )
    return out


# bfloat16 rows (a float checkpoint's weights) against this many activation rows or more go through
# torch's bfloat16 GEMM where the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16: oneDNN),
# the activations rounded to bfloat16 as transformers' bf16 models have them: 1.5 TFLOP/s against
# the float32 kernels' ~0.3 on 2 cores of a Sapphire Rapids host (512 x 1024 x 2816), a 246M
# Mistral-shaped checkpoint's 512-token prefill 3.4x faster. Not under the exact setting (f32), nor below
# it (decoding: the rows are read once, float32 activations cost nothing there).
BF16_GEMM_FROM_M = 16
BF16 = 30


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux's CPU flags: amx_bf16 or avx512_bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_gemm(qtype: int, m: int) -> bool:
    """Whether a matmul of m activation rows against `qtype` rows runs torch's bfloat16 GEMM
    (BF16_GEMM_FROM_M): where the tiles below do not run."""
    return qtype == BF16 and m >= BF16_GEMM_FROM_M and _setting != "f32" and _native_bf16() and not tiles_from()


# Prompts on AMX-BF16 tiles (csrc/tiles_bf16.c): where the CPU has AMX-BF16, under the integer settings,
# the prompt rows of a prompt of tiles_from() tokens or more (not decoding rows) multiply every packed
# type as bfloat16: the weights decoded 32 rows at a time into bfloat16 tiles, the activations rounded to
# bfloat16 as transformers' bfloat16 models have them, float32 sums over the whole row (SmolLM2's Q4_1
# blocks at 512 rows: 0.39x the integer kernels' time). The compiled step (block_step.c) knows each row's
# prompt from the cache (`prompts`), so a prompt computes alike however it is chunked or found in the
# prefix cache. This module path knows no prompts: it takes a chunk x [..., T, k] of T >= tiles_from()
# rows for one. Either way a row's result does not depend on the other rows of its call. The exact
# setting never takes them.
def tiles_from() -> int:
    """The fewest tokens of a prompt whose prompt rows take the bfloat16 tiles, or 0 where none do."""
    return _ext.tiles_from() if _ext is not None else 0


def matmul_2d(x2: torch.Tensor, packed: torch.Tensor, qtype: int, k: int, threads: int, run: int = 0) -> torch.Tensor:
    """x2 contiguous float32 [M, k] -> [M, N] (arguments already checked); `run`: rows of one sequence
    among them (a prompt chunk's length; 0: every row its own), which decides the tiles (`tiles_from`)."""
    m, n = x2.shape[0], packed.shape[0]
    if bf16_gemm(qtype, m):
        return F.linear(x2.to(torch.bfloat16), packed.view(torch.bfloat16)).float()
    if _ext is None or (use_dense(m) and not _integer_kernel(qtype, k)):
        return F.linear(x2, dequantize_packed(packed, qtype, k, threads))
    y = torch.empty(m, n, dtype=torch.float32)
    tiles = run > 1 and 0 < tiles_from() <= run  # (decoding's rows of their own: no call)
    if m and n:
        _ext.matmul(
            (x2.data_ptr(), x2.numel() * 4),
            (packed.data_ptr(), packed.numel()),
            (y.data_ptr(), y.numel() * 4),
            m,
            n,
            k,
            qtype,
            threads,
            tiles,
        )
    return y


# From this many rows on, greedy decoding's tokens come from csrc/greedy.c's bound pass over a Q8_0 head
# (x rounded once where q16 rounds it twice) and the exact logits of the few groups that can hold the
# largest. SmolLM2's head (49152 x 576) from memory, 2 threads, calls alternating with the matmul and
# argmax in one process: 16 rows 0.70-0.81 of their time, 10-12 rows 0.85-0.89, 8 rows alike, 4 rows
# 1.07x, 1 row 1.41x (there the matmul waits on memory, not on its products).
GREEDY_FROM_M = 8


@functools.lru_cache(maxsize=64)
def _bias_tensors(bias: tuple[tuple[int, float], ...], n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A shared logit_bias as greedy_rows hands it to the kernel (token ids int64, values float32), made
    once per bias and head, not once a step (a served request's bias meets every one of its steps);
    None where a token is named twice or lies past the head's n rows."""
    if len({t for t, _ in bias}) < len(bias) or any(not 0 <= t < n for t, _ in bias):
        return None
    return torch.tensor([t for t, _ in bias], dtype=torch.int64), torch.tensor(
        [v for _, v in bias], dtype=torch.float32
    )


def greedy_rows(
    x2: torch.Tensor, packed: torch.Tensor, qtype: int, k: int, threads: int, bias: tuple[tuple[int, float], ...] = ()
) -> torch.Tensor | None:
    """Each row's argmax of matmul_2d(x2, packed, qtype, k, threads) plus `bias` (a logit_bias every row
    shares: (token, value) pairs added as float32 sums; the first of equal maxima), [M] int64, computing
    only the logits that can be the largest (a Q8_0 head: csrc/greedy.c); None where that does not apply
    (fewer rows than GREEDY_FROM_M, another type, the exact setting, a pass without VNNI, a token named
    twice or past the head, x not finite)."""
    m, n = x2.shape[0], packed.shape[0]
    if _ext is None or m < GREEDY_FROM_M or bf16_gemm(qtype, m) or (use_dense(m) and not _integer_kernel(qtype, k)):
        return None
    arrays = _bias_tensors(bias, n)
    if arrays is None:
        return None
    ids, values = arrays
    out = torch.empty(m, dtype=torch.int64)
    ran = _ext.greedy_rows(
        (x2.data_ptr(), x2.numel() * 4),
        (packed.data_ptr(), packed.numel()),
        (out.data_ptr(), m * 8),
        m,
        n,
        k,
        qtype,
        (ids.data_ptr(), ids.numel() * 8),
        (values.data_ptr(), values.numel() * 4),
        len(bias),
        threads,
    )
    return out if ran else None


class _PackedLinear(torch.autograd.Function):
    """Gradient with respect to x (the packed weight is frozen): dx = dy @ W."""

    @staticmethod
    def forward(ctx, x2, packed, qtype, k, threads, run):
        ctx.save_for_backward(packed)
        ctx.qtype, ctx.k, ctx.threads = qtype, k, threads
        return matmul_2d(x2, packed, qtype, k, threads, run)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = grad_y @ dequantize_packed(packed, ctx.qtype, ctx.k, ctx.threads)  # [M, N] @ [N, K]
        return grad_x, None, None, None, None, None


def qmatmul(x: torch.Tensor, packed: torch.Tensor, qtype: int, k: int, n_threads: int | None = None) -> torch.Tensor:
    """x float32 [..., k] @ W.T with W [N, k] given as packed GGUF rows uint8 [N, row_bytes] -> float32
    [..., N]. `n_threads` defaults to torch.get_num_threads(). Differentiable with respect to x. The rows
    of x [..., T, k] are sequences of T tokens (`tiles_from`); those of a 2-D x, each its own.

    Fastest with a contiguous 2-D x (no reshapes: each costs about a microsecond)."""
    _check_packed(packed, qtype, k)
    _check_x(x, k)
    threads = _threads(n_threads)
    flat = x.dim() == 2 and x.is_contiguous()
    x2 = x if flat else x.reshape(-1, k).contiguous()  # [M, K]
    run = x.shape[-2] if x.dim() >= 3 else 1
    if x.requires_grad and torch.is_grad_enabled():
        y = _PackedLinear.apply(x2, packed, qtype, k, threads, run)
    else:
        y = matmul_2d(x2, packed, qtype, k, threads, run)  # [M, N]
    return y if flat else y.view(*x.shape[:-1], packed.shape[0])
