"""Packed GGUF matmul kernels (tramontane.quant.kernels / _kernels) against the `gguf` package's numpy
dequantizer: every supported type, several shapes and activation counts, every instruction set the CPU
has, thread counts, the pure-torch fallback, and input validation."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import QuantError  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from tramontane.model.kv_types import KV_TYPES, kv_type  # noqa: E402
from tramontane.quant import kernels  # noqa: E402
from tramontane.weights.gguf_quants import GGML_TYPES  # noqa: E402

ext = kernels._ext
needs_ext = pytest.mark.skipif(ext is None, reason="the compiled extension tramontane.quant._kernels did not build")

# Byte offsets of the float16 scale fields of the block types the gguf package cannot quantize.
F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
LEGACY = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
K_QUANTS = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL = LEGACY + K_QUANTS
SHAPES = {True: [(96, 512), (1536, 768)], False: [(96, 256), (1536, 576)]}  # keyed by "is a K-quant"
MS = [1, 3, 16, 40]
ISAS = list(ext.isas()) if ext is not None else []


@cache
def weight(qtype: QT, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, row_bytes], reference float32 [n, k] from gguf's dequantizer)."""
    rng = np.random.default_rng(n * 1000 + k + int(qtype))
    info = GGML_TYPES[int(qtype)]
    try:
        raw = ref_quantize(rng.standard_normal((n, k), dtype=np.float32), qtype)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
    except (NotImplementedError, QuantError):
        n_blocks = n * k // info.block_size
        raw = rng.integers(0, 256, (n_blocks, info.type_size), dtype=np.uint8)
        for pos in F16_FIELDS[qtype]:
            raw[:, pos : pos + 2] = rng.uniform(-0.05, 0.05, (n_blocks, 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(n, -1)
    dense = ref_dequantize(raw, qtype).reshape(n, k).astype(np.float32)
    return torch.from_numpy(raw.copy()), torch.from_numpy(dense)


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return x.double() @ dense.double().T


def buf(t: torch.Tensor) -> tuple[int, int]:
    """The (data_ptr, nbytes) form the raw extension takes for a buffer."""
    return t.data_ptr(), t.numel() * t.element_size()


def raw_rows(packed: torch.Tensor, n: int, k: int, qtype: int, rows: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """rows [M, k] times the n packed rows of type qtype through the raw extension, on `threads` threads
    (NaN where it wrote nothing); tests bind the matrix with partial."""
    y = torch.full((rows.shape[0], n), float("nan"))
    ext.matmul(buf(rows.contiguous()), buf(packed), buf(y), rows.shape[0], n, k, qtype, threads)
    return y


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    """Runs a test once per instruction set the CPU can run (AVX-512, AVX2, portable C)."""
    if ext is None:
        pytest.skip("the compiled extension did not build")
    previous = ext.set_isa(request.param)
    yield request.param
    ext.set_isa("best")
    assert previous in ISAS


def cases():
    for qtype in ALL:
        for n, k in SHAPES[qtype in K_QUANTS]:
            yield pytest.param(qtype, n, k, id=f"{qtype.name}-{n}x{k}")


@needs_ext
@pytest.mark.parametrize("qtype,n,k", list(cases()))
def test_qmatmul_matches_reference(isa: str, qtype: QT, n: int, k: int) -> None:
    packed, dense = weight(qtype, n, k)
    for m in MS:
        x = activations(m, k, seed=m)
        y = kernels.qmatmul(x, packed, int(qtype), k)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert rel_err(y, reference(x, dense)) < 1e-4, (isa, m)


@needs_ext
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_raw_kernel_every_m_and_ragged_n(isa: str, qtype: QT) -> None:
    # The raw kernel, bypassing the wrapper's dense route: ragged N (not a multiple of the 4-row
    # groups), every M from 1 to 6 (the fused kernels and the tiled path), and M past one 64-row tile.
    k = 512 if qtype in K_QUANTS else 160
    packed, dense = weight(qtype, 7, k)
    for m in [1, 2, 3, 4, 5, 6, 70]:
        x = activations(m, k, seed=m)
        for n in [1, 3, 7]:
            y = torch.full((m, n), float("nan"))
            ext.matmul(buf(x), buf(packed), buf(y), m, n, k, int(qtype), 2)
            assert rel_err(y, reference(x, dense[:n])) < 1e-4, (isa, m, n)


@needs_ext
@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_16bit_rows_at_one_row_are_those_of_a_batch(isa: str, qtype: QT) -> None:
    """At one activation row the 16-bit kernel walks 4 streams of rows at once (decoding a float
    checkpoint): each row's value equals the reference and, bit for bit, that row in a batch of 3, for row
    counts that split into the streams and those that leave rows over."""
    k = 320
    packed, dense = weight(qtype, 150, k)
    x = activations(3, k, seed=2)
    for n in [150, 64, 13, 3]:
        one, three = torch.full((1, n), float("nan")), torch.full((3, n), float("nan"))
        ext.matmul(buf(x[:1].contiguous()), buf(packed[:n]), buf(one), 1, n, k, int(qtype), 2)
        ext.matmul(buf(x), buf(packed[:n]), buf(three), 3, n, k, int(qtype), 2)
        assert rel_err(one, reference(x[:1], dense[:n])) < 1e-5, (isa, n)
        assert torch.equal(one[0], three[0]), (isa, n)


@needs_ext
@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.F32], ids=lambda t: t.name)
def test_float_rows_of_odd_length(isa: str, qtype: QT) -> None:
    # Block size 1: K need not be a multiple of the vector width.
    k = 99
    packed, dense = weight(qtype, 9, k)
    for m in [1, 5]:
        x = activations(m, k)
        assert rel_err(kernels.qmatmul(x, packed, int(qtype), k), reference(x, dense)) < 1e-4
    np.testing.assert_array_equal(kernels.dequantize_packed(packed, int(qtype), k).numpy(), dense.numpy())


@needs_ext
@pytest.mark.parametrize("qtype,n,k", list(cases()))
def test_dequantize_packed_matches_reference(isa: str, qtype: QT, n: int, k: int) -> None:
    packed, dense = weight(qtype, n, k)
    got = kernels.dequantize_packed(packed, int(qtype), k, n_threads=2)
    assert got.shape == (n, k) and got.dtype == torch.float32
    # Same formulas; a fused multiply-add may round the last bit differently.
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6 * dense.abs().max().item())


@needs_ext
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_thread_counts_agree(qtype: QT) -> None:
    n, k = SHAPES[qtype in K_QUANTS][1]
    packed, _ = weight(qtype, n, k)
    for m in [1, 3, 16]:
        x = activations(m, k)
        one = kernels.qmatmul(x, packed, int(qtype), k, n_threads=1)
        for threads in [2, 3]:
            torch.testing.assert_close(
                kernels.qmatmul(x, packed, int(qtype), k, n_threads=threads), one, rtol=1e-6, atol=1e-6
            )


@needs_ext
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_compiled_and_fallback_agree(monkeypatch: pytest.MonkeyPatch, qtype: QT) -> None:
    n, k = SHAPES[qtype in K_QUANTS][0]
    packed, _ = weight(qtype, n, k)
    x = activations(3, k)
    compiled = kernels.qmatmul(x, packed, int(qtype), k)
    compiled_rows = kernels.dequantize_packed(packed, int(qtype), k)
    monkeypatch.setattr(kernels, "_ext", None)
    assert not kernels.available()
    fallback = kernels.qmatmul(x, packed, int(qtype), k)
    assert rel_err(compiled, fallback) < 1e-5
    torch.testing.assert_close(
        kernels.dequantize_packed(packed, int(qtype), k),
        compiled_rows,
        rtol=1e-6,
        atol=1e-6 * compiled_rows.abs().max().item(),
    )


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q2_K, QT.Q3_K, QT.Q6_K], ids=lambda t: t.name)
def test_fallback_alone_matches_reference(monkeypatch: pytest.MonkeyPatch, qtype: QT) -> None:
    # Runs whether or not the extension built.
    monkeypatch.setattr(kernels, "_ext", None)
    n, k = SHAPES[qtype in K_QUANTS][0]
    packed, dense = weight(qtype, n, k)
    for m in [1, 40]:
        x = activations(m, k)
        assert rel_err(kernels.qmatmul(x, packed, int(qtype), k), reference(x, dense)) < 1e-4


@needs_ext
def test_dense_route_for_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # The dequantize + F.linear route taken above DEQUANTIZE_ABOVE_M rows gives the same numbers.
    packed, dense = weight(QT.Q4_1, 96, 256)
    x = activations(40, 256)
    packed_route = kernels.qmatmul(x, packed, int(QT.Q4_1), 256)
    monkeypatch.setitem(kernels.DEQUANTIZE_ABOVE_M, ext.isa(), 16)
    dense_route = kernels.qmatmul(x, packed, int(QT.Q4_1), 256)
    assert rel_err(packed_route, dense_route) < 1e-5
    assert rel_err(dense_route, reference(x, dense)) < 1e-4


def test_shapes_batches_and_views() -> None:
    packed, dense = weight(QT.Q8_0, 96, 256)
    q = int(QT.Q8_0)
    x = activations(6, 256).view(2, 3, 256)
    y = kernels.qmatmul(x, packed, q, 256)
    assert y.shape == (2, 3, 96)
    assert rel_err(y.reshape(6, 96), reference(x.reshape(6, 256), dense)) < 1e-4
    xt = activations(256, 4).T  # non-contiguous [4, 256]
    assert rel_err(kernels.qmatmul(xt, packed, q, 256), reference(xt, dense)) < 1e-4
    assert kernels.qmatmul(activations(256, 1)[:, 0], packed, q, 256).shape == (96,)
    assert kernels.qmatmul(torch.empty(0, 256), packed, q, 256).shape == (0, 96)
    assert kernels.qmatmul(activations(2, 256), packed[:0], q, 256).shape == (2, 0)


def test_available_and_isa() -> None:
    assert kernels.available() == (ext is not None)
    assert kernels.isa() in {"avx512", "avx2", "scalar", "none"}


def test_bad_inputs_raise_value_error() -> None:
    packed, _ = weight(QT.Q4_1, 96, 256)
    q = int(QT.Q4_1)
    x = activations(2, 256)
    bad_calls = [
        lambda: kernels.qmatmul(x, packed, int(QT.Q8_1), 256),  # a type the kernels do not run
        lambda: kernels.qmatmul(x, packed, 999, 256),
        lambda: kernels.qmatmul(x, packed, q, 250),  # not a whole number of blocks
        lambda: kernels.qmatmul(x, packed, q, 512),  # row bytes do not match
        lambda: kernels.qmatmul(x, packed.float(), q, 256),
        lambda: kernels.qmatmul(x, packed.reshape(-1), q, 256),
        lambda: kernels.qmatmul(x, torch.cat([packed, packed], 0)[::2], q, 256),  # non-contiguous
        lambda: kernels.qmatmul(x, packed.numpy(), q, 256),
        lambda: kernels.qmatmul(x.double(), packed, q, 256),
        lambda: kernels.qmatmul(x.bfloat16(), packed, q, 256),
        lambda: kernels.qmatmul(activations(2, 128), packed, q, 256),
        lambda: kernels.qmatmul(torch.tensor(1.0), packed, q, 256),
        lambda: kernels.qmatmul(x.numpy(), packed, q, 256),
        lambda: kernels.qmatmul(x, packed, q, 256, n_threads=0),
        lambda: kernels.qmatmul(x, packed, q, 256, n_threads=-2),
        lambda: kernels.dequantize_packed(packed, q, 250),
        lambda: kernels.dequantize_packed(packed.reshape(-1), q, 256),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()


@needs_ext
def test_raw_extension_validates_its_arguments() -> None:
    packed, _ = weight(QT.Q4_1, 96, 256)
    x = activations(1, 256)
    y = torch.empty(1, 96)
    ptrs = (buf(x), buf(packed), buf(y))
    for m, n, k, qtype, threads in [
        (1, 96, 256, int(QT.Q8_1), 1),  # not run by the kernels
        (1, 96, 256, -1, 1),
        (1, 96, 250, 3, 1),
        (1, 96, 256, 3, 0),
        (-1, 96, 256, 3, 1),
        (1, -1, 256, 3, 1),
    ]:
        with pytest.raises(ValueError):
            ext.matmul(*ptrs, m, n, k, qtype, threads)
    with pytest.raises(ValueError, match="null pointer"):
        ext.matmul((0, buf(x)[1]), buf(packed), buf(y), 1, 96, 256, 3, 1)
    with pytest.raises(ValueError, match="unsupported GGML type"):
        ext.dequantize_rows(buf(packed), buf(y), 96, 256, int(QT.Q8_K), 1)
    with pytest.raises(ValueError):
        ext.set_isa("sse9")


@needs_ext
def test_raw_matmul_and_dequantize_refuse_short_buffers() -> None:
    # Each buffer's nbytes is checked against the extent M, N, K need, before any memory is touched.
    packed, _ = weight(QT.Q4_1, 96, 256)
    rb = packed.shape[1]
    x = activations(3, 256)
    y = torch.full((3, 96), 7.0)
    short = {
        "x": (buf(x.reshape(-1)[:-1]), buf(packed), buf(y)),  # one element short
        "w": (buf(x), buf(packed[:-1]), buf(y)),  # one row short
        "y": (buf(x), buf(packed), buf(y.reshape(-1)[:-1])),
    }
    for name, args in short.items():
        need, have = {"x": (3 * 256 * 4, 3 * 256 * 4 - 4), "w": (96 * rb, 95 * rb), "y": (3 * 96 * 4, 3 * 96 * 4 - 4)}[
            name
        ]
        with pytest.raises(ValueError, match=rf"^matmul: buffer {name} holds {have} bytes, its shape needs {need}$"):
            ext.matmul(*args, 3, 96, 256, int(QT.Q4_1), 1)
    assert (y == 7.0).all()
    out = torch.full((96, 256), 7.0)
    with pytest.raises(ValueError, match=rf"buffer w holds {95 * rb} bytes, its shape needs {96 * rb}"):
        ext.dequantize_rows(buf(packed[:-1]), buf(out), 96, 256, int(QT.Q4_1), 1)
    with pytest.raises(ValueError, match=r"buffer out holds"):
        ext.dequantize_rows(buf(packed), buf(out[:-1]), 96, 256, int(QT.Q4_1), 1)
    assert (out == 7.0).all()
    ext.matmul(buf(x), buf(packed), buf(y), 3, 96, 256, int(QT.Q4_1), 1)  # exact sizes run
    ext.dequantize_rows(buf(packed), buf(out), 96, 256, int(QT.Q4_1), 1)
    assert not (y == 7.0).any() and not (out == 7.0).all()


# ---- the block step binding: decode_block(shape, buffers, eps, window, n_threads) ----

BLOCK_SHAPE = (3, 64, 4, 2, 16, 96, 8)  # B, dim, H, Hkv, D, F, S
K_BLOCK_SHAPE = (3, 256, 4, 2, 64, 256, 8)  # every row length a multiple of the K-quants' 256
PACKED = ("wqkv", "wo", "w13", "w2")
# a Mixtral block's router and experts, and the paged cache's block tables
DENSE_UNUSED = {"gate": (0, 0), "w1e": (0, 0, 0), "w3e": (0, 0, 0), "tables": (0, 0), "seq": (0, 0)}
DENSE_UNUSED |= {"lora_row": (0, 0), "lora_cols": (0, 0), "lora": (0, 0)}  # no LoRA adapters (L = 0)
DENSE_UNUSED |= {"wk": (0, 0, 0), "wv": (0, 0, 0), "w3": (0, 0, 0)}  # q, k, v and gate, up in one type
DENSE_UNUSED |= {"prompts": (0, 0)}  # no row is a prompt's


def block_case(
    qtype: QT = QT.Q8_0, window: int = 0, shape: tuple[int, ...] = BLOCK_SHAPE, qpos: tuple[int, ...] = (5, 11, -1)
) -> dict:
    """Tensors of one decode_block call (row 2 is padding), with the weights' dense references."""
    b, dim, h, hkv, d, f, s = shape
    g = torch.Generator().manual_seed(7)
    case = {
        "x": torch.randn(b, dim, generator=g),
        "attn_norm": torch.rand(dim, generator=g) + 0.5,
        "ffn_norm": torch.rand(dim, generator=g) + 0.5,
        "k_cache": torch.randn(b, hkv, s, d, generator=g),
        "v_cache": torch.randn(b, hkv, s, d, generator=g),
    }
    for name, (n, k) in {
        "wqkv": ((h + 2 * hkv) * d, dim),
        "wo": (dim, h * d),
        "w13": (2 * f, dim),
        "w2": (dim, f),
    }.items():
        case[name], case[name + "_dense"] = weight(qtype, n, k)
    case["qpos"] = torch.tensor(qpos)
    case["kpos"] = torch.full((b, s), -1, dtype=torch.long)
    for row, q in enumerate(case["qpos"].tolist()):  # every earlier position that fits, this step's included
        for p in range(max(0, q - s + 1), q + 1):
            case["kpos"][row, p % s] = p
    angles = torch.randn(b, d // 2, generator=g)
    case["cos_sin"] = torch.stack([angles.cos(), angles.sin()], -1).contiguous()  # [B, D/2, 2]
    case["qtype"], case["window"], case["shape"] = int(qtype), window, shape
    return case


def run_block(case: dict, short: str | None = None, threads: int = 2) -> None:
    """decode_block on `case`; buffer `short` passed one element (packed weights: one row) short."""
    buffers = {}
    for name in ("x", "attn_norm", "ffn_norm", *PACKED, "cos_sin", "k_cache", "v_cache", "kpos", "qpos"):
        t = case[name]
        if name == short:
            t = t[:-1] if name in PACKED else t.reshape(-1)[:-1]
        buffers[name] = (*buf(t), case["qtype"]) if name in PACKED else buf(t)
    buffers |= DENSE_UNUSED
    ext.decode_block(case["shape"], buffers, 1e-5, case["window"], threads)


def block_reference(
    case: dict, stored: bool = False, rounded_queries: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, k_cache, v_cache after the block, in float64 torch (model/transformer.py's arithmetic); with
    `stored`, the caches already hold this step's keys and values (as a kernel stored them); with
    `rounded_queries` "q8", each query head is first rounded to int8 per 32 (d = max|q| / 127), with
    "q16" plus what that left, rounded at d / 256 and clamped to 127 steps (matmul.c's two rows)."""
    b, dim, h, hkv, d, f, s = case["shape"]
    x, kc, vc = case["x"].double(), case["k_cache"].double().clone(), case["v_cache"].double().clone()
    cs = case["cos_sin"].double()[:, None]  # [B, 1, D/2, 2]

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    def rope(z, n):
        z = z.view(b, n, d // 2, 2)
        c, sn = cs[..., 0], cs[..., 1]
        return torch.stack([z[..., 0] * c - z[..., 1] * sn, z[..., 0] * sn + z[..., 1] * c], -1).view(b, n, d)

    q, k, v = (norm(x, case["attn_norm"]) @ case["wqkv_dense"].double().T).split([h * d, hkv * d, hkv * d], -1)
    q, k, v = rope(q, h), rope(k, hkv), v.view(b, hkv, d)
    if rounded_queries:
        blocks = q.view(b, h, d // 32, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        first = torch.round(blocks / scale.clamp_min(1e-30)) * scale
        step = scale / 256
        rest = torch.round((blocks - first) / step.clamp_min(1e-30)).clamp(-127, 127) * step
        q = (first + (rest if rounded_queries == "q16" else 0)).view(b, h, d)
    att = torch.zeros(b, h, d, dtype=torch.float64)
    for row, qp in enumerate(case["qpos"].tolist()):
        if qp < 0:
            continue
        if stored:
            k[row], v[row] = kc[row, :, qp % s], vc[row, :, qp % s]  # what the reference would store: returned
        else:
            kc[row, :, qp % s], vc[row, :, qp % s] = k[row], v[row]
        kp = case["kpos"][row]
        seen = (kp >= 0) & (kp <= qp) & ((qp - kp < case["window"]) if case["window"] > 0 else True)
        for head in range(h):
            grp = head // (h // hkv)
            p = torch.softmax(kc[row, grp][seen] @ q[row, head] / d**0.5, 0)
            att[row, head] = p @ vc[row, grp][seen]
    x = x + att.view(b, h * d) @ case["wo_dense"].double().T
    gate, up = (norm(x, case["ffn_norm"]) @ case["w13_dense"].double().T).split(f, -1)
    return x + (torch.nn.functional.silu(gate) * up) @ case["w2_dense"].double().T, kc, vc


@needs_ext
@pytest.mark.parametrize(
    "qtype,window,shape",
    [(QT.Q8_0, 0, BLOCK_SHAPE), (QT.Q4_1, 4, BLOCK_SHAPE), (QT.Q2_K, 0, K_BLOCK_SHAPE), (QT.Q3_K, 4, K_BLOCK_SHAPE)],
    ids=["Q8_0", "Q4_1-window", "Q2_K", "Q3_K-window"],
)
def test_decode_block_runs_with_exact_sizes(isa: str, qtype: QT, window: int, shape: tuple[int, ...]) -> None:
    case = block_case(qtype, window, shape)
    want_x, want_k, want_v = block_reference(case)
    run_block(case)
    assert rel_err(case["x"], want_x) < 1e-4, isa
    assert rel_err(case["k_cache"], want_k) < 1e-4 and rel_err(case["v_cache"], want_v) < 1e-4


@needs_ext
def test_decode_block_reads_one_prompt_length_per_cache_row() -> None:
    """prompts, where given, holds each sequence's prompt length (offline: one per cache row, B here): a
    buffer shorter than that is refused by name; a full one runs (rows past their prompt: the same bits
    as without)."""
    case, plain = block_case(QT.Q8_0), block_case(QT.Q8_0)
    lengths = torch.tensor([3, 4, 0], dtype=torch.int32)  # every row past its prompt: decoding rows
    short = {**DENSE_UNUSED, "prompts": (lengths.data_ptr(), 8)}
    with pytest.raises(ValueError, match=r"buffer prompts holds 8 bytes, its shape needs 12"):
        _run_with(case, short)
    _run_with(case, {**DENSE_UNUSED, "prompts": buf(lengths)})
    run_block(plain)
    assert torch.equal(case["x"], plain["x"])


def _run_with(case: dict, unused: dict) -> None:
    buffers = {n: (*buf(case[n]), case["qtype"]) if n in PACKED else buf(case[n]) for n in (*PACKED, "x", "attn_norm")}
    buffers |= {n: buf(case[n]) for n in ("ffn_norm", "cos_sin", "k_cache", "v_cache", "kpos", "qpos")}
    ext.decode_block(case["shape"], {**buffers, **unused}, 1e-5, case["window"], 2)


@needs_ext
@pytest.mark.parametrize("given", [("wk", "wv", "w3"), ("wv",), ("wk",), ("w3",)])
def test_decode_block_takes_pieces_of_their_own_types(isa: str, given: tuple[str, ...]) -> None:
    """q, k, v and gate, up of different types, as GGUF's mixed recipes write them (Q4_K_M: Q5_0 q and k,
    Q8_0 v): each piece given (wk, wv, w3) holds its part's rows, and those of the parts after it that are
    not given; wqkv and w13 hold the rest. The block computes the reference over the rows stacked."""
    case = block_case(QT.Q8_0)
    b, dim, h, hkv, d, f, s = BLOCK_SHAPE
    starts = {"wqkv": 0, "wk": h * d, "wv": (h + hkv) * d, "w13": 0, "w3": f}
    ends = {"wqkv": (h + 2 * hkv) * d, "w13": 2 * f}
    types = {"wqkv": QT.Q8_0, "wk": QT.Q4_1, "wv": QT.Q5_0, "w13": QT.Q8_0, "w3": QT.Q5_1}
    buffers = {name: (0, 0, 0) for name in ("wk", "wv", "w3")}
    for fused, pieces in (("wqkv", ("wqkv", "wk", "wv")), ("w13", ("w13", "w3"))):
        cuts = [starts[p] for p in pieces if p == fused or p in given] + [ends[fused]]
        names = [p for p in pieces if p == fused or p in given]
        dense = []
        for name, lo, hi in zip(names, cuts, cuts[1:]):
            packed, ref = weight(types[name], hi - lo, dim)
            case[f"{name}_piece"], buffers[name] = packed, (*buf(packed), int(types[name]))
            dense.append(ref)
        case[f"{fused}_dense"] = torch.cat(dense)
    want_x, want_k, want_v = block_reference(case)
    for name in ("x", "attn_norm", "ffn_norm", "wo", "w2", "cos_sin", "k_cache", "v_cache", "kpos", "qpos"):
        buffers[name] = (*buf(case[name]), int(QT.Q8_0)) if name in PACKED else buf(case[name])
    ext.decode_block(BLOCK_SHAPE, {**DENSE_UNUSED, **buffers}, 1e-5, 0, 2)
    assert rel_err(case["x"], want_x) < 1e-4, isa
    assert rel_err(case["k_cache"], want_k) < 1e-4 and rel_err(case["v_cache"], want_v) < 1e-4
    short = {**DENSE_UNUSED, **buffers, given[-1]: (buffers[given[-1]][0], 1, buffers[given[-1]][2])}
    with pytest.raises(ValueError, match=rf"buffer {given[-1]} holds 1 bytes"):
        ext.decode_block(BLOCK_SHAPE, short, 1e-5, 0, 2)


@needs_ext
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("activations", ["f32", "q16"])
def test_block_rows_on_two_threads_are_those_on_one(isa: str, qtype: QT, activations: str) -> None:
    """The per-row work between the projections (the norms, the gating, the residual adds) runs inside
    the projections' own threads (block_step.c's row_work): with two, each thread normalizes or gates the
    rows it then rounds and adds its output columns into the residual stream. 16 rows through a block
    whose matrices are large enough for two threads give x bit for bit as on one thread (where it all runs
    on the calling thread), interleaved (Q4_1) or not (Q8_0)."""
    shape = (16, 256, 8, 2, 32, 512, 40)
    outs = []
    previous = kernels.set_activations(activations)
    try:
        for threads in (1, 2):
            case = block_case(qtype, 0, shape, qpos=tuple(range(20, 36)))
            if qtype == QT.Q4_1:
                for name in PACKED:
                    case[name], case["qtype"] = kernels.regroup(case[name], int(qtype), case[name + "_dense"].shape[1])
            run_block(case, threads=threads)
            outs.append(case["x"])
    finally:
        kernels.set_activations(previous)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], block_case(qtype, 0, shape, qpos=tuple(range(20, 36)))["x"])  # the block ran


KV_SHAPE = (3, 64, 4, 2, 32, 96, 80)  # D = 32 (one Q8_0 block); S = 80 keys: two blocks of the online softmax
KV_BOUND = {"f32": 1e-6, "bf16": 8e-3, "f16": 1e-3, "q8_0": 1e-2}  # new keys vs the float64 ones, of their scale


@needs_ext
@pytest.mark.parametrize(
    ("kv", "activations", "bound"),
    [("f32", "f32", 1e-5), ("bf16", "f32", 1e-5), ("f16", "f32", 1e-5), ("q8_0", "f32", 1e-5)]
    + [("q8_0", "q8", 5e-2), ("q8_0", "q16", 1e-4)],  # q8: its matmuls' own rounding moves x 1.1-1.4%
)
@pytest.mark.parametrize("heads", [4, 8])  # 2 or 4 query heads per kv head
def test_decode_block_reads_each_kv_type(isa: str, kv: str, activations: str, bound: float, heads: int) -> None:
    """A cache stored as f32, bf16, f16 or q8_0 (model/kv_types.py), rows at positions past one block
    of ATT_KB = 64 keys: the kernel stores this step's keys rounded to the type (within its rounding of
    the float64 ones) and attends the keys it decodes: x equals the float64 block over the cache as the
    kernel left it, to float32 rounding. With the fast activations a Q8_0 cache meets queries rounded to
    int8 per 32, under q16 as two int8 rows (integer dot products, values decoded in registers; the
    scalar pass has no such path): the reference rounds its queries so too (float64 against float32: a
    rare element rounds the other way)."""
    previous = kernels.set_activations(activations)
    try:
        check_kv_type(isa, kv, bound, (*KV_SHAPE[:2], heads, *KV_SHAPE[3:]))
    finally:
        kernels.set_activations(previous)


@needs_ext
@pytest.mark.parametrize(("activations", "bound"), [("q8", 5e-2), ("q16", 1e-4)])
def test_a_q8_0_cache_of_several_blocks_a_row(isa: str, activations: str, bound: float) -> None:
    """Head dim 128 (four Q8_0 blocks a row, as Mistral's): the integer scores sum each block's dot
    products with its own scales (AVX-512 meets 16 keys at once, their bytes transposed into lanes),
    over 76 and 80 keys (the second block of 64 keys ends 12 and 16 keys in)."""
    previous = kernels.set_activations(activations)
    try:
        check_kv_type(isa, "q8_0", bound, (3, 64, 8, 2, 128, 96, 80))
    finally:
        kernels.set_activations(previous)


@needs_ext
@pytest.mark.parametrize(("activations", "bound"), [("q8", 5e-2), ("q16", 1e-4)])
def test_a_q8_0_cache_s_values_mixed_two_keys_at_a_time(isa: str, activations: str, bound: float) -> None:
    """AVX-512 mixes a Q8_0 cache's values two keys at a time, four to a step, its weights as int16 in
    steps of their bound over a block of 64 keys (simd_step.inc, mix32_i16): 67, 70 and 73 keys end the
    second block 3, 6 and 9 keys in (a key without its pair, a pair without its second), and the scores
    spread by tens (attn_norm 4x) put weights of most sizes in one block; x equals the float64 block."""
    previous = kernels.set_activations(activations)
    try:
        check_kv_type(isa, "q8_0", bound, (3, 64, 8, 2, 128, 96, 80), norm_scale=4.0, qpos=(66, 69, 72))
    finally:
        kernels.set_activations(previous)


@needs_ext
@pytest.mark.parametrize(("kv", "activations"), [("f32", "f32"), ("q8_0", "q16")])
def test_subnormal_key_weights_leave_the_caller_s_floating_point_state(isa: str, kv: str, activations: str) -> None:
    """Queries and keys 30x larger (attn_norm 30x: scores spread by hundreds) give most keys a weight
    below 2^-126 of the best's, which the attention flushes to zero (MXCSR's FTZ and DAZ, block_step.c):
    x still equals the float64 block, and the calling thread's state is put back after (a subnormal
    product is still one)."""
    tiny = np.float32(1e-38)
    previous = kernels.set_activations(activations)
    try:
        check_kv_type(isa, kv, 1e-4, (*KV_SHAPE[:2], 8, *KV_SHAPE[3:]), norm_scale=30.0)
    finally:
        kernels.set_activations(previous)
    assert tiny * np.float32(0.25) == np.float32(2.5e-39) and np.float32(2.5e-39) != 0


@needs_ext
@pytest.mark.parametrize("kv", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("head_dim", [36, 64, 128])
def test_decode_block_reads_16_bit_rows_of_any_head_dim(isa: str, kv: str, head_dim: int) -> None:
    """A 16-bit cache's rows are widened in registers as they are attended (simd_step.inc): a head dim
    that is not a whole number of vectors (36 = 4 x 8 + 4 floats, 2 x 16 + 4) takes the element-wise
    tails of the scores and the values, against the same float64 block. Four query heads a kv head: three
    share each pass over the keys and values (one after them alone), on AVX2 four keys' scores and four
    vectors of values at a time (64 and 128: two and four such passes a value row)."""
    check_kv_type(isa, kv, 1e-5, (3, 64, 8, 2, head_dim, 96, 80))


def check_kv_type(
    isa: str,
    kv: str,
    bound: float,
    shape: tuple[int, ...],
    norm_scale: float = 1.0,
    qpos: tuple[int, ...] = (75, 150, -1),
) -> None:
    kind = kv_type(kv)
    case = block_case(QT.Q8_0, 0, shape, qpos=qpos)
    case["attn_norm"] *= norm_scale
    cache = {n: kind.encode(case[n]) for n in ("k_cache", "v_cache")}
    buffers = {n: (*buf(case[n]), case["qtype"]) for n in PACKED}
    buffers |= {n: buf(case[n]) for n in ("x", "attn_norm", "ffn_norm", "cos_sin", "kpos", "qpos")}
    buffers |= DENSE_UNUSED | {n: (*buf(t), kind.ggml) for n, t in cache.items()}
    _, want_k, want_v = block_reference(case)  # this step's keys in float64
    x0 = case["x"].clone()
    ext.decode_block(shape, buffers, 1e-5, 0, 2)
    got, case["x"] = case["x"], x0
    case |= {n: kind.decode(t).float() for n, t in cache.items()}
    rounded = kernels.activations() if kv == "q8_0" and kernels.activations() != "f32" and isa != "scalar" else ""
    want_x, _, _ = block_reference(case, stored=True, rounded_queries=rounded)
    assert rel_err(got, want_x) < bound, isa
    for row, q in enumerate(p for p in qpos if p >= 0):
        s = shape[-1]
        assert rel_err(case["k_cache"][row, :, q % s], want_k[row, :, q % s]) < KV_BOUND[kv]
        assert rel_err(case["v_cache"][row, :, q % s], want_v[row, :, q % s]) < KV_BOUND[kv]


def test_kv_encoders_round_as_gguf_and_torch_do(isa: str) -> None:
    """The C encoders (the compiled step's stores; float16 rows through each instruction set's own) are
    bit for bit model/kv_types.py's, on random rows and on the edges (zeros, ties, half's overflow and
    subnormals, a Q8_0 block too small for its scale's inverse); both equal gguf-py's reference quantizers
    on random rows (no ties: GGML rounds Q8_0 ties away from zero, these to even)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g) * torch.logspace(-9, 5, 300)[:, None]
    edges = torch.tensor([0.0, 65504.0, 65519.0, 65520.0, -7e4, 6.1e-5, 6.0e-5, 2.9802322e-08])
    x[0], x[1], x[2] = 0.0, edges.repeat(8), (torch.arange(64) - 31.5) * 0.25  # q8_0 ties: x / d = k + 0.5
    x[0, 32:] = torch.randn(32, generator=g) * 1e-38  # a block whose Q8_0 scale is subnormal (1/d: inf)
    for name, kind in KV_TYPES.items():
        want = kind.encode(x)
        got = torch.empty_like(want)
        ext.encode_rows(buf(x), buf(got), 300, 64, kind.ggml)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        if name != "f32":
            qt = {"bf16": QT.BF16, "f16": QT.F16, "q8_0": QT.Q8_0}[name]
            with np.errstate(over="ignore"):  # gguf-py's float16 cast of the rows past 65504
                ref = ref_quantize(x[3:].numpy(), qt)
            assert np.array_equal(want[3:].view(torch.uint8).numpy(), ref.view(np.uint8)), name
    with pytest.raises(ValueError, match="cannot hold rows of 48"):
        ext.encode_rows(buf(x), buf(x), 1, 48, int(QT.Q8_0))
    # With subnormals flushed (torch.set_flush_denormal sets MXCSR's FTZ and DAZ): the same half rows.
    want = KV_TYPES["f16"].encode(x)
    got = torch.empty_like(want)
    flushing = torch.set_flush_denormal(True)
    try:
        ext.encode_rows(buf(x), buf(got), 300, 64, int(QT.F16))
    finally:
        torch.set_flush_denormal(False)
    assert not flushing or torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@needs_ext
def test_float16_encoders_write_a_nan_as_the_portable_one_does(isa: str) -> None:
    """A NaN (quiet, signalling, either sign, any payload) becomes sign | 0x7e00 in every instruction
    set's float16 rows, the 7 others of its 8 as ever, here in lanes 5, 12, 17 and the tail (63)."""
    x = torch.randn(2, 67, generator=torch.Generator().manual_seed(5))
    bits = torch.tensor([0x7FC01234, -0x00400000, 0x7F800001, 0x7FFFFFFF], dtype=torch.int32)  # -0x400000: 0xffc00000
    x[0, [5, 12, 17, 63]] = bits.view(torch.float32)
    got = torch.empty(2, 67, dtype=torch.float16)
    ext.encode_rows(buf(x), buf(got), 2, 67, int(QT.F16))
    want = x.to(torch.float16).view(torch.int16).clone()
    want[0, [5, 12, 17, 63]] = torch.tensor([0x7E00, 0xFE00 - 0x10000, 0x7E00, 0x7E00], dtype=torch.int16)
    assert torch.equal(got.view(torch.int16), want)


@needs_ext
def test_rms_norm_is_the_float64_formula() -> None:
    """The compiled steps' final norm (the blocks' own loop): x / sqrt(mean(x^2) + eps) * w per row, to
    float32 rounding of the float64 formula; in place (out = x) alike; a short or overlapping buffer refused."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(5, 96, generator=g) * 30, torch.randn(96, generator=g)
    x64 = x.double()
    want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    out = torch.empty_like(x)
    ext.rms_norm(buf(x), buf(w), buf(out), 5, 96, 1e-5)
    assert (out.double() - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    inplace = x.clone()
    ext.rms_norm(buf(inplace), buf(w), buf(inplace), 5, 96, 1e-5)
    assert torch.equal(inplace, out)
    with pytest.raises(ValueError, match="w"):
        ext.rms_norm(buf(x), buf(w[:95]), buf(out), 5, 96, 1e-5)
    with pytest.raises(ValueError, match="overlaps"):
        ext.rms_norm(buf(x[1:]), buf(w), buf(x[:4]), 4, 96, 1e-5)


@needs_ext
def test_decode_block_reads_a_paged_pool(isa: str) -> None:
    """The same block on a paged pool: each row's keys copied from its offline slots into blocks of 4
    handed out shuffled, row 1's first block released (outside its window of 8), read through the
    tables; equal to the float64 reference of the offline case."""
    case = block_case(QT.Q4_1, 0, BLOCK_SHAPE)
    want_x, want_k, want_v = block_reference(case)
    b, dim, h, hkv, d, f, s = BLOCK_SHAPE
    size, order = 4, [5, 2, 7, 0, 3, 6]  # blocks of 4 slots; pool of 8 blocks, these handed out in turn
    tables = torch.full((2, 3), -1, dtype=torch.int32)
    tables[0, :2], tables[1, 1:] = torch.tensor(order[:2]), torch.tensor(order[2:4])
    pool_k, pool_v = torch.zeros(8, hkv, size, d), torch.zeros(8, hkv, size, d)  # a block's rows head by head
    for row, q in enumerate(case["qpos"].tolist()[:2]):
        for p in range(max(0, q - s + 1), q):  # the earlier positions the row sees
            at = (int(tables[row, p // size]), slice(None), p % size)
            pool_k[at], pool_v[at] = case["k_cache"][row, :, p % s], case["v_cache"][row, :, p % s]
    buffers = {
        name: (*buf(case[name]), case["qtype"]) if name in PACKED else buf(case[name])
        for name in ("x", "attn_norm", "ffn_norm", *PACKED, "cos_sin", "qpos")
    }
    seq = torch.tensor([0, 1, 0], dtype=torch.int32)
    buffers |= DENSE_UNUSED | {"k_cache": buf(pool_k), "v_cache": buf(pool_v), "kpos": (0, 0)}
    buffers |= {"tables": buf(tables), "seq": buf(seq)}
    # S = 8 keys at most, with window 8: row 1 (position 11) sees 4..11, as the offline case's 8 slots
    ext.decode_block((*BLOCK_SHAPE, 0, 0, 8 * size, size, 2, 3), buffers, 1e-5, s, 2)
    assert rel_err(case["x"], want_x) < 1e-4, isa
    for row, q in enumerate(case["qpos"].tolist()[:2]):
        at = (int(tables[row, q // size]), slice(None), q % size)
        assert rel_err(pool_k[at], want_k[row, :, q % s]) < 1e-4 and rel_err(pool_v[at], want_v[row, :, q % s]) < 1e-4
    with pytest.raises(ValueError, match=r"row 1 \(position 11\).*out of range"):
        ext.decode_block((*BLOCK_SHAPE, 0, 0, 8 * size, size, 2, 3), buffers, 1e-5, s + 1, 2)  # needs block 0
    with pytest.raises(ValueError, match="bad paged cache"):
        ext.decode_block((*BLOCK_SHAPE, 0, 0, 8 * size + 1, size, 2, 3), buffers, 1e-5, s, 2)


@needs_ext
@pytest.mark.parametrize(
    "name", ["x", "attn_norm", "ffn_norm", *PACKED, "cos_sin", "k_cache", "v_cache", "kpos", "qpos"]
)
def test_decode_block_refuses_a_short_buffer(name: str) -> None:
    # One element (a packed weight: one row) short: a ValueError naming the buffer and both sizes, and
    # nothing read or written.
    case = block_case()
    before = {k: case[k].clone() for k in ("x", "k_cache", "v_cache")}
    need = case[name].numel() * case[name].element_size()
    have = need - (need // case[name].shape[0] if name in PACKED else case[name].element_size())
    with pytest.raises(ValueError, match=rf"^decode_block: buffer {name} holds {have} bytes, its shape needs {need}$"):
        run_block(case, short=name)
    for k, t in before.items():
        assert torch.equal(case[k], t), k
    run_block(case)  # the same buffers at their full sizes run
    assert not torch.equal(case["x"], before["x"])


@needs_ext
def test_decode_block_validates_its_arguments() -> None:
    case = block_case()
    full = {}
    for name in ("x", "attn_norm", "ffn_norm", *PACKED, "cos_sin", "k_cache", "v_cache", "kpos", "qpos"):
        full[name] = (*buf(case[name]), case["qtype"]) if name in PACKED else buf(case[name])
    full |= DENSE_UNUSED
    b, dim, h, hkv, d, f, s = BLOCK_SHAPE
    bad = [
        ((b, dim, h, 3, d, f, s), full, ValueError, "bad block shape"),  # H not a multiple of Hkv
        ((b, dim, h, hkv, d + 1, f, s), full, ValueError, "bad block shape"),  # odd head dim
        ((0, dim, h, hkv, d, f, s), full, ValueError, "bad block shape"),
        ((b, dim, h, hkv, d, f), full, TypeError, "shape must be"),
        (BLOCK_SHAPE, {k: v for k, v in full.items() if k != "kpos"}, ValueError, "buffer kpos missing"),
        (BLOCK_SHAPE, {**full, "kpso": full["kpos"]}, ValueError, "unknown buffer 'kpso'"),
        (BLOCK_SHAPE, {**full, "wo": full["wo"][:2]}, TypeError, r"wo must be a tuple \(data_ptr, nbytes, qtype\)"),
        (BLOCK_SHAPE, {**full, "x": (*full["x"], 0)}, TypeError, r"x must be a tuple \(data_ptr, nbytes\)"),
        (BLOCK_SHAPE, {**full, "w2": (*full["w2"][:2], int(QT.Q8_1))}, ValueError, "w2: GGML type 9"),
        (BLOCK_SHAPE, {**full, "w13": (*full["w13"][:2], int(QT.Q4_K))}, ValueError, "w13: GGML type 12 cannot"),
        (BLOCK_SHAPE, {**full, "qpos": (0, full["qpos"][1])}, ValueError, "qpos is a null pointer"),
        (BLOCK_SHAPE, {**full, "v_cache": (full["v_cache"][0], -4)}, ValueError, "negative size"),
        ((*BLOCK_SHAPE, 8, 0), full, ValueError, "bad experts E=8 K=0"),
        ((*BLOCK_SHAPE, 2, 3), full, ValueError, "bad experts E=2 K=3"),
        ((*BLOCK_SHAPE, 0, 1), full, ValueError, "bad experts E=0 K=1"),
        ((*BLOCK_SHAPE, 100, 65), full, ValueError, "bad experts E=100 K=65"),
        ((*BLOCK_SHAPE, 8, 2), full, ValueError, "buffer w2 holds .* its shape needs"),  # w2: 8 experts' rows
        (BLOCK_SHAPE, {**full, "w1e": (0, 0, -1)}, ValueError, "unsupported GGML type of an unused weight"),
    ]
    before = case["x"].clone()
    for shape, buffers, error, match in bad:
        with pytest.raises(error, match=match):
            ext.decode_block(shape, buffers, 1e-5, 0, 1)
    with pytest.raises(ValueError, match="n_threads"):
        ext.decode_block(BLOCK_SHAPE, full, 1e-5, 0, 0)
    assert torch.equal(case["x"], before)


@needs_ext
def test_decode_block_runs_a_list_of_blocks_in_order_after_checking_them_all() -> None:
    """A list of blocks' buffers: the blocks of two cases run one after the other on the same x equal two
    calls; a bad dict anywhere in the list is refused before the first block writes anything."""

    def buffers(case: dict, x: torch.Tensor) -> dict:
        out = {n: (*buf(case[n]), case["qtype"]) if n in PACKED else buf(case[n]) for n in (*PACKED, "cos_sin")}
        for n in ("attn_norm", "ffn_norm", "k_cache", "v_cache", "kpos", "qpos"):
            out[n] = buf(case[n])
        return out | {"x": buf(x)} | DENSE_UNUSED

    first, second = block_case(QT.Q8_0), block_case(QT.Q4_0)
    second["attn_norm"] = second["attn_norm"].flip(0).contiguous()  # another block's weights
    caches = [{k: c[k].clone() for k in ("k_cache", "v_cache")} for c in (first, second)]
    x = first["x"].clone()
    ext.decode_block(BLOCK_SHAPE, [buffers(first, x), buffers(second, x)], 1e-5, 0, 2)
    one_by_one = first["x"].clone()
    for case, kv in zip((first, second), caches):
        ext.decode_block(BLOCK_SHAPE, buffers(case | kv, one_by_one), 1e-5, 0, 2)
    assert torch.equal(x, one_by_one) and not torch.equal(x, first["x"])
    for case, kv in zip((first, second), caches):
        assert all(torch.equal(case[k], kv[k]) for k in kv)  # each block wrote its own cache
    before = x.clone()
    bad = {**buffers(second, x), "wo": buffers(second, x)["wo"][:2]}
    with pytest.raises(TypeError, match=r"wo must be a tuple"):
        ext.decode_block(BLOCK_SHAPE, [buffers(first, x), bad], 1e-5, 0, 2)
    with pytest.raises(TypeError, match=r"each block's buffers must be a dict, not tuple"):
        ext.decode_block(BLOCK_SHAPE, [buffers(first, x), ()], 1e-5, 0, 2)
    with pytest.raises(TypeError, match=r"buffers must be a dict \(one block\) or a list of dicts"):
        ext.decode_block(BLOCK_SHAPE, (buffers(first, x),), 1e-5, 0, 2)
    assert torch.equal(x, before)


def test_gradient_with_respect_to_x() -> None:
    packed, dense = weight(QT.Q4_0, 96, 256)
    x = activations(3, 256).requires_grad_()
    grad_y = activations(3, 96, seed=5)
    kernels.qmatmul(x, packed, int(QT.Q4_0), 256).backward(grad_y)
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ dense.T).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert kernels.qmatmul(x, packed, int(QT.Q4_0), 256).grad_fn is None


# ---- integer activations (the default "q8" setting; this suite runs "f32" unless a test asks) ----

Q8_TYPES = K_QUANTS + [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q5_0, QT.Q5_1]  # the types with integer-activation kernels
# Bytes [start, stop) of a block holding its quants, for the types whose zero quants are an offset
# (Q4_0: -8 d) or a min (the others) that the kernels apply to the exact x.
QUANT_BYTES = {QT.Q2_K: (16, 80), QT.Q4_K: (16, None), QT.Q5_K: (16, None), QT.Q4_0: (2, None), QT.Q4_1: (4, None)}


@pytest.fixture
def q8():
    previous = kernels.set_activations("q8")
    yield
    kernels.set_activations(previous)


@pytest.fixture(params=["q8", "q16"])
def integer(request: pytest.FixtureRequest):
    """Each integer setting in turn; yields its name."""
    previous = kernels.set_activations(request.param)
    yield request.param
    kernels.set_activations(previous)


def _rounded(xb: np.ndarray, fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Blocks xb [..., blk] rounded to int8 as the kernels do (d = max|x| / 127, q = round-half-even(x *
    127 / max|x|), float32 as they compute them): d * q (float32) and each block's max |x|. With `fixed`
    (q16's second part: the first part's scales d [..., 1]), d / 256 and q = x * (256 / d) clamped to
    -127..127 instead."""
    amax = np.abs(xb).max(-1, keepdims=True)
    if fixed is not None:
        inv = np.where(fixed > 0, np.float32(256) / np.where(fixed > 0, fixed, 1), 0).astype(np.float32)
        q = np.clip(np.rint(xb * inv), -127, 127)
        return (q * (fixed / np.float32(256)).astype(np.float32)).astype(np.float32), amax
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(xb * inv) * (amax / np.float32(127)).astype(np.float32)).astype(np.float32), amax


def q8_reference(
    x: torch.Tensor, dense: torch.Tensor, qtype: QT, bound: bool = False, two: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float64 emulation of the integer kernels: x rounded to int8 in numpy (per 256 for the K-quants, per
    32 for the legacy types) times W, offsets and mins included (they meet the same rounded x); two=True
    ("q16"): plus what the rounding left, rounded at 1/256 of the first part's scale. bound=True also
    returns the most the rounding can move each output from x @ W.T: the most it moves an element
    (q8: half a step, d/2 = max|x| / 254; q16: a step of the second part, d/256 = max|x| / 32512, as a
    remainder at d/2 clamps to 127 steps) times |W|."""
    m, k = x.shape
    xb = x.numpy().reshape(m, -1, 256 if qtype in K_QUANTS else 32)
    rounded, amax = _rounded(xb)
    if two:
        d = (amax / np.float32(127)).astype(np.float32)
        rounded = rounded.astype(np.float64) + _rounded((xb - rounded).astype(np.float32), d)[0]
    xt = torch.from_numpy(rounded.astype(np.float64).reshape(m, k))
    step = torch.from_numpy(np.broadcast_to(amax / (32512 if two else 254), xb.shape).astype(np.float64).reshape(m, k))
    y = xt @ dense.double().T
    return (y, step @ dense.double().abs().T) if bound else y


@needs_ext
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_q8_kernels_match_their_emulation(isa: str, integer: str, qtype: QT) -> None:
    """q8 and q16 (x and what its rounding left at 1/256 of its step, as two int8 rows: 128-256x closer). Every M (the groups of 4 rows, their remainders, and blocks of 32 rows), ragged N: the integer
    kernels equal the emulation to float32 rounding and stay within the rounding bound of the exact
    result (the portable C pass has no integer kernels: it stays exact). One kernel at every M, the
    legacy types' few decode rows included, so that a row's result does not depend on the batch."""
    k = 512
    packed, dense = weight(qtype, 19, k)
    for m in [1, 2, 3, 4, 5, 11, 70]:
        x = activations(m, k, seed=m)
        for n in [1, 3, 7, 19]:  # the legacy kernels take 8 rows at a time
            y = torch.full((m, n), float("nan"))
            ext.matmul(buf(x), buf(packed), buf(y), m, n, k, int(qtype), 2)
            exact = reference(x, dense[:n])
            emulated, bound = q8_reference(x, dense[:n], qtype, bound=True, two=integer == "q16")
            float_kernel = isa == "scalar"
            # float32 rounding scales with the sum of |terms|, not with a result that may cancel (n = 1)
            magnitude = (x.double().abs() @ dense[:n].double().abs().T).max()
            err = (y.double() - (exact if float_kernel else emulated).double()).abs().max()
            assert err <= 1e-5 * magnitude, (isa, m, n)
            assert ((y - exact).abs() <= bound * 1.001 + 1e-5 * exact.abs().max()).all(), (isa, m, n)
    # Through the wrapper past the dense route's M (the passes that have one: AVX2's, the portable C's):
    # the vector passes stay on the integer kernel, whatever the matrix's size, each row's bits those it
    # has alone (AVX2's dense route took small matrices past 64 rows: other bits than below); the
    # portable pass goes through dequantize + sgemm (exact).
    x = activations(100, k)
    emulated = q8_reference(x, dense, qtype, two=integer == "q16")
    want = reference(x, dense) if isa == "scalar" else emulated
    many = kernels.qmatmul(x, packed, int(qtype), k)
    assert rel_err(many, want) < 1e-5
    if isa != "scalar":
        alone = torch.cat([kernels.qmatmul(x[i : i + 1], packed, int(qtype), k) for i in (0, 99)])
        assert torch.equal(many[[0, 99]], alone)


@needs_ext
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("layout", ["ggml", "interleaved"])
def test_q16_rounds_each_activation_as_its_emulation(isa: str, qtype: QT, layout: str) -> None:
    """q16 element by element: one-hot weight rows (the identity, exact in Q4_0 and Q8_0) make each output
    one rounded activation, so the rounding shows bare: the remainder at 1/256 of the first part's step,
    clamped to 127 steps where it is half a step (this x has such remainders), alike in the row kernels
    and the interleaved ones (Q4_0's add the parts as one integer), at M = 1 and among 70 rows. The
    remainder is x - d q with the product rounded first (round_q16's one pass keeps the two-pass
    arithmetic): this x has elements whose second part a fused multiply-subtract would round otherwise."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    k = 64
    raw = np.ascontiguousarray(ref_quantize(np.eye(k, dtype=np.float32), qtype)).view(np.uint8).reshape(k, -1)
    dense = torch.from_numpy(ref_dequantize(raw, qtype).reshape(k, k).astype(np.float32))
    previous = kernels.set_activations("q16")
    try:
        packed, qt = torch.from_numpy(raw.copy()), int(qtype)
        if layout == "interleaved":
            packed, qt = kernels.regroup(packed, qt, k)
            assert kernels.interleaved(qt)
        x = activations(70, k, seed=5)
        xb = x.numpy().reshape(70, -1, 32)
        first, amax = _rounded(xb)
        step = (amax / np.float32(127)).astype(np.float32)
        assert (np.abs(np.rint((xb - first) * (np.float32(256) / step))) > 127).any()  # clamps happen
        q1 = np.rint(xb * (np.float32(127) / amax))
        fused = (xb.astype(np.float64) - step.astype(np.float64) * q1).astype(np.float32)  # x - d q rounded once
        assert (np.rint(fused * (np.float32(256) / step)) != np.rint((xb - first) * (np.float32(256) / step))).any()
        want = q8_reference(x, dense, qtype, two=True)
        scale = torch.from_numpy(np.broadcast_to(amax, xb.shape).reshape(70, k).astype(np.float64))
        for lo, hi in ((0, 70), (0, 1), (33, 34)):
            y = torch.full((hi - lo, k), float("nan"))
            ext.matmul(buf(x[lo:hi].contiguous()), buf(packed), buf(y), hi - lo, k, k, qt, 2)
            assert ((y.double() - want[lo:hi]).abs() <= 1e-6 * scale[lo:hi]).all(), (lo, hi)
    finally:
        kernels.set_activations(previous)


@needs_ext
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_q8_rows_do_not_depend_on_the_batch(isa: str, integer: str, qtype: QT) -> None:
    """A row's result is the same bits alone (M = 1, a decode step of one request), among 2, 3 or 4
    (the register-held decode rows) and among 16 or 70 rows: the served engine batches requests, and an
    answer must not change with the company it keeps."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    k, n = 512, 19
    packed, _ = weight(qtype, n, k)
    x = activations(70, k, seed=3)

    run = partial(raw_rows, packed, n, k, int(qtype))

    alone = torch.cat([run(x[i : i + 1]) for i in range(70)])  # M = 1
    assert torch.equal(run(x), alone)
    assert torch.equal(run(x[:16]), alone[:16])
    for m in (2, 3, 4):
        assert torch.equal(run(x[10 : 10 + m]), alone[10 : 10 + m]), m


@needs_ext
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("layout", ["ggml", "interleaved"])
def test_rows_a_whole_kilobyte_long_are_rounded_apart_and_read_back(
    isa: str, integer: str, qtype: QT, layout: str
) -> None:
    """At K a multiple of 1024 the rounded activation rows lie K + 64 bytes apart (matmul.c's q8_stride:
    rows K apart would share the L1's sets): every kernel, row by row, in register-held groups, in blocks
    of rows and one row streamed, reads each row where the rounding wrote it. Results equal the rounding's
    emulation to float32 rounding, and a row's bits do not depend on its batch."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    k, n = 1024, 40
    packed, dense = weight(qtype, n, k)
    qt = int(qtype)
    if layout == "interleaved":
        if qt not in kernels.INTERLEAVED:
            pytest.skip(f"{qtype.name} has no interleaved layout")
        packed, qt = kernels.regroup(packed, qt, k)
        assert kernels.interleaved(qt)
    x = activations(37, k, seed=11)

    run = partial(raw_rows, packed, n, k, qt)

    batch = run(x)
    emulated = q8_reference(x, dense, qtype, two=integer == "q16")
    magnitude = (x.double().abs() @ dense.double().abs().T).max()
    assert (batch.double() - emulated).abs().max() <= 1e-5 * magnitude
    assert torch.equal(torch.cat([run(x[i : i + 1]) for i in range(0, 37, 6)]), batch[::6])
    assert torch.equal(run(x[3:6]), batch[3:6])


@needs_ext
@pytest.mark.parametrize("integer", ["q16"], indirect=True)
def test_q4_k_pairs_met_as_one_integer_hold_their_largest_sums(isa: str, integer: str) -> None:
    """Under q16 the interleaved Q4_K kernels meet a pair's two int8 rows as one integer, 256 times the
    first's sums plus the second's, per two sub-blocks (simd_q8.inc's k4r8_pair_dot): with every quant 15,
    every scale 63 and each block's x at 126.5 steps of its first part (so both parts near 127), those
    reach 0.91 of 2^31. Every path (one row streamed, the groups left over, two groups in 16 lanes)
    equals the float64 emulation, with both signs."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    k, n = 512, 40
    block = np.full(144, 0xFF, dtype=np.uint8)  # scales, mins and quants at their largest
    block[0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)  # d
    block[2:4] = np.array([0.25], dtype=np.float16).view(np.uint8)  # dmin
    raw = np.tile(block, (n, k // 256))
    dense = torch.from_numpy(ref_dequantize(raw, QT.Q4_K).reshape(n, k).astype(np.float32))
    packed, qt = kernels.regroup(torch.from_numpy(raw), int(QT.Q4_K), k)
    assert kernels.interleaved(qt)
    x = torch.full((5, k), 126.498 / 127)
    x[:, ::256] = 1.0  # each block's largest: the first part's 127
    x[1::2] = -x[1::2]

    run = partial(raw_rows, packed, n, k, qt)

    emulated = q8_reference(x, dense, QT.Q4_K, two=True)
    magnitude = (x.double().abs() @ dense.double().abs().T).max()
    for rows in (slice(0, 1), slice(1, 2), slice(0, 5)):
        assert (run(x[rows]).double() - emulated[rows]).abs().max() <= 1e-6 * magnitude, rows


@needs_ext
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q3_K, QT.Q4_0], ids=lambda t: t.name)
def test_interleaved_rows_walked_in_streams_are_those_of_a_batch(isa: str, integer: str, qtype: QT) -> None:
    """One activation row (decoding) walks an interleaved matrix four groups of 8 rows at a time, each its
    own stream (r8_one_row, the K-quants' NAME_one_row), the groups left over one by one: every output row
    has the bits a batch of rows gives it (88 rows: 8 groups streamed, 3 left over), and is near W x."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    n, k = 88, 512
    packed, dense = weight(qtype, n, k)
    packed, qt = kernels.regroup(packed, int(qtype), k)
    assert kernels.interleaved(qt)
    x = activations(16, k, seed=5)

    run = partial(raw_rows, packed, n, k, qt)

    batch = run(x)
    assert torch.equal(torch.cat([run(x[i : i + 1]) for i in range(16)]), batch)
    assert rel_err(batch, x.double() @ dense.double().T) < 2e-2


@needs_ext
@pytest.mark.parametrize("interleave", [False, True], ids=["rows", "interleaved"])
def test_large_matrices_give_the_same_bits_taken_in_chunks(isa: str, integer: str, interleave: bool) -> None:
    """Past 4 MiB of weights at one to four activation rows (a decoding step's head, a 7B model's
    matrices), the threads take the output rows in chunks as they free up (matmul.c): every row's bits
    are still those one thread computes, and those of the chunks from both ends that more rows take."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    n, k = 4096, 1024  # Q8_0: 4.25 MiB
    packed, _ = weight(QT.Q8_0, n, k)
    qt = int(QT.Q8_0)
    if interleave:
        packed, qt = kernels.regroup(packed, qt, k)
        assert kernels.interleaved(qt)
    x = activations(6, k, seed=7)

    run = partial(raw_rows, packed, n, k, qt)

    halves = run(x, 2)  # six rows: two threads meet from both ends of the output rows
    assert not halves.isnan().any()
    for m in (1, 2, 4):
        for threads in (1, 2, 3):
            assert torch.equal(run(x[:m], threads), halves[:m]), (m, threads)


@needs_ext
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_two_threads_meeting_from_both_ends_give_the_bits_of_one(isa: str, integer: str, qtype: QT) -> None:
    """Past four activation rows, two threads take chunks of the output rows from both ends of the
    matrix until they meet (matmul.c's end_chunk): each row's bits are those one thread computes, for
    any count of rows and however the chunks fall (37 groups of 8 rows in chunks of 4: 10 chunks, the
    last of one group), whether the first or the second thread takes the middle ones."""
    if isa == "scalar":
        pytest.skip("the portable pass has no integer kernels")
    n, k = 8 * 37, 512
    packed, dense = weight(qtype, n, k)
    packed, qt = kernels.regroup(packed, int(qtype), k)
    x = activations(63, k, seed=11)
    run = partial(raw_rows, packed, n, k, qt)
    for m in (5, 16, 63):
        one = run(x[:m], 1)
        assert rel_err(one, reference(x[:m], dense)) < 2e-2
        for _ in range(3):  # the threads' meeting point moves from call to call
            assert torch.equal(run(x[:m], 2), one), m


@needs_ext
@pytest.mark.parametrize("qtype", Q8_TYPES, ids=lambda t: t.name)
def test_integer_kernels_give_the_same_bits_on_every_isa(integer: str, qtype: QT) -> None:
    """The AVX-512 pass sums the integer products with VNNI (vpdpbusd, vpdpwssd), the AVX2 pass with
    maddubs and madd: the same integers, so the same bits, plain rows and interleaved, at the decode
    step's few rows and at a batch's many."""
    vector = [isa for isa in ext.isas() if isa != "scalar"]
    if len(vector) < 2:
        pytest.skip("one vector pass on this CPU: nothing to compare")
    k, n = 512, 24
    packed, _ = weight(qtype, n, k)
    layouts = [(packed, int(qtype))]
    if int(qtype) in kernels.INTERLEAVED:
        layouts.append(kernels.regroup(packed, int(qtype), k))
    x = activations(70, k, seed=11)
    for w, qt in layouts:
        for m in (1, 2, 3, 16, 70):
            results = []
            for isa in vector:
                previous = ext.set_isa(isa)
                try:
                    y = torch.full((m, n), float("nan"))
                    ext.matmul(buf(x[:m].contiguous()), buf(w), buf(y), m, n, k, qt, 2)
                finally:
                    ext.set_isa(previous)
                results.append(y)
            assert not results[0].isnan().any()
            for isa, y in zip(vector[1:], results[1:]):
                assert torch.equal(y, results[0]), (qt, m, isa)


@needs_ext
def test_bf16_rows_take_the_bf16_gemm_from_16_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the CPU multiplies bfloat16 natively, bfloat16 rows against 16 activation rows or more go
    through torch's bfloat16 GEMM: x rounded to bfloat16 and the result too, as transformers' bf16 models
    compute, within 2^-8 of sum |x| |w| of the exact product; below 16 rows, and under the exact setting
    at any M, the float32 kernels (float32 rounding). Forced on here, the tiles off (as on a CPU with
    AVX512-BF16 but no AMX): torch's bfloat16 matmul runs on any CPU, only slower."""
    monkeypatch.setattr(kernels, "_native_bf16", lambda: True)
    monkeypatch.setattr(kernels, "tiles_from", lambda: 0)
    k, n = 256, 40
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    packed = w.view(torch.uint8)  # [n, 2k]: GGUF's BF16 rows
    for activations, m in (("q16", 1), ("q16", 15), ("q16", 16), ("q16", 40), ("f32", 40)):
        previous = kernels.set_activations(activations)
        try:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = kernels.qmatmul(x, packed, kernels.BF16, k)
        finally:
            kernels.set_activations(previous)
        exact = x.double() @ w.double().T
        scale = x.double().abs() @ w.double().abs().T
        err = (y.double() - exact).abs()
        if activations != "f32" and m >= kernels.BF16_GEMM_FROM_M:
            assert torch.equal(y, F.linear(x.bfloat16(), w).float()), m
            assert (err <= scale * 2.0**-8).all() and (err > scale * 1e-5).any(), m
        else:
            assert (err <= scale * 1e-5).all(), (activations, m)


@needs_ext
@pytest.mark.parametrize(("k", "n"), [(576, 24), (24, 960), (8, 64)])
def test_float32_rows_do_not_depend_on_the_batch(isa: str, k: int, n: int) -> None:
    """The F32 products of LoRA adapters in the compiled step (A: [r, in], B: [out, r] with K = r
    small): a row's bits are the same alone as among 4 or 70, so an adapter's answer does not depend on
    how many requests share its slot in a step."""
    w, x = torch.randn(n, k, generator=torch.Generator().manual_seed(k)), activations(70, k, seed=n)
    packed = w.view(torch.uint8).reshape(n, -1).contiguous()

    run = partial(raw_rows, packed, n, k, 0)

    alone = torch.cat([run(x[i : i + 1]) for i in range(70)])
    assert torch.equal(run(x), alone) and torch.equal(run(x[:4]), alone[:4])
    assert (alone - x @ w.T).abs().max() <= 1e-5 * (x.abs() @ w.abs().T).max()


@needs_ext
@pytest.mark.parametrize("qtype", [t for t in ALL if t not in Q8_TYPES], ids=lambda t: t.name)
def test_q8_setting_leaves_other_types_exact(q8: None, qtype: QT) -> None:
    n, k = SHAPES[qtype in K_QUANTS][0]
    packed, dense = weight(qtype, n, k)
    x = activations(1, k)
    assert rel_err(kernels.qmatmul(x, packed, int(qtype), k), reference(x, dense)) < 1e-4


@needs_ext
def test_q8_scales_of_an_all_zero_block_and_extreme_rows(q8: None) -> None:
    """A block of zeros rounds to q = 0 with d = 0 (no division by zero); large activations keep their
    relative error."""
    packed, dense = weight(QT.Q4_K, 5, 512)
    x = activations(2, 512)
    x[0, :256] = 0.0
    x[1] *= 1e4
    y = kernels.qmatmul(x, packed, int(QT.Q4_K), 512)
    assert torch.isfinite(y).all() and rel_err(y, q8_reference(x, dense, QT.Q4_K)) < 1e-5


def test_activations_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """q16 in a fresh process without TRAMONTANE_ACTIVATIONS; the variable chooses (this suite runs
    with f32 through it); a wrong value names the variable."""
    import os
    import subprocess
    import sys

    code = "from tramontane.quant import kernels; print(kernels.activations())"
    base = {k: v for k, v in os.environ.items() if k != "TRAMONTANE_ACTIVATIONS"}
    fresh = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True)
    assert fresh.stdout.strip() == ("q16" if kernels.available() else "f32"), fresh.stderr
    assert kernels.activations() == "f32"  # conftest's TRAMONTANE_ACTIVATIONS=f32, read at import
    monkeypatch.setenv("TRAMONTANE_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="TRAMONTANE_ACTIVATIONS must be one of q8, q16, f32, not 'int4'"):
        kernels._activations_from_env()
    with pytest.raises(ValueError, match="activations must be one of"):
        kernels.set_activations("f16")


@needs_ext
def test_exact_flag_sets_float_activations(q8: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from tramontane.cli.main import _apply_exact, build_parser

    monkeypatch.delenv("TRAMONTANE_ACTIVATIONS")
    _apply_exact(build_parser().parse_args(["run"]))
    assert kernels.activations() == "q8"  # no flag: the default stays
    _apply_exact(build_parser().parse_args(["chat", "--activations", "q16"]))
    assert kernels.activations() == "q16" and os.environ["TRAMONTANE_ACTIVATIONS"] == "q16"
    _apply_exact(build_parser().parse_args(["serve", "--exact"]))
    assert kernels.activations() == "f32"
    assert os.environ["TRAMONTANE_ACTIVATIONS"] == "f32"  # for the processes it starts


# ---- Q4_0 interleaved (kernels.regroup: the layout its integer kernel reads, csrc/blocks.h) ----


@needs_ext
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda t: t.name)
def test_interleaved_layout_by_hand(qtype: QT) -> None:
    """8 rows of 2 blocks whose bytes say where they came from: row r's block i has header bytes (scale,
    and Q4_1's min) h + 32 (2r + i) and quant byte l = 32 (2r + i) + l (mod 256). Interleaved, block i is
    the 8 rows' scales (Q4_1: then their mins), then for c = 0, 1, ... (4 loads of Q4's 16 quant bytes, 8
    of Q8_0's 32) quant bytes 4c..4c+3 of row 0, of row 1, ..., row 7; and back."""
    head = 4 if qtype == QT.Q4_1 else 2
    quants = 32 if qtype == QT.Q8_0 else 16
    plain = np.zeros((8, 2, head + quants), dtype=np.uint8)
    for r in range(8):
        for i in range(2):
            plain[r, i, :head] = (32 * (2 * r + i) + np.arange(head)) % 256
            plain[r, i, head:] = (32 * (2 * r + i) + np.arange(quants)) % 256
    src = torch.from_numpy(plain.reshape(8, -1))
    out = torch.empty_like(src)
    ext.interleave(buf(src), buf(out), 8, 64, int(qtype), True)
    want = []
    for i in range(2):
        for h in range(0, head, 2):
            want += [(32 * (2 * r + i) + h + j) % 256 for r in range(8) for j in range(2)]
        loads = range(quants // 4)
        want += [(32 * (2 * r + i) + 4 * c + j) % 256 for c in loads for r in range(8) for j in range(4)]
    assert out.flatten().tolist() == want
    back = torch.empty_like(src)
    ext.interleave(buf(out), buf(back), 8, 64, int(qtype), False)
    assert torch.equal(back, src)
    with pytest.raises(ValueError, match="groups of 8"):
        ext.interleave(buf(src[:7]), buf(out[:7]), 7, 64, int(qtype), True)
    with pytest.raises(ValueError, match="overlap"):
        ext.interleave(buf(src), buf(src), 8, 64, int(qtype), True)
    with pytest.raises(ValueError, match="no interleaved layout"):
        ext.interleave(buf(src), buf(out), 8, 64, int(QT.Q2_K), True)


def r8_weight(qtype: QT, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(interleaved rows, reference float32 [n, k]) of weight(qtype, n, k)."""
    packed, dense = weight(qtype, n, k)
    rows = torch.empty_like(packed)
    ext.interleave(buf(packed), buf(rows), n, k, int(qtype), True)
    return rows, dense


def k4_fields(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 over [..., 12] scale bytes: (scales, mins) [..., 8] (six bits each)."""
    s = scales.astype(np.int64)
    sc, mn = np.empty(s.shape[:-1] + (8,), np.int64), np.empty(s.shape[:-1] + (8,), np.int64)
    sc[..., :4], mn[..., :4] = s[..., :4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:] & 15) | ((s[..., :4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def interleaved_by_hand(qtype: QT, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8 random rows of 2 (super-)blocks of `qtype` (plain [8, 2, block bytes]) and their interleaved bytes
    ([2, 8 x block bytes], one group per block); checks that the way back gives them bit for bit."""
    size, k = GGML_TYPES[int(qtype)].type_size, 2 * GGML_TYPES[int(qtype)].block_size
    plain = np.random.default_rng(seed).integers(0, 256, (8, 2, size), dtype=np.uint8)
    src = torch.from_numpy(plain.reshape(8, -1).copy())
    out, back = torch.empty_like(src), torch.empty_like(src)
    ext.interleave(buf(src), buf(out), 8, k, int(qtype), True)
    ext.interleave(buf(out), buf(back), 8, k, int(qtype), False)
    assert torch.equal(back, src)
    return plain, out.numpy().reshape(2, 8 * size)


@needs_ext
@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
def test_interleaved_q5_layout_by_hand(qtype: QT) -> None:
    """8 random Q5_0 (Q5_1) rows of 2 blocks, interleaved: per block the 8 rows' d (Q5_1: then their m),
    their fifth bits (row r's at bytes 4r..4r+3: bit c of byte k is the fifth bit of element 4c + k, bit
    4 + c that of element 16 + 4c + k; GGML's qh holds element j's at bit j), then for c = 0..3 quant
    bytes 4c..4c+3 of rows 0..7; and back, bit for bit."""
    plain, got = interleaved_by_hand(qtype, 6)
    head = 4 if qtype == QT.Q5_1 else 2
    for i in range(2):
        block = plain[:, i]
        fields = [block[:, h : h + 2].reshape(-1) for h in range(0, head, 2)]
        fifth = np.zeros((8, 4), np.uint8)
        for r in range(8):
            qh = int.from_bytes(block[r, head : head + 4].tobytes(), "little")
            for k in range(4):
                for c in range(4):
                    fifth[r, k] |= ((qh >> (4 * c + k)) & 1) << c | ((qh >> (16 + 4 * c + k)) & 1) << (4 + c)
        quants = block[:, head + 4 :].reshape(8, 4, 4).transpose(1, 0, 2).reshape(-1)
        assert np.array_equal(got[i], np.concatenate([*fields, fifth.reshape(-1), quants])), i


@needs_ext
def test_interleaved_q4_k_layout_by_hand() -> None:
    """8 random Q4_K rows of 2 super-blocks, interleaved: per super-block the 8 rows' d, then their dmin
    (float16 each), the scales then the mins as 48-byte regions (byte j = 16 L + k, k = 4 (s % 4) + r % 4,
    L = r // 4, holds row r's sub-block s in its low nibble when s < 4, high nibble when s >= 4; byte 32 +
    k holds the top two bits of (s < 4, L = 0), (s < 4, L = 1), (s >= 4, L = 0), (s >= 4, L = 1) at bits
    0, 2, 4, 6), then for c = 0..31 quant bytes 4c..4c+3 of rows 0..7; and back, bit for bit."""
    plain, got = interleaved_by_hand(QT.Q4_K, 3)
    for i in range(2):
        block = plain[:, i]
        want = [block[:, 0:2].reshape(-1), block[:, 2:4].reshape(-1)]
        for values in k4_fields(block[:, 4:16]):  # [8 rows, 8 sub-blocks]
            region = np.zeros(48, np.int64)
            for r in range(8):
                for sub in range(8):
                    v, b, k = values[r, sub], sub // 4, 4 * (sub % 4) + r % 4
                    region[16 * (r // 4) + k] |= (v & 15) << (4 * b)
                    region[32 + k] |= (v >> 4) << (2 * (r // 4) + 4 * b)
            want.append(region.astype(np.uint8))
        want.append(block[:, 16:].reshape(8, 32, 4).transpose(1, 0, 2).reshape(-1))
        assert np.array_equal(got[i], np.concatenate(want)), i


@needs_ext
def test_interleaved_q6_k_layout_by_hand() -> None:
    """8 random Q6_K rows of 2 super-blocks, interleaved: per super-block the 8 rows' d (float16), their
    int8 scales as 4 vectors of 32 bytes (row r's scale of sub-block s at byte 32 (s // 4) + 16 (r // 4)
    + 4 (s % 4) + r % 4), then for c = 0..47 bytes 4c..4c+3 of each row's ql (c < 32) and qh, rows 0..7;
    and back, bit for bit."""
    plain, got = interleaved_by_hand(QT.Q6_K, 4)
    for i in range(2):
        block = plain[:, i]
        scales = np.zeros(128, np.uint8)
        for r in range(8):
            for sub in range(16):
                scales[32 * (sub // 4) + 16 * (r // 4) + 4 * (sub % 4) + r % 4] = block[r, 192 + sub]
        quants = block[:, :192].reshape(8, 48, 4).transpose(1, 0, 2).reshape(-1)
        assert np.array_equal(got[i], np.concatenate([block[:, 208:210].reshape(-1), scales, quants])), i


@needs_ext
def test_interleaved_q3_k_layout_by_hand() -> None:
    """8 random Q3_K rows of 2 super-blocks, interleaved: per super-block the 8 rows' d (float16), their
    six-bit scale fields (ggml's: field s has its low nibble at nibble s // 8 of byte s % 8, its top bits
    at bits 2 (s // 4) of byte 8 + s % 4) as 4 vectors V_t, row r's field of sub-block s at byte 16 (r //
    4) + 4 (s % 4) + r % 4 of V_(s // 4), stored as V0 | V1 << 4, V2 | V3 << 4 (low nibbles) and the top
    two bits of V0..V3 at bits 0, 2, 4, 6; then for c = 0..23 bytes 4c..4c+3 of each row's hmask and qs,
    rows 0..7; and back, bit for bit."""
    plain, got = interleaved_by_hand(QT.Q3_K, 5)
    for i in range(2):
        block = plain[:, i].astype(np.int64)
        sc = block[:, 96:108]
        v = np.zeros((4, 32), np.int64)
        for r in range(8):
            for sub in range(16):
                field = ((sc[r, sub % 8] >> (4 * (sub // 8))) & 15) | (
                    ((sc[r, 8 + sub % 4] >> (2 * (sub // 4))) & 3) << 4
                )
                v[sub // 4, 16 * (r // 4) + 4 * (sub % 4) + r % 4] = field
        low = [(v[0] & 15) | ((v[1] & 15) << 4), (v[2] & 15) | ((v[3] & 15) << 4)]
        top = sum((v[t] >> 4) << (2 * t) for t in range(4))
        quants = block[:, :96].reshape(8, 24, 4).transpose(1, 0, 2).reshape(-1)
        want = np.concatenate([block[:, 108:110].reshape(-1), *low, top, quants]).astype(np.uint8)
        assert np.array_equal(got[i], want), i


@needs_ext
@pytest.mark.parametrize(
    ("qtype", "k"),
    [
        (QT.Q4_0, 576),
        (QT.Q4_0, 512),
        (QT.Q4_1, 576),
        (QT.Q4_1, 512),
        (QT.Q4_1, 544),  # 17 blocks: the tiles' last phase of blocks a short one
        (QT.Q4_K, 512),
        (QT.Q4_K, 768),
        (QT.Q6_K, 512),
        (QT.Q6_K, 768),
        (QT.Q3_K, 512),
        (QT.Q3_K, 768),
        (QT.Q8_0, 576),
        (QT.Q8_0, 512),
        (QT.Q5_0, 576),
        (QT.Q5_0, 512),
        (QT.Q5_1, 576),
        (QT.Q5_1, 512),
        (QT.Q8_0, 96),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_interleaved_computes_as_ggml_layout(isa: str, integer: str, qtype: QT, k: int) -> None:
    """Decoded, the interleaved rows are gguf's values exactly; multiplied, they meet x rounded to int8 per
    32 (Q4_K: per 256; q16: twice, x and what that left, the kernels summing each pair of rows) as the
    type's own kernel does (the float64 emulation, to float32 rounding) on the vector passes,
    and exactly on the portable one (no integer kernel: through GGML's layout), at every M and for 1 to
    3 groups of rows; a row's bits do not depend on the batch (alone, among 2 to 16, among 70); rows come
    in groups of 8."""
    r8, two = kernels.INTERLEAVED[int(qtype)], integer == "q16"
    rows, dense = r8_weight(qtype, 136, k)
    assert torch.equal(kernels.dequantize_packed(rows, r8, k), dense)
    x = activations(70, k, seed=7)
    for m in [1, 2, 3, 4, 5, 11, 70]:
        # 72 and 136 rows: at one activation row, 4 streams of groups per thread and groups left over
        for n in [8, 16, 24] + ([72, 136] if m == 1 else []):
            y = torch.full((m, n), float("nan"))
            ext.matmul(buf(x[:m]), buf(rows[:n]), buf(y), m, n, k, r8, 2)
            want = reference(x[:m], dense[:n]) if isa == "scalar" else q8_reference(x[:m], dense[:n], qtype, two=two)
            magnitude = (x[:m].double().abs() @ dense[:n].double().abs().T).max()
            assert (y.double() - want.double()).abs().max() <= 1e-5 * magnitude, (m, n)
    y = torch.empty(70, 136)
    ext.matmul(buf(x), buf(rows), buf(y), 70, 136, k, r8, 2)
    for i in (0, 33, 69):
        alone = torch.empty(1, 136)
        ext.matmul(buf(x[i : i + 1].contiguous()), buf(rows), buf(alone), 1, 136, k, r8, 2)
        assert torch.equal(alone[0], y[i]), i
    for m in (2, 3, 4, 16):  # the kernels' one-pass and two-pass batches (q16) alike
        some = torch.empty(m, 136)
        ext.matmul(buf(x[30 : 30 + m].contiguous()), buf(rows), buf(some), m, 136, k, r8, 2)
        assert torch.equal(some, y[30 : 30 + m]), m
    with pytest.raises(ValueError, match="groups of 8"):
        ext.matmul(buf(x[:1]), buf(rows[:12]), buf(y), 1, 12, k, r8, 2)
    # Through the wrapper past the dense route's M: the integer kernel still (no dequantized copy).
    want = reference(x, dense) if isa == "scalar" else q8_reference(x, dense, qtype, two=two)
    assert rel_err(kernels.qmatmul(x, rows, r8, k), want) < 1e-5
    kernels.set_activations("f32")  # the exact setting: through GGML's layout (the fixture restores)
    assert rel_err(kernels.qmatmul(x[:3], rows, r8, k), reference(x[:3], dense)) < 1e-5


@needs_ext
def test_regroup_applies_where_the_integer_kernel_runs(q8: None) -> None:
    packed, _ = weight(QT.Q4_0, 96, 576)
    rows, qtype = kernels.regroup(packed, int(QT.Q4_0), 576)
    assert qtype == kernels.Q4_0_R8 and rows.data_ptr() != packed.data_ptr()
    assert kernels.ggml_blocks(rows, qtype, 576)[1] == int(QT.Q4_0)
    assert torch.equal(kernels.ggml_blocks(rows, qtype, 576)[0], packed)
    part = packed[:12]  # not whole groups of 8 rows
    assert kernels.regroup(part, int(QT.Q4_0), 576)[0] is part
    interleaved = {QT.Q4_1: kernels.Q4_1_R8, QT.Q4_K: kernels.Q4_K_R8, QT.Q6_K: kernels.Q6_K_R8}
    interleaved |= {QT.Q3_K: kernels.Q3_K_R8, QT.Q8_0: kernels.Q8_0_R8, QT.Q5_0: kernels.Q5_0_R8}
    for base, r8 in (interleaved | {QT.Q5_1: kernels.Q5_1_R8}).items():
        assert kernels.regroup(weight(base, 96, 256)[0], int(base), 256)[1] == r8, base.name
    q5_k, _ = weight(QT.Q5_K, 96, 256)
    assert kernels.regroup(q5_k, int(QT.Q5_K), 256)[0] is q5_k
    kernels.set_activations("f32")  # the exact setting keeps GGML's layout (the q8 fixture restores)
    assert kernels.regroup(packed, int(QT.Q4_0), 576)[0] is packed


@needs_ext
def test_interleaved_projections_split_by_groups(q8: None) -> None:
    """LoRA splits fused projections back into parts: views of the interleaved rows where every part is
    whole groups of 8 rows, GGML's layout (copies) where one is not; the parts compute the same."""
    from tramontane.quant.linear import PackedLinear

    packed, dense = weight(QT.Q4_0, 24, 576)
    rows, qtype = kernels.regroup(packed, int(QT.Q4_0), 576)
    x = activations(2, 576)
    fused = PackedLinear(rows, qtype, 576)
    for sizes, kept in (([16, 8], True), ([12, 8, 4], False)):
        parts = fused.split(sizes)
        assert all((p.qtype == kernels.Q4_0_R8) == kept for p in parts)
        assert kept == (parts[0].packed.data_ptr() == rows.data_ptr())
        got = torch.cat([p(x) for p in parts], dim=1)
        assert (got - fused(x)).abs().max() <= 1e-5 * (x.abs() @ dense.abs().T).max()


@needs_ext
@pytest.mark.parametrize(
    "qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.Q3_K], ids=lambda t: t.name
)
def test_lookup_rows_gathers_rows(isa: str, q8: None, qtype: QT) -> None:
    """An embedding lookup: rows in any order, repeated, of GGML's layout or gathered out of interleaved
    groups, equal gguf's decoding of those rows; an index out of range is refused before any is read."""
    k = 256
    packed, dense = weight(qtype, 24, k)
    rows, held = kernels.regroup(packed, int(qtype), k)
    assert held == (int(qtype) if isa == "scalar" else kernels.INTERLEAVED.get(int(qtype), int(qtype)))
    idx = torch.tensor([23, 0, 9, 9, 16, 7])
    assert torch.equal(kernels.lookup_rows(rows, idx, held, k), dense[idx])
    assert kernels.lookup_rows(rows, idx[:0], held, k).shape == (0, k)
    with pytest.raises(IndexError, match=r"row 24 is out of range \[0, 24\)"):
        kernels.lookup_rows(rows, torch.tensor([3, 24]), held, k)
    with pytest.raises(IndexError, match="row -1"):
        kernels.lookup_rows(rows, torch.tensor([-1]), held, k)


def test_a_built_extension_that_does_not_load_is_reported(tmp_path):
    """A stale build (here: an unresolved symbol) used to leave the PyTorch fallback running, 10x slower,
    without a word; now a warning names the problem. A missing build stays silent: it is optional."""
    import subprocess
    import sys

    probe = (
        "import importlib, sys\n"
        "real = importlib.import_module\n"
        "def fake(name, package=None):\n"
        "    if name == '._kernels':\n"
        "        raise {error}\n"
        "    return real(name, package)\n"
        "importlib.import_module = fake\n"
        "from tramontane.quant import kernels\n"
        "print(kernels.available())\n"
    )
    cases = {
        "ImportError('_kernels.so: undefined symbol: g_prof')": True,
        "ModuleNotFoundError('no module', name='tramontane.quant._kernels')": False,
    }
    for error, warned in cases.items():
        out = subprocess.run([sys.executable, "-c", probe.format(error=error)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
        assert ("do not load (_kernels.so: undefined symbol: g_prof)" in out.stderr) == warned, out.stderr


def _tiles_here() -> int:
    """tiles_from() under the default activations (the tests' own default is the exact setting)."""
    if ext is None:
        return 0
    previous = ext.set_activations("q16")
    try:
        return ext.tiles_from()
    finally:
        ext.set_activations(previous)


needs_tiles = pytest.mark.skipif(not _tiles_here(), reason="no AMX-BF16 tiles here (or not granted)")


@pytest.fixture
def q16() -> Iterator[None]:
    previous = kernels.set_activations("q16")
    yield
    kernels.set_activations(previous)


@needs_tiles
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_tiles_multiply_bfloat16_roundings_in_float32(q16: None, qtype: QT) -> None:
    """matmul's tiles (prompt chunks on AMX-BF16): x and every weight rounded to bfloat16 as torch rounds
    them, the products summed in float32: within 1e-5 of sum |x| |w| of the float64 product of those
    roundings, for every packed type, plain and interleaved, 32 rows to a panel and the edges (47 columns
    of 48, rows past a tile of 32); each row's bits the same alone as among 70."""
    for n, k in ((48, 256), (1536, 576) if qtype not in K_QUANTS else (1536, 768)):
        packed, _ = weight(qtype, n, k)
        layouts = [(packed, int(qtype))]
        if int(qtype) in kernels.INTERLEAVED:
            layouts.append(kernels.regroup(packed, int(qtype), k))
        dense = kernels.dequantize_packed(packed, int(qtype), k)
        x = activations(70, k, seed=3)
        want = x.bfloat16().double() @ dense.bfloat16().double().T
        scale = x.bfloat16().double().abs() @ dense.bfloat16().double().abs().T
        for w, qt in layouts:
            assert ext.tiles_ok(n, k, qt)
            y = torch.full((70, n), float("nan"))
            ext.matmul(buf(x), buf(w), buf(y), 70, n, k, qt, 2, True)
            assert ((y.double() - want).abs() <= 1e-5 * scale).all(), (qt, n)
            for m in (1, 33):
                alone = torch.full((m, n), float("nan"))
                ext.matmul(buf(x[-m:].contiguous()), buf(w), buf(alone), m, n, k, qt, 1, True)
                assert torch.equal(alone, y[-m:]), (qt, n, m)


@needs_tiles
def test_tiles_take_prompt_runs_only(q16: None) -> None:
    """The module path's rule (kernels.tiles_from): a sequence of tiles_from() tokens or more in one call
    takes the tiles, fewer and a 2-D batch of rows (decoding rows, each its own) keep the integer
    kernels, and the exact setting never takes them."""
    k, n, first = 256, 64, ext.tiles_from()
    packed, dense = weight(QT.Q4_0, n, k)
    w, qt = kernels.regroup(packed, int(QT.Q4_0), k)
    x = activations(first, k, seed=4)
    tiles = torch.empty(first, n)
    ext.matmul(buf(x), buf(w), buf(tiles), first, n, k, qt, 2, True)
    integer = torch.empty(first, n)
    ext.matmul(buf(x), buf(w), buf(integer), first, n, k, qt, 2, False)
    assert not torch.equal(tiles, integer)
    assert torch.equal(kernels.qmatmul(x[None], w, qt, k)[0], tiles)  # one sequence of `first` tokens
    assert torch.equal(kernels.qmatmul(x, w, qt, k), integer)  # 2-D: rows of their own
    assert torch.equal(kernels.qmatmul(x[None, :-1], w, qt, k)[0], integer[:-1])  # one token short
    previous = kernels.set_activations("f32")
    try:
        assert ext.tiles_from() == 0
        exact = kernels.qmatmul(x[None], w, qt, k)[0]
    finally:
        kernels.set_activations(previous)
    assert (exact.double() - x.double() @ dense.double().T).abs().max() <= 1e-4 * exact.abs().max()


@needs_ext
def test_argmax_rows_is_numpy_s(isa: str) -> None:
    """argmax_rows (rows.c over the pass's argmax) against numpy's argmax: the first of equal maxima,
    the first NaN, infinities, -0.0 beside 0.0, rows shorter than a vector and with a ragged tail, one
    thread and two."""
    rng = np.random.default_rng(11)
    for trial in range(120):
        m, n = int(rng.integers(1, 9)), int(rng.integers(1, 100))
        x = rng.standard_normal((m, n)).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x).astype(np.float32)
        if trial % 4 == 0:
            x[rng.integers(m), rng.integers(n)] = np.inf
        if trial % 5 == 0:
            for _ in range(3):
                x[rng.integers(m), rng.integers(n)] = np.nan
        if trial % 7 == 0:
            x[:] = -0.0
            x[:, -1] = 0.0
        t = torch.from_numpy(x)
        for threads in (1, 2):
            out = torch.full((m,), -1, dtype=torch.int64)
            ext.argmax_rows(buf(t), buf(out), m, n, threads)
            assert out.tolist() == x.argmax(axis=-1).tolist(), (trial, threads)
    with pytest.raises(ValueError, match="argmax_rows: buffer x holds"):
        ext.argmax_rows(buf(t), buf(out), m + 1, n, 1)


@needs_ext
def test_a_q8_0_block_s_infinite_scale_reads_alike_at_any_batch(isa: str, integer: str) -> None:
    """An interleaved Q8_0 matrix whose one block has an infinite (corrupt) scale: each row's outputs,
    NaN, infinite or finite, are the same bits alone (the one-row kernel), among 2 (the vector kernel)
    and among 16 (the AMX tiles where the CPU has them): the closes of every path treat Q8_0's absent
    min alike (a path still adding the min term's 0 x (-8 d) made its whole column NaN, the others +-inf)."""
    k, n = 64, 16
    packed, _ = weight(QT.Q8_0, n, k)
    raw = packed.numpy().view(np.uint8).reshape(n, -1)
    raw[5, 34:36] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)  # row 5's second block: d = inf
    rows = torch.empty_like(packed)
    ext.interleave(buf(packed), buf(rows), n, k, int(QT.Q8_0), True)
    r8 = kernels.INTERLEAVED[int(QT.Q8_0)]
    x = activations(16, k, seed=3)
    x[4, 32:] = 0.0  # row 4 meets the block with zeros: inf x 0
    y = torch.empty(16, n)
    ext.matmul(buf(x), buf(rows), buf(y), 16, n, k, r8, 2)
    assert not torch.isfinite(y[4, 5]) and (isa == "scalar" or torch.isinf(y[:, 5]).any())  # (scalar: float path)
    for m0, m in ((0, 1), (4, 1), (7, 1), (2, 2)):
        some = torch.empty(m, n)
        ext.matmul(buf(x[m0 : m0 + m].contiguous()), buf(rows), buf(some), m, n, k, r8, 2)
        assert some.numpy().tobytes() == y[m0 : m0 + m].numpy().tobytes(), (m0, m)
