"""Mixtral's experts stay packed (GGUF `*_exps`, `--quant int8|int4`), run packed, and are read from the
mapped file only when tokens choose them."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from models import hf_model, save_gguf, save_hf

from tramontane.build.load import load_model
from tramontane.config import MoeConfig
from tramontane.model.moe import MoeFeedForward
from tramontane.quant.linear import PackedExperts, dequantize_model
from tramontane.quant.quantize import quantize_model
from tramontane.weights.gguf_quants import GGML_TYPES
from tramontane.weights.gguf_writer import write_gguf
from tramontane.weights.hf_writer import write_hf
from tramontane.weights.random import random_config
from tramontane.weights.random_gguf import TYPE_IDS, tensor_shapes, write_random_gguf

QUANTIZABLE = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants writes these
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # written as random valid blocks
TOKENS = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))


def experts_of(model) -> list[MoeFeedForward]:
    return [b.feed_forward for b in model.layers if isinstance(b.feed_forward, MoeFeedForward)]


def assert_close(model, reference) -> None:
    with torch.no_grad():
        a, b = model(TOKENS), reference(TOKENS)
    # the bound, 1e-3 relative to the logit scale (random blocks make activations in the
    # thousands: the kernels' float32 rounding differs from the dequantized matmul's by ~1e-7 relative)
    assert (a - b).abs().max().item() <= 1e-3 * max(1.0, b.abs().max().item())


def compare_packed(path) -> None:
    packed, plain = load_model(path, packed=True), load_model(path)
    moes = experts_of(packed.model)
    assert moes and all(isinstance(getattr(m, w), PackedExperts) for m in moes for w in ("w1", "w2", "w3"))
    assert_close(packed.model, plain.model)


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_packed_experts_equal_dequantized(tmp_path, qtype):
    compare_packed(save_gguf(hf_model("mixtral", seed=6), tmp_path / "m.gguf", qtype))


def write_random_mixtral(path, qtype: str, dim: int = 256, ffn: int = 512, experts: int = 4, layers: int = 2) -> int:
    """A tiny Mixtral GGUF (arch llama, `*_exps` stacks) whose matrices are random valid `qtype` blocks
    (weights/random_gguf.py); returns the bytes of its expert tensors."""
    config = random_config("mixtral-8x7b").with_(n_layers=layers, dim=dim, hidden_dim=ffn, n_heads=4, n_kv_heads=2)
    config = config.with_(head_dim=dim // 4, vocab_size=96, moe=MoeConfig(experts, 2))
    write_random_gguf(config, qtype, path, {})
    info = GGML_TYPES[TYPE_IDS[qtype]]
    return sum(
        int(np.prod(shape)) // info.block_size * info.type_size
        for name, shape, _ in tensor_shapes(config)
        if "_exps" in name
    )


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_packed_k_quant_experts_equal_dequantized(tmp_path, qtype):
    write_random_mixtral(tmp_path / "k.gguf", qtype)
    compare_packed(tmp_path / "k.gguf")


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_tokens_of_packed_experts_equal_the_float_model(tmp_path):
    path = save_gguf(hf_model("mixtral", seed=3), tmp_path / "m.gguf", "Q8_0")
    prompt = [1, 5, 9, 17, 33, 65]
    assert greedy(load_model(path, packed=True).model, prompt, 12) == greedy(load_model(path).model, prompt, 12)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_float_mixtral_runs_its_experts_packed(tmp_path, scheme):
    """--quant packs the experts too (the router stays float); logits equal those of the model rebuilt
    from the dequantized blocks."""
    model = load_model(save_hf(hf_model("mixtral", seed=6), tmp_path / "hf", shard=None)).model
    quantize_model(model, scheme)
    moes = experts_of(model)
    assert all(isinstance(getattr(m, w), PackedExperts) for m in moes for w in ("w1", "w2", "w3"))
    assert all(isinstance(m.gate, torch.nn.Linear) for m in moes)
    with torch.no_grad():
        packed = model(TOKENS)
    dequantize_model(model)
    assert all(isinstance(m.w1, torch.nn.Parameter) and m.w1.shape == (8, 96, 64) for m in experts_of(model))
    with torch.no_grad():
        assert (packed - model(TOKENS)).abs().max().item() <= 1e-4 * max(1.0, packed.abs().max().item())


def test_packed_experts_are_written_back_as_they_are(tmp_path):
    """GGUF out: the `*_exps` blocks byte for byte; HF out: each expert decoded."""
    source = load_model(save_gguf(hf_model("mixtral", seed=6), tmp_path / "m.gguf", "Q4_0"), packed=True)
    again = load_model(write_gguf(source.model, tmp_path / "again.gguf"), packed=True)
    for a, b in zip(experts_of(source.model), experts_of(again.model)):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(a, w).packed, getattr(b, w).packed) and getattr(b, w).qtype == 2
    assert_close(again.model, source.model)
    folder = write_hf(source.model, tmp_path / "hf")
    assert_close(load_model(folder).model, source.model)


MEASURE_RSS = """
import gc, json, sys
import torch
from rss import rss_growth
from tramontane.build.load import load_model
from tramontane.config import MoeConfig

path, step, holder = sys.argv[1], torch.tensor([[7]]), {}
copied = rss_growth(lambda: holder.update(m=load_model(path, packed=True, mmap=False)))
with torch.no_grad():
    holder["m"].model(step)  # first-call allocations, so that the step below measures weights only
holder.clear()
gc.collect()
loaded = rss_growth(lambda: holder.update(m=load_model(path, packed=True)))
with torch.no_grad():
    stepped = rss_growth(lambda: holder["m"].model(step))
print(json.dumps({"copied": copied, "loaded": loaded, "stepped": stepped}))
"""


def test_mapped_experts_are_read_only_when_chosen(tmp_path):
    """With the file mapped (the default), loading reads no expert and a one-token step reads the two of
    eight each layer routes to (the page cache maps large files in large folios: experts of 2 MB per
    matrix keep that rounding small); --no-mmap copies every expert in. Measured in a fresh process (a
    process that freed memory before reuses it without growing)."""
    path = tmp_path / "big.gguf"
    expert_bytes = write_random_mixtral(path, "Q8_0", dim=256, ffn=8192, experts=8, layers=2)  # 102 MiB
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_RSS, str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.splitlines()[-1])
    assert rss["copied"] > 0.9 * expert_bytes, f"--no-mmap loaded {rss['copied']:,} for {expert_bytes:,} bytes"
    assert rss["loaded"] < 0.1 * expert_bytes, f"loading mapped weights grew RSS by {rss['loaded']:,} bytes"
    assert rss["stepped"] < 0.45 * expert_bytes, f"one token read {rss['stepped']:,} of {expert_bytes:,} bytes"


def test_mapped_tensors_outlive_the_closed_file(tmp_path):
    """close() cannot unmap what a tensor still views (the mapping goes with the last view)."""
    from tramontane.weights.gguf import open_gguf

    path = save_gguf(hf_model("mixtral", seed=6), tmp_path / "m.gguf", "Q8_0")
    file = open_gguf(path)
    view = file.mapped("blk.0.ffn_gate_exps.weight")
    copy = file.copy_raw("blk.0.ffn_gate_exps.weight")
    file.close()
    gc.collect()
    assert torch.equal(view, copy)  # a dangling mapping would crash or differ here


MEASURE_QUANT_RSS = """
import gc, json, sys
from rss import rss_growth
from tramontane.build.load import load_model
from tramontane.config import MoeConfig

small, big, holder = sys.argv[1], sys.argv[2], {}
load_model(small, quant="int4")  # first-call imports and allocations, outside the measurement
gc.collect()
growth = rss_growth(lambda: holder.update(m=load_model(big, quant="int4").model))
state = holder["m"].state_dict().values()
print(json.dumps({"growth": growth, "packed": sum(t.numel() * t.element_size() for t in state)}))
"""


def test_quantizing_while_loading_never_holds_the_float_model(tmp_path):
    """--quant int4 on a float Mixtral: each tensor is quantized as it is read (experts one at a time),
    so peak memory stays under the packed model plus one float layer (+10%); quantizing after a float
    load (the old way) peaks at the whole float model."""
    shape = {"hidden_size": 256, "intermediate_size": 1024}
    big = save_hf(hf_model("mixtral", seed=1, **shape), tmp_path / "big", shard=None)  # 50 MB of float32 experts
    small = save_hf(hf_model("mixtral", seed=2), tmp_path / "small", shard=None)
    layer = 4 * (3 * 8 * 1024 * 256 + 2 * 256 * 256 + 2 * 256 * 128 + 8 * 256)  # float32 bytes of one layer
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_QUANT_RSS, str(small), str(big)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.splitlines()[-1])
    assert rss["growth"] <= 1.1 * (rss["packed"] + layer), (rss, layer)
