"""KV cache types (model/kv_types.py, `--kv-dtype`): the Q8_0 rows by hand, the memory each type takes,
the errors a user can cause, and generation on a Q8_0 cache offline and served. The compiled step's
reads of each type: test_quant_kernels.py (against float64) and test_compiled_step.py (against the
module path); perplexity on the real model: test_smollm2.py."""

from __future__ import annotations

import asyncio

import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_gguf

from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.cli.main import KV_DTYPES, build_parser
from tramontane.decoding.sampling import SamplingParams
from tramontane.engine import AsyncEngine, EngineRequest
from tramontane.engine.blocks import BlockPool, bytes_per_block
from tramontane.errors import ConfigError
from tramontane.model import KV_TYPES, KVCache, kv_type


def test_q8_0_rows_by_hand():
    """The module docstring's worked example: a block whose largest magnitude is 2.54 gets the scale
    d = 2.54 / 127 = 0.02, stored as the half 0x251F (0.0200042724609375); -1.0 becomes round(-50.0)
    and reads back as -50 d; a block of zeros keeps scale 0."""
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[0, 2] = 2.54, -1.0, 0.01
    stored = kv_type("q8_0").encode(x)
    assert stored.dtype == torch.uint8 and stored.shape == (2, 34)
    assert stored[0, :2].tolist() == [0x1F, 0x25]  # little-endian half 0x251F: 2^-6 (1 + 287/1024)
    assert stored[0, 2:6].view(torch.int8).tolist() == [127, -50, 0, 0]  # 0.01 / 0.02 = 0.5: to even, 0
    back = kv_type("q8_0").decode(stored)
    assert back[0, :3].tolist() == [127 * 0.0200042724609375, -50 * 0.0200042724609375, 0.0]
    assert stored[1].tolist() == [0] * 34 and back[1].abs().sum() == 0


def test_names_and_the_head_dims_each_type_takes(tmp_path):
    assert tuple(KV_TYPES) == KV_DTYPES[1:]  # the CLI's choices, written out so --help imports no torch
    assert kv_type("bfloat16") is KV_TYPES["bf16"] and kv_type(torch.float16) is KV_TYPES["f16"]
    with pytest.raises(ConfigError, match=r"unknown KV cache type 'q4_0'; choose one of f32, bf16, f16, q8_0"):
        kv_type("q4_0")
    model = load_model(save_gguf(hf_model("llama", seed=1), tmp_path / "m.gguf", "Q8_0"), packed=True)
    assert model.config.head_dim == 16
    with pytest.raises(ConfigError, match=r"q8_0 KV cache stores rows in blocks of 32 elements; .* head_dim is 16"):
        LLM(model, CharTokenizer(), kv_dtype="q8_0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-dtype", "q4"])
    assert build_parser().parse_args(["serve", "--kv-dtype", "q8_0"]).kv_dtype == "q8_0"


def test_memory_of_each_type(tmp_path):
    """Bytes per block (the server sizes its pool by them) and the offline cache's buffers: Q8_0 holds a
    key in 34/128 of float32's bytes, 0.53x bfloat16's."""
    config = load_model(save_gguf(hf_model("llama", seed=1, hidden_size=128), tmp_path / "m.gguf", "Q8_0")).config
    per = {name: bytes_per_block(config, 16, name) for name in KV_TYPES}
    assert per["f32"] == 2 * config.n_layers * 16 * config.n_kv_heads * config.head_dim * 4
    assert per["bf16"] == per["f16"] == per["f32"] // 2
    assert per["q8_0"] * 128 == per["f32"] * 34 and per["q8_0"] / per["bf16"] <= 0.55
    for name in KV_TYPES:
        cache = KVCache(config, 2, 40, name)
        assert sum(t.nbytes for t in cache.k + cache.v) == per[name] * 2 * 40 // 16
        pool = BlockPool(config, 5, 16, name)
        assert pool.kv is KV_TYPES[name] and sum(t.nbytes for t in pool.k + pool.v) == 5 * per[name]


def test_a_long_offline_cache_lies_on_huge_pages_and_keeps_its_rows_as_it_grows(tmp_path):
    """Where every layer's keys and values together span 4 MiB and more they are views of one mapping on
    transparent huge pages (model/cache.py, layer_zeros): it starts on a 2 MiB boundary, the layers lie
    one after another (keys, then values), each reads as zeros and writing one leaves the others as
    they were; a cache that grows into such a size (KVCache._resize) keeps the rows it held, and a
    small cache's layers stay torch's own."""
    config = load_model(save_gguf(hf_model("llama", seed=1, hidden_size=128), tmp_path / "m.gguf", "Q8_0")).config
    width = config.n_kv_heads * config.head_dim * 4  # float32 bytes of one position in one layer
    long = 1 + (4 << 20) // (2 * config.n_layers * width)
    big = KVCache(config, 1, long, "f32")
    layers = big.k + big.v
    base = layers[0].data_ptr()
    assert base % (2 << 20) == 0 and all(t.data_ptr() == base + i * t.nbytes for i, t in enumerate(layers))
    assert not any(t.any() for t in layers)
    big.k[0][0, :, 2] = 5.0
    assert big.k[0].sum() == 5.0 * config.n_kv_heads * config.head_dim and not any(t.any() for t in layers[1:])
    small = KVCache(config, 1, 16, "f32")
    assert len({t.untyped_storage().data_ptr() for t in small.k + small.v}) == 2 * config.n_layers
    grown = KVCache(config, 1, 16, "f32")
    grown.k[0][0, :, 3] = 7.0
    grown.pos[0, 3] = 3
    grown.ensure_capacity(long, long)
    assert grown.k[0].shape[2] == long and grown.k[0].data_ptr() % (2 << 20) == 0
    assert (grown.k[0][0, :, 3] == 7.0).all() and grown.k[0].sum() == 7.0 * config.n_kv_heads * config.head_dim


def test_a_q8_0_cache_generates_the_same_offline_and_served(tmp_path):
    """Greedy answers on a Q8_0 cache: the offline generator (rolling cache, window 8 < context) and the
    serving engine (paged pool) read the same rounded keys, so they answer alike; the answers are not
    those of the float32 cache for every prompt (the cache's rounding is real). The prompts fit in the
    window: a longer one is a chunk that wraps the rolling buffer, which offline runs on the module path,
    whose keys round from sums in another order (a key a hair from a rounding boundary lands on either
    side), so a near-tie of a random model's logits may then go either way."""
    path = save_gguf(hf_model("mistral", seed=8, hidden_size=128), tmp_path / "m.gguf", "Q8_0")
    loaded = load_model(path, packed=True)
    llm, exact = LLM(loaded, CharTokenizer(), kv_dtype="q8_0"), LLM(loaded, CharTokenizer())
    assert llm.backend.name == "compiled" and llm.kv is KV_TYPES["q8_0"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[(7 * i + j) % 90 + 3 for j in range(3 + i)] for i in range(6)]
    offline = [c.token_ids for c in llm.generate(prompts, params)]
    engine = AsyncEngine(llm, model_name="tiny", kv_cache_memory=1 << 20, block_size=4, dtype=llm.kv)
    assert engine.pool.kv is KV_TYPES["q8_0"] and engine.backend.name == "compiled"

    async def served():
        engine.start()
        try:
            outs = []
            for i, p in enumerate(prompts):
                tokens = []
                async for out in engine.generate(EngineRequest(f"r{i}", p, params)):
                    tokens += out.token_ids
                outs.append(tokens)
            return outs
        finally:
            await engine.shutdown(1.0)

    assert asyncio.run(served()) == offline
    assert [c.token_ids for c in exact.generate(prompts, params)] != offline
