"""Packed GGUF execution gives the logits of the dequantize-at-load path, for every packed type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from models import hf_model, save_gguf
from test_gguf_dequant import _random_blocks

from tramontane.build.load import load_model
from tramontane.quant.linear import PackedEmbedding, PackedLinear

QUANTIZABLE = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants can write these
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # written as random valid blocks


def compare(path) -> None:
    packed = load_model(path, packed=True)
    plain = load_model(path)
    assert packed.config.quant == "gguf" and plain.config.quant is None
    swapped = [m for m in packed.model.modules() if isinstance(m, (PackedLinear, PackedEmbedding))]
    assert len(swapped) >= 2 * 4 + 1  # per layer: fused qkv, o, fused gate/up, down; and the embedding
    assert all(block.attention.wqkv is not None for block in packed.model.layers)
    tokens = torch.randint(0, packed.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = packed.model(tokens), plain.model(tokens)
    assert (a - b).abs().max().item() <= 1e-3 * max(1.0, b.abs().max().item() / 10)


@pytest.mark.parametrize("kind", ["mistral", "llama"])
@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_packed_equals_dequantized(tmp_path, kind, qtype):
    compare(save_gguf(hf_model(kind, seed=6), tmp_path / "m.gguf", qtype))


def write_random_kquant_model(path, qtype: str, scale_max: float = 0.05) -> None:
    """A tiny llama-architecture GGUF (dim 256, ffn 512) whose matrices are random valid blocks (f16 scales
    of at most `scale_max`)."""
    dim, ffn, layers, vocab, heads, kv = 256, 512, 2, 96, 4, 2
    kind = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (w.add_block_count, layers),
        (w.add_context_length, 128),
        (w.add_embedding_length, dim),
        (w.add_feed_forward_length, ffn),
        (w.add_head_count, heads),
        (w.add_head_count_kv, kv),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_rope_freq_base, 10000.0),
        (w.add_vocab_size, vocab),
    ):
        add(value)
    hd = dim // heads
    shapes = {"token_embd.weight": (vocab, dim), "output.weight": (vocab, dim)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (dim, dim),
            f"blk.{i}.attn_k.weight": (kv * hd, dim),
            f"blk.{i}.attn_v.weight": (kv * hd, dim),
            f"blk.{i}.attn_output.weight": (dim, dim),
            f"blk.{i}.ffn_gate.weight": (ffn, dim),
            f"blk.{i}.ffn_up.weight": (ffn, dim),
            f"blk.{i}.ffn_down.weight": (dim, ffn),
        }
    for seed, (name, (rows, cols)) in enumerate(shapes.items()):
        blocks = _random_blocks(kind, rows, cols, seed, scale_max)
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kind)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_packed_k_quants_equal_dequantized(tmp_path, qtype):
    write_random_kquant_model(tmp_path / "k.gguf", qtype)
    compare(tmp_path / "k.gguf")


def test_smollm2_packed_logits_and_greedy_answer(smollm2_path):
    import tramontane

    packed = load_model(smollm2_path, packed=True).model
    plain = load_model(smollm2_path).model
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (packed(tokens) - plain(tokens)).abs().max().item()
    assert diff <= 1e-3, diff
    llm = tramontane.load(smollm2_path, packed=True)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    assert "Paris" in llm.chat(question, temperature=0, max_tokens=24).text


@pytest.mark.parametrize("quant", ["q4_k", "q6_k", "q4_0", "q8_0"])
def test_integer_activations_stay_near_the_exact_path(tmp_path, quant):
    """The default int8 activations of the packed kernels against the exact float32 ones, through a
    whole tiny Mistral quantized by our writer (prefill of 16 tokens, then one-token steps): a gross
    check (each matmul is exactly sum(W * rounded x): test_quant_kernels checks that and its rounding
    bound). A Mixtral is no test here: a rounding can flip a near tie of its router, and then a token
    meets other experts."""
    from models import save_hf

    from tramontane.model.cache import KVCache
    from tramontane.quant import kernels
    from tramontane.weights.gguf_writer import write_gguf

    folder = save_hf(hf_model("mistral", seed=4, hidden_size=256, intermediate_size=512), tmp_path / "f")
    write_gguf(load_model(folder).model, tmp_path / "k.gguf", {}, quant=quant)
    model = load_model(tmp_path / "k.gguf", packed=True).model
    tokens = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))

    def logits() -> torch.Tensor:
        with torch.no_grad():
            cache = KVCache(model.config, 2, 32)
            prefill = model(tokens[:, :16], torch.arange(16).expand(2, 16), cache)
            steps = [model(tokens[:, t : t + 1], torch.full((2, 1), t), cache) for t in range(16, 19)]
        return torch.cat([prefill, *steps], 1)  # [2, 19, V]

    previous = kernels.set_activations("q8")
    try:
        fast = logits()
    finally:
        kernels.set_activations(previous)
    exact = logits()
    # Measured on this random model: 6-12% of the logit scale, 87-100% of top tokens alike (its logits
    # are near ties: a random model has no confident answers); a broken kernel gives ~100% and ~1%.
    error = (fast - exact).abs().max().item() / exact.abs().max().item()
    agree = (fast.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert 0 < error <= 0.2, error  # > 0: the integer kernels ran
    assert agree >= 0.8, agree
