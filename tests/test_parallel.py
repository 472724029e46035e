"""Tensor and expert parallelism over 2 gloo processes (torchrun) equal the single-process model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import hf_model, save_gguf, save_hf
from serving import free_port

WORKER = Path(__file__).with_name("parallel_worker.py")
CASES = [
    ("mistral", "tp"),
    ("mistral-mqa", "tp"),
    ("llama", "tp"),
    ("mixtral", "tp"),
    ("mixtral", "ep"),
    ("mixtral", "tp+ep"),
    ("mixtral-q8_0", "ep"),  # a GGUF file: each rank keeps its experts' Q8_0 blocks, packed
    ("mixtral-q8_0", "tp+ep"),  # + attention rows/whole-block columns and vocabulary rows, packed
    ("mixtral-wide-q8_0", "tp"),  # experts split inside: hidden 128 -> 64 per rank, two Q8_0 blocks
    ("mistral-wide-q8_0", "tp"),  # a dense model's packed projections, embedding and head split
]
MODELS = {
    "mistral": ("mistral", {}),
    "mistral-mqa": ("mistral", {"num_key_value_heads": 1}),  # 1 kv head, 2 ranks
    "llama": ("llama", {}),
    "mixtral": ("mixtral", {}),
    "mixtral-q8_0": ("mixtral", {}),
    "mixtral-wide-q8_0": ("mixtral", {"intermediate_size": 128}),
    "mistral-wide-q8_0": ("mistral", {"intermediate_size": 128}),
}


def torchrun(tmp: Path, cases: list[tuple[str, str]], nproc: int) -> dict:
    spec, out = tmp / f"cases{nproc}.json", tmp / f"out{nproc}.pt"
    spec.write_text(json.dumps(cases))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(WORKER),
        str(out),
        str(spec),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env=env
    )  # hang guards, generous for a loaded machine
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    folders = {}
    for kind, _ in CASES:
        model = hf_model(MODELS[kind][0], seed=5, **MODELS[kind][1])
        gguf = kind.endswith("-q8_0")  # a GGUF file of Q8_0 blocks: loaded packed
        folders[kind] = str(
            save_gguf(model, tmp / f"{kind}.gguf", "Q8_0") if gguf else save_hf(model, tmp / kind, shard="60KB")
        )
    single = torchrun(tmp, [(folders[k], "single") for k in folders], nproc=1)
    split = torchrun(tmp, [(folders[k], mode) for k, mode in CASES], nproc=2)
    return {k: single[f"{folders[k]}|single"] for k in folders}, {(k, m): split[f"{folders[k]}|{m}"] for k, m in CASES}


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_two_ranks_give_the_single_process_logits(results, kind, mode):
    single, split = results[0][kind], results[1][(kind, mode)]
    for key in ("prefill", "steps"):  # steps: token by token through the (rolling) KV cache
        assert (split[key] - single[key]).abs().max().item() <= 1e-5, key
    assert split["greedy"] == single["greedy"] and len(split["greedy"][0]) == 16


@pytest.mark.parametrize(("kind", "mode"), CASES)
def test_each_rank_holds_about_half_the_weights(results, kind, mode):
    ratio = results[1][(kind, mode)]["weight_bytes"] / results[0][kind]["weight_bytes"]
    assert ratio <= 0.6, ratio


def test_expert_parallel_gguf_keeps_its_experts_packed(results):
    """Each rank holds its 4 of 8 experts as Q8_0 blocks (w1, w2, w3 of both layers), not floats."""
    assert results[0]["mixtral-q8_0"]["packed_experts"] == 6
    assert results[1][("mixtral-q8_0", "ep")]["packed_experts"] == 6


@pytest.mark.parametrize(("kind", "mode"), [c for c in CASES if c[0].endswith("-q8_0")])
def test_sharded_gguf_stays_packed(results, kind, mode):
    """Every packed module of the single process is packed on each rank too (its rows, experts or
    whole-block columns), the vocabulary-split embedding and head included: nothing was dequantized."""
    single, split = results[0][kind]["packed_modules"], results[1][(kind, mode)]["packed_modules"]
    if mode != "ep":  # the vocabulary split: the packed table and head of this rank's rows
        assert split.pop("PackedVocabEmbedding") == split.pop("PackedGatheredHead") == 1, split
        split["PackedEmbedding"] = split.get("PackedEmbedding", 0) + 1
        split["PackedLinear"] = split.get("PackedLinear", 0) + 1
    assert split == single and sum(single.values()) >= 8, (split, single)


def test_rank_blocks_cut_rows_whole_experts_and_whole_block_columns():
    """rank_blocks against dequantize-then-slice: rows and experts are views of the file's blocks,
    columns cut on block boundaries are byte ranges, a cut inside a block is refused (None)."""
    from tramontane.build.sharded import rank_blocks
    from tramontane.config import ModelConfig, MoeConfig
    from tramontane.parallel.plan import layout_for
    from tramontane.quant.kernels import dequantize_packed
    from tramontane.quant.quantize import quantize_q8_0

    config = ModelConfig(
        vocab_size=96, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
        norm_eps=1e-5, rope_theta=1e4, moe=MoeConfig(num_experts=4, num_experts_per_tok=2),
    )  # fmt: skip
    experts = torch.randn(4, 128, 64, generator=torch.Generator().manual_seed(0))  # w1: [E, F, dim]
    down = torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(1))  # w2: [E, dim, F]
    q8 = 8  # GGML type Q8_0

    def pack(t):
        return torch.stack([quantize_q8_0(m) for m in t])  # [E, out, row_bytes]

    def unpack(rows, k):
        return torch.stack([dequantize_packed(r, q8, k) for r in rows])

    w1, w2 = pack(experts), pack(down)
    for rank in (0, 1):
        tp, ep = layout_for(config, "tp", rank, 2), layout_for(config, "ep", rank, 2)
        part, _ = rank_blocks("layers.0.feed_forward.w1", (w1, q8), tp)  # rows of every expert
        assert torch.equal(unpack(part, 64), unpack(w1, 64)[:, rank * 64 : (rank + 1) * 64])
        part, _ = rank_blocks("layers.0.feed_forward.w2", (w2, q8), tp)  # columns: two 32-blocks each
        assert torch.equal(unpack(part, 64), unpack(w2, 128)[:, :, rank * 64 : (rank + 1) * 64])
        part, _ = rank_blocks("layers.0.feed_forward.w1", (w1, q8), ep)  # whole experts: a view
        assert part.data_ptr() == w1[2 * rank].data_ptr() and part.shape[0] == 2
    narrow = layout_for(config.with_(hidden_dim=96), "tp", 1, 2)  # 48 per rank: inside a block
    assert rank_blocks("layers.0.feed_forward.w2", (pack(down[:, :, :96]), q8), narrow) is None


def test_plans_refuse_models_that_do_not_split():
    from tramontane.config import ModelConfig
    from tramontane.errors import ConfigError
    from tramontane.parallel.plan import layout_for

    config = ModelConfig(
        vocab_size=96,
        dim=64,
        n_layers=1,
        n_heads=6,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=96,
        norm_eps=1e-5,
        rope_theta=1e4,
    )
    with pytest.raises(ConfigError, match="n_heads = 6"):
        layout_for(config, "tp", 0, 4)
    with pytest.raises(ConfigError, match="has none"):
        layout_for(config, "ep", 0, 2)
    one_kv = layout_for(config.with_(n_kv_heads=1), "tp", 1, 2)  # fewer kv heads than ranks: replicated
    assert one_kv.q_rows == (48, 96) and one_kv.kv_rows == (0, 16)
    assert layout_for(config.with_(vocab_size=97), "tp", 1, 2).vocab == (49, 97)  # uneven vocabulary


def test_parallel_refuses_what_it_cannot_shard(tmp_path):
    import tramontane
    from tramontane.errors import RequestError

    folder = save_hf(hf_model("mistral", seed=1), tmp_path / "m", shard=None)
    with pytest.raises(RequestError, match="--parallel"):
        tramontane.load(folder, parallel="tp", quant="int8")
    with pytest.raises(RequestError, match="--parallel"):
        tramontane.load(folder, parallel="tp", lora={"a": tmp_path})
