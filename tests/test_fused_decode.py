"""The compiled decoding step (quant/fused.py, run_block in _kernels.c) computes what the blocks do."""

from __future__ import annotations

import pytest
import torch

from chartok import CharTokenizer
from models import hf_model, save_gguf
from tramontane.api import LLM
from tramontane.model.cache import KVCache
from tramontane.quant import kernels
from tramontane.quant.fused import FusedDecode
from tramontane.weights.loader import load_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")
ISAS = list(kernels.extension().isas()) if kernels.available() else []


def decode_steps(model, positions: torch.Tensor, tokens: torch.Tensor, fused: bool):
    """Feed tokens [B,T] one column at a time at positions [B,T] (-1 = padding); logits [T,B,V] and cache.

    The cache keeps every position (no rolling buffer), so the sliding window is the mask's job."""
    kernel = model.step_kernel
    model.step_kernel = kernel if fused else None
    cache = KVCache(model.config.with_(sliding_window=None), tokens.shape[0], 32)
    try:
        with torch.inference_mode():
            out = [model(tokens[:, t:t + 1], positions[:, t:t + 1], cache)[:, -1] for t in range(tokens.shape[1])]
    finally:
        model.step_kernel = kernel
    return torch.stack(out), cache


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("kind", "qtype", "overrides"), [
    ("mistral", "Q4_0", {}),  # window 8 < 14 steps
    ("mistral", "Q8_0", {"hidden_size": 96}),  # head dim 24: vector tails
    ("llama", "Q4_1", {}),  # tied embeddings, no window
    ("llama", "F16", {"num_key_value_heads": 4}),  # no grouping
])
def test_fused_steps_equal_module_steps(tmp_path, isa, kind, qtype, overrides):
    model = load_model(save_gguf(hf_model(kind, seed=3, **overrides), tmp_path / "m.gguf", qtype), packed=True).model
    assert isinstance(model.step_kernel, FusedDecode)
    tokens = torch.randint(0, model.config.vocab_size, (3, 14), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(14).repeat(3, 1)
    positions[1, :4] = -1  # a row that starts late (left padding): nothing written, nothing attended
    positions[1, 4:] -= 4
    positions[2, 9] = -1  # a padding step in the middle
    positions[2, 10:] -= 1
    prev = kernels.extension().set_isa(isa)
    try:
        fused, fused_cache = decode_steps(model, positions, tokens, fused=True)
        plain, plain_cache = decode_steps(model, positions, tokens, fused=False)
    finally:
        kernels.extension().set_isa(prev)
    valid = positions.T >= 0  # [T,B]
    scale = plain[valid].abs().max().item()
    assert (fused - plain)[valid].abs().max().item() <= 1e-5 * max(1.0, scale), scale
    assert torch.equal(fused_cache.pos, plain_cache.pos)
    for a, b in zip(fused_cache.k + fused_cache.v, plain_cache.k + plain_cache.v):
        assert (a - b).abs().max().item() <= 1e-5


def test_rolling_buffer(tmp_path):
    model = load_model(save_gguf(hf_model("mistral", seed=5), tmp_path / "m.gguf", "Q4_1"), packed=True).model
    tokens = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(20).repeat(2, 1)
    runs = []
    for fused in (True, False):
        kernel = model.step_kernel
        model.step_kernel = kernel if fused else None
        cache = KVCache(model.config, 2, 32)  # window 8 < 32: 8 slots, wrapping twice
        assert cache.rolling and cache.size == 8
        with torch.inference_mode():
            runs.append(torch.stack([model(tokens[:, t:t + 1], positions[:, t:t + 1], cache)[:, -1]
                                     for t in range(20)]))
        model.step_kernel = kernel
    assert (runs[0] - runs[1]).abs().max().item() <= 1e-5 * max(1.0, runs[1].abs().max().item())


def test_greedy_generation_is_the_same_with_and_without_the_fused_step(tmp_path):
    path = save_gguf(hf_model("mistral", seed=4), tmp_path / "m.gguf", "Q8_0")
    llm = LLM(load_model(path, packed=True), CharTokenizer())
    assert llm.model.step_kernel is not None
    prompts = [[1, 5, 9, 33, 7], [1, 60, 2, 8]]
    fast = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=20, ignore_eos=True)]
    llm.model.step_kernel = None
    plain = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=20, ignore_eos=True)]
    assert fast == plain and all(len(t) == 20 for t in fast)


def test_installed_only_where_it_fits(tmp_path, monkeypatch):
    moe = load_model(save_gguf(hf_model("mixtral", seed=1), tmp_path / "x.gguf", "Q8_0"), packed=True).model
    assert moe.step_kernel is None  # experts take the module path
    dense = load_model(tmp_path / "x.gguf").model  # dequantized at load: nothing packed
    assert dense.step_kernel is None
    monkeypatch.setattr(kernels, "_ext", None)
    path = save_gguf(hf_model("llama", seed=1), tmp_path / "l.gguf", "Q8_0")
    assert load_model(path, packed=True).model.step_kernel is None


def test_steps_it_does_not_take(tmp_path):
    model = load_model(save_gguf(hf_model("llama", seed=2), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    kernel, cache = model.step_kernel, KVCache(model.config, 1, 8)
    h = torch.zeros(1, 1, model.config.dim)
    assert kernel.accepts(h, cache)
    assert not kernel.accepts(torch.zeros(1, 2, model.config.dim), cache)  # a prefill chunk
    assert not kernel.accepts(h, None)  # no cache
    assert not kernel.accepts(h, KVCache(model.config, 1, 8, dtype=torch.bfloat16))
    assert not kernel.accepts(h.bfloat16(), cache)


def test_int4_swap_installs_it_on_float32_models():
    from tramontane.config import ModelConfig
    from tramontane.weights.random import random_model

    config = ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                         vocab_size=96, norm_eps=1e-5, rope_theta=1e4, max_seq_len=64)
    model = random_model(config, quant="int4")
    assert isinstance(model.step_kernel, FusedDecode)
    assert random_model(config, dtype=torch.bfloat16, quant="int4").step_kernel is None  # bf16 norms
