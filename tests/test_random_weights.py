"""The random-weights loader builds the documented shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tramontane.build.random import meta_model, random_model
from tramontane.errors import ConfigError
from tramontane.weights.random import random_config


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mistral_7b_shapes_on_meta():
    model = meta_model(random_config("mistral-7b"))
    assert abs(count(model) - 7.24e9) / 7.24e9 < 0.01
    assert count(model) == model.config.parameter_count()
    assert model.layers[0].attention.wk.weight.shape == (1024, 4096)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_mixtral_shapes_on_meta():
    model = meta_model(random_config("mixtral-8x7b"))
    assert abs(count(model) - 46.7e9) / 46.7e9 < 0.01
    assert model.layers[0].feed_forward.w1.shape == (8, 14336, 4096)


def test_config_file_and_forward(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 2,
                "head_dim": 16,
                "hidden_dim": 128,
                "n_heads": 4,
                "n_kv_heads": 2,
                "norm_eps": 1e-5,
                "vocab_size": 100,
                "sliding_window": 8,
            }
        )
    )
    model = random_model(random_config(str(path)))
    logits = model(torch.randint(0, 100, (1, 12)))
    assert logits.shape == (1, 12, 100) and torch.isfinite(logits).all()


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="not a preset"):
        random_config("mistral-8b")


def test_quantized_random_model_is_packed(tmp_path):
    from tramontane.quant.linear import PackedLinear

    config = random_config("mistral-7b").with_(n_layers=1, vocab_size=512)
    model = random_model(config, quant="int4")
    assert model.config.quant == "int4"
    assert isinstance(model.layers[0].feed_forward.w13, PackedLinear)  # gate and up, fused
    assert model.layers[0].feed_forward.w13.packed.numel() == 2 * 14336 * 4096 // 32 * 20  # Q4_1 blocks
    from tramontane.quant import kernels
    from tramontane.quant.step import CompiledStep

    assert CompiledStep.fits(model) == kernels.available()
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_random_mixtral_packs_its_experts(quant):
    """The int4/int8 presets of a Mixtral config: experts packed one at a time (the float stack never
    exists), the same bytes per expert as a dense matrix of that shape, and a forward pass that runs."""
    from tramontane.quant.linear import PackedExperts

    config = random_config("mixtral-8x7b").with_(n_layers=1, dim=256, hidden_dim=512, n_heads=8, n_kv_heads=2)
    config = config.with_(head_dim=32, vocab_size=512)
    model = random_model(config, quant=quant)
    ff = model.layers[0].feed_forward
    bytes_per_block = {"int8": 34, "int4": 20}[quant]
    for w, shape in (("w1", (8, 512, 256)), ("w2", (8, 256, 512)), ("w3", (8, 512, 256))):
        stack = getattr(ff, w)
        assert isinstance(stack, PackedExperts)
        assert stack.packed.shape == (*shape[:2], shape[2] // 32 * bytes_per_block)
    assert isinstance(ff.gate, torch.nn.Linear)  # the router stays float
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_random_gguf_of_valid_blocks_loads_packed(tmp_path, qtype):
    """--random CONFIG --quant q4_0|q4_k|q3_k|q2_k...: a GGUF streamed one tensor at a time, whose blocks
    the gguf package decodes to finite values, and which loads with every expert stack packed."""
    import gguf

    from tramontane.build.load import load_model
    from tramontane.quant.linear import PackedExperts
    from tramontane.weights.random_gguf import write_random_gguf

    config = random_config("mixtral-8x7b").with_(n_layers=2, dim=256, hidden_dim=512, n_heads=8, n_kv_heads=2)
    config = config.with_(head_dim=32, vocab_size=300)
    path = write_random_gguf(config, qtype, tmp_path / "r.gguf", {})
    reader = gguf.GGUFReader(str(path))
    exps = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
    values = gguf.quants.dequantize(exps.data, exps.tensor_type)
    assert values.shape == (8, 256, 512) and np.isfinite(values).all() and values.std() > 0
    model = load_model(path, packed=True).model
    assert model.config.moe.num_experts == 8 and model.config.vocab_size == 300
    assert all(isinstance(getattr(b.feed_forward, w), PackedExperts) for b in model.layers for w in ("w1", "w2", "w3"))
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()


def test_random_gguf_of_mixtral_8x7b_has_the_real_byte_count(tmp_path):
    """The tensor table of the full preset (nothing written): Q3_K Mixtral 8x7B is ~20 GB, as llama.cpp's."""
    from tramontane.weights.gguf_quants import GGML_TYPES
    from tramontane.weights.random_gguf import TYPE_IDS, tensor_shapes

    info = GGML_TYPES[TYPE_IDS["Q3_K"]]
    total = sum(
        int(np.prod(shape)) // info.block_size * info.type_size if kind == "matrix" else int(np.prod(shape)) * 4
        for _, shape, kind in tensor_shapes(random_config("mixtral-8x7b"))
    )
    assert 19.5e9 < total < 20.5e9, total
