"""Weight-only int8 / int4 quantization of float checkpoints (Q8_0 / Q4_1 layouts, run packed)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from models import hf_model, save_hf

from tramontane.build.load import load_model
from tramontane.errors import RequestError
from tramontane.quant.linear import PackedLinear
from tramontane.quant.quantize import quantize_model, quantize_q4_1, quantize_q8_0


@pytest.mark.parametrize("fn,qtype", [(quantize_q8_0, "Q8_0"), (quantize_q4_1, "Q4_1")])
def test_blocks_are_bit_identical_to_gguf_quantize(fn, qtype):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    w[0, :32] = 0.0  # an all-zero group
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(fn(w).numpy(), ref)


# Relative error of the logits on the harsh tiny test model (weights ~N(0, 0.15)); random logits give ~1.4.
@pytest.mark.parametrize("scheme,tolerance", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_model_is_a_module_swap_close_to_float(tmp_path, scheme, tolerance):
    folder = save_hf(hf_model("mistral", seed=2), tmp_path / "m", shard=None)
    plain = load_model(folder).model
    quant = quantize_model(load_model(folder).model, scheme)
    assert quant.config.quant == scheme
    layers = [m for m in quant.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2 * 4 + 1  # fused qkv, o, fused w1/w3, w2 per layer, and the output head
    w = plain.layers[0].attention.wq.weight
    deq = quant.layers[0].attention.wqkv.dequantize()[: w.shape[0]]  # q rows come first
    step = (w.abs().max() / 127) if scheme == "int8" else (w.max() - w.min()) / 15
    assert (deq - w).abs().max() <= step  # within one quantization step
    tokens = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = quant(tokens), plain(tokens)
    assert ((a - b).norm() / b.norm()).item() <= tolerance


def test_a_matrix_of_rows_not_whole_groups_stays_float_and_is_counted(tmp_path):
    """Issue 19: --quant says what it did; w2's rows of 80 are not whole groups of 32, so it stays float
    (llama.cpp keeps such a tensor F16) and the summary counts it."""
    from tramontane.quant.quantize import summary

    folder = save_hf(hf_model("mistral", seed=2, intermediate_size=80), tmp_path / "m", shard=None)
    quant = quantize_model(load_model(folder).model, "int8")
    assert isinstance(quant.layers[0].feed_forward.w2, torch.nn.Linear)
    assert summary(quant) == "Q8_0 x8, float x2"  # per layer q/k/v, o, w1/w3; the head and the embedding


def test_quant_of_a_packed_gguf_model_keeps_its_fused_layers(tmp_path):
    """`run model.gguf --quant int8` crashed: the GGUF model's q/k/v were already fused and fusing
    again looked for wq. Its packed matrices stay as they are; the answer is the same."""
    from models import save_gguf

    from tramontane.quant.quantize import summary

    path = save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q4_1")
    plain, again = load_model(path, packed=True).model, load_model(path, packed=True).model
    quantize_model(again, "int8")
    tokens = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(tokens), plain(tokens))
    assert summary(again).startswith("Q4_1 x")


def test_unknown_scheme():
    with pytest.raises(RequestError, match="int3"):
        quantize_model(torch.nn.Linear(2, 2), "int3")


def test_smollm2_int8_perplexity_within_one_percent(smollm2_path):
    from test_smollm2 import TEXT

    import tramontane

    plain = tramontane.load(smollm2_path, packed=False)
    ids = plain.tokenizer.encode(TEXT)

    def perplexity(llm) -> float:
        return float(torch.exp(-llm.score(ids).mean()))

    base = perplexity(plain)
    quantize_model(plain.model, "int8")
    quantized = perplexity(plain)
    assert abs(quantized - base) / base <= 0.01, (base, quantized)
