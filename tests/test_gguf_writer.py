"""GGUF written from a built model reads back to the same model (ours and the gguf package's reader)."""

from __future__ import annotations

import gguf
import pytest
import torch
from models import hf_model, save_gguf, save_hf

from tramontane.build.load import load_model
from tramontane.weights.gguf_writer import write_gguf

TOKENS = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


@pytest.mark.parametrize("kind", ["mistral", "mixtral", "llama"])
def test_float_model_round_trip(tmp_path, kind):
    source = load_model(save_hf(hf_model(kind, seed=7), tmp_path / "hf", shard=None))
    path = write_gguf(source.model, tmp_path / "out.gguf")
    back = load_model(path)
    assert back.config.norm_eps == pytest.approx(source.config.norm_eps, rel=1e-7)  # stored as float32
    assert back.config.with_(architecture=source.config.architecture, norm_eps=source.config.norm_eps) == source.config
    assert (logits(back.model) - logits(source.model)).abs().max().item() <= 1e-5
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (kind != "llama")  # tied embeddings: no output matrix
    assert "blk.0.attn_q.weight" in names and "output_norm.weight" in names
    if kind == "mixtral":
        assert "blk.1.ffn_gate_exps.weight" in names and "blk.1.ffn_gate_inp.weight" in names


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16"])
def test_packed_model_writes_its_blocks_unchanged(tmp_path, qtype):
    first = save_gguf(hf_model("mistral", seed=8), tmp_path / "a.gguf", qtype)
    packed = load_model(first, packed=True)
    assert packed.model.layers[0].attention.wqkv is not None  # fused modules are split on the way out
    second = write_gguf(packed.model, tmp_path / "b.gguf")
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(second)
    blocks = {t.name: (t.tensor_type, bytes(t.data)) for t in a.tensors}
    assert {t.name: (t.tensor_type, bytes(t.data)) for t in b.tensors} == blocks
    assert torch.equal(logits(load_model(second, packed=True).model), logits(packed.model))


def test_metadata_llama_cpp_reads(tmp_path):
    source = load_model(save_hf(hf_model("mistral", seed=9), tmp_path / "hf", shard=None))
    tokenizer = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(96)],
        "tokenizer.ggml.scores": [0.0] * 96,
        "tokenizer.ggml.token_type": [1] * 96,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    reader = gguf.GGUFReader(write_gguf(source.model, tmp_path / "m.gguf", tokenizer, name="tiny"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    c = source.config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["llama.embedding_length"] == c.dim and fields["llama.block_count"] == c.n_layers
    assert fields["llama.attention.head_count_kv"] == c.n_kv_heads
    assert fields["llama.rope.freq_base"] == c.rope_theta and fields["llama.attention.sliding_window"] == 8
    assert fields["tokenizer.ggml.tokens"][:2] == ["t0", "t1"] and fields["tokenizer.ggml.bos_token_id"] == 1


def test_unknown_float_type(tmp_path):
    source = load_model(save_hf(hf_model("llama", seed=1), tmp_path / "hf", shard=None))
    with pytest.raises(ValueError, match="q3"):
        write_gguf(source.model, tmp_path / "m.gguf", float_type="q3")


def test_quantizing_a_mixtral_keeps_its_router_float(tmp_path):
    """`quant` packs the experts and attention but leaves `ffn_gate_inp` F32, as llama.cpp's quantizer
    does (the router's rows pick the experts; a packed router also came back F32 from a loaded model,
    so a file written back differed from the one read)."""
    source = load_model(save_hf(hf_model("mixtral", seed=7, hidden_size=256), tmp_path / "hf", shard=None))
    reader = gguf.GGUFReader(write_gguf(source.model, tmp_path / "q.gguf", quant="q6_k"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q6_K
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q6_K
