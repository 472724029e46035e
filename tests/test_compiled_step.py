"""The compiled decode backend (quant/step.py, run_block in quant/csrc) computes what the module path does,
and the builder picks it only where it fits."""

from __future__ import annotations

import copy
import threading

import gguf
import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_gguf, save_hf
from test_packed import write_random_kquant_model

from tramontane.api import LLM
from tramontane.build import load_model, select_backend
from tramontane.lora.layers import LoraSpec, apply_lora, set_rows
from tramontane.model import ModuleBackend
from tramontane.model.cache import Cache, KVCache, PagedCache
from tramontane.model.kv_types import kv_type
from tramontane.quant import kernels
from tramontane.quant.step import CompiledStep

pytestmark = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")
ISAS = list(kernels.extension().isas()) if kernels.available() else []


def backend_of(model, fused: bool):
    return CompiledStep(model) if fused else ModuleBackend(model)


def decode_steps(model, positions: torch.Tensor, tokens: torch.Tensor, fused: bool, kv: str = "f32"):
    """Feed tokens [B,T] one column at a time at positions [B,T] (-1 = padding); logits [T,B,V] and cache
    (storing keys as `kv`).

    The cache keeps every position (no rolling buffer), so the sliding window is the mask's job."""
    backend = backend_of(model, fused)
    cache = KVCache(model.config.with_(sliding_window=None), tokens.shape[0], 32, kv)
    with torch.inference_mode():
        out = [
            model.logits(backend.decode(tokens[:, t : t + 1], positions[:, t : t + 1], cache))[:, -1]
            for t in range(tokens.shape[1])
        ]
    return torch.stack(out), cache


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "qtype", "overrides"),
    [
        ("mistral", "Q4_0", {}),  # window 8 < 14 steps
        ("mistral", "Q8_0", {"hidden_size": 96}),  # head dim 24: vector tails
        ("llama", "Q4_1", {}),  # tied embeddings, no window
        ("llama", "F16", {"num_key_value_heads": 4}),  # no grouping
        ("mixtral", "Q8_0", {}),  # 8 experts, 2 per token, routed in the kernel
        ("mixtral", "Q4_0", {"num_experts_per_tok": 3}),
        ("mixtral", "Q5_1", {"num_local_experts": 4, "num_experts_per_tok": 1}),
    ],
)
def test_fused_steps_equal_module_steps(tmp_path, isa, kind, qtype, overrides):
    model = load_model(save_gguf(hf_model(kind, seed=3, **overrides), tmp_path / "m.gguf", qtype), packed=True).model
    assert_fused_steps_equal_module_steps(model, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K"])
def test_fused_steps_equal_module_steps_two_and_three_bit(tmp_path, isa, qtype):
    # The gguf package cannot write these: a llama model of random valid blocks (head dim 64, no window),
    # with scales small enough for weights of a trained model's size. Random blocks still make a badly
    # conditioned net: the step's own exp and RMSNorm round differently from torch's, and over 14 steps
    # that grows to 1e-6..3e-6 of the logits here (3e-5 with larger scales or other seeds): a looser bound
    # than the trained-like models'; a wrong type, row size or cache slot is off by O(1).
    write_random_kquant_model(tmp_path / "k.gguf", qtype, scale_max=0.003)
    model = load_model(tmp_path / "k.gguf", packed=True).model
    assert model.layers[0].attention.wqkv.qtype == int(gguf.GGMLQuantizationType[qtype])
    assert_fused_steps_equal_module_steps(model, isa, rtol=1e-4)


# SmolLM2 as llama-quantize writes it for Q4_K_M (rows too short for Q4_K): q, k Q5_0, v Q8_0 in
# some layers; the gate and up of their own types too (Q5_K_M: Q5_1 beside Q8_0)
MIXED = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "ffn_gate": "Q5_1", "ffn_up": "Q8_0"}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "activations"),
    [
        ("mistral", "f32"),
        ("llama", "f32"),
        ("mixtral", "f32"),
        ("mistral", "q8"),
        ("mistral", "q16"),
        ("mixtral", "q16"),
    ],
)
def test_mixed_types_run_compiled(tmp_path, isa, kind, activations):
    """q, k, v (and gate, up) of different types stay apart (nothing to fuse) and the compiled step runs
    them as pieces: chosen, and equal to the module path, offline (batch 3 and 1) and on the paged pool.
    With int8 activations (one layer: see test_interleaved_model) the pieces are interleaved types, and
    offline decoding is compared."""
    previous = kernels.set_activations(activations)
    try:
        layers = {"num_hidden_layers": 1} if activations != "f32" else {}
        path = save_gguf(hf_model(kind, seed=3, **layers), tmp_path / "m.gguf", "Q4_0", MIXED)
        model = load_model(path, packed=True).model
        att = model.layers[0].attention
        types = {kernels.ggml_blocks(m.packed, m.qtype, m.in_features)[1] for m in (att.wq, att.wv)}
        assert att.wqkv is None and types == {6, 8}  # Q5_0, Q8_0
        assert (att.wq.qtype in kernels.INTERLEAVED.values()) == (activations != "f32" and kernels.isa() != "scalar")
        # q16: where the two paths' activations differ by a float rounding (attention summed in another
        # order), a block's two int8 roundings may move, each result by up to |W| . max|x| / 32512 (q8:
        # 128x more, but rarely, and not on this one layer); a wrong path is off by O(1)
        rtol = 1e-3 if activations == "q16" else 1e-5
        assert_fused_steps_equal_module_steps(model, isa, rtol=rtol)
        one = torch.arange(1, 9)[None]  # one row: the pieces' outputs written straight into their columns
        fused = decode_steps(model, torch.arange(8)[None], one, fused=True)[0]
        plain = decode_steps(model, torch.arange(8)[None], one, fused=False)[0]
        assert (fused - plain).abs().max().item() <= rtol * max(1.0, plain.abs().max().item())
        if activations != "f32":  # the paged script's long prompt chunks take the module path's exact sgemm
            return
        fused, fused_pool = paged_run(model, CompiledStep(model), isa)
        plain, plain_pool = paged_run(model, ModuleBackend(model), isa)
        for a, b in zip(fused + fused_pool, plain + plain_pool):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    finally:
        kernels.set_activations(previous)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("scheme", "dtype", "qtype"), [("bf16", torch.bfloat16, 30), ("f16", torch.float16, 1)])
def test_16bit_checkpoints_decode_compiled(tmp_path, isa, scheme, dtype, qtype):
    """A float checkpoint stored in bfloat16 (float16) keeps its matrices as 16-bit rows (nothing
    rounded) and decodes on the compiled step: equal to the module path, and to transformers in float32
    on the same stored weights."""
    hf = hf_model("mistral", seed=3)
    with torch.no_grad():  # the reference: float32 on the stored values (its rotary buffers unrounded)
        for p in hf.parameters():
            p.copy_(p.to(dtype).float())
    path = save_hf(copy.deepcopy(hf).to(dtype), tmp_path / "m")
    model = load_model(path, quant=scheme).model
    assert (
        model.layers[0].attention.wqkv.qtype == qtype and model.layers[0].attention_norm.weight.dtype == torch.float32
    )
    assert_fused_steps_equal_module_steps(model, isa)
    tokens = torch.tensor([[1, 5, 9, 33, 7, 60, 2]])
    with torch.inference_mode():
        want = hf(tokens).logits
        got = model(tokens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_16bit_packing_is_chosen_where_nothing_is_lost(tmp_path, monkeypatch):
    """api.load's choice for a float checkpoint: the dtype asked for; on "auto", bfloat16 where the CPU
    computes it, else the type the file stores (so a bfloat16 file stays exact); float32 files stay float
    on other CPUs, and "float32" always does."""
    import tramontane.device
    from tramontane.api import _float_packing

    hf = hf_model("mistral", seed=3)
    f32, b16 = save_hf(hf, tmp_path / "f32"), save_hf(hf.to(torch.bfloat16), tmp_path / "bf16")
    monkeypatch.setattr(tramontane.device, "cpu_supports_bf16", lambda: False)
    assert [_float_packing(f32, None), _float_packing(b16, "auto"), _float_packing(b16, "float32")] == [
        None,
        "bf16",
        None,
    ]
    assert [_float_packing(f32, "bfloat16"), _float_packing(f32, "float16")] == ["bf16", "f16"]
    monkeypatch.setattr(tramontane.device, "cpu_supports_bf16", lambda: True)
    assert _float_packing(f32, None) == "bf16"


def test_steps_follow_a_cache_that_grows_and_drops_rows(tmp_path):
    """The compiled step keeps a decoding loop's cache buffers between its steps: a cache that grows
    (new tensors) or drops a finished row (new tensors) must be read at its new addresses. Step by step
    as the offline loop does it, against the module path doing the same."""
    model = load_model(save_gguf(hf_model("llama", seed=3), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    tokens = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))

    def run(fused: bool) -> list[torch.Tensor]:
        backend, cache, rows, out = backend_of(model, fused), KVCache(model.config, 3, 4), [0, 1, 2], []
        with torch.inference_mode():
            for t in range(12):
                if t == 5:  # row 1 finished: the cache keeps rows 0 and 2 (new tensors)
                    cache.reorder(torch.tensor([0, 2]))
                    rows = [0, 2]
                cache.ensure_capacity(t + 1, limit=64)  # 4 -> 8 -> 16 slots (new tensors)
                step = tokens[rows, t : t + 1]
                out.append(model.logits(backend.decode(step, torch.full((len(rows), 1), t), cache))[:, -1])
        assert cache.size == 16 and cache.batch_size == 2
        return out

    for fused, plain in zip(run(True), run(False)):
        assert (fused - plain).abs().max().item() <= 1e-5 * max(1.0, plain.abs().max().item())


def assert_fused_steps_equal_module_steps(model, isa: str, rtol: float = 1e-5) -> None:
    """Decode steps through the compiled step and the module path give the same logits and caches (to
    `rtol` of their largest magnitude, or absolutely where that is below 1)."""
    assert isinstance(select_backend(model, KVCache, torch.float32), CompiledStep)
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
    assert (fused - plain)[valid].abs().max().item() <= rtol * max(1.0, scale), scale
    assert torch.equal(fused_cache.pos, plain_cache.pos)
    for a, b in zip(fused_cache.k + fused_cache.v, plain_cache.k + plain_cache.v):
        assert (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


def test_rolling_buffer(tmp_path):
    model = load_model(save_gguf(hf_model("mistral", seed=5), tmp_path / "m.gguf", "Q4_1"), packed=True).model
    tokens = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(20).repeat(2, 1)
    runs = []
    for fused in (True, False):
        backend = backend_of(model, fused)
        cache = KVCache(model.config, 2, 32)  # window 8 < 32: 8 slots, wrapping twice
        assert cache.rolling and cache.size == 8
        with torch.inference_mode():
            runs.append(
                torch.stack(
                    [
                        model.logits(backend.decode(tokens[:, t : t + 1], positions[:, t : t + 1], cache))[:, -1]
                        for t in range(20)
                    ]
                )
            )
    assert (runs[0] - runs[1]).abs().max().item() <= 1e-5 * max(1.0, runs[1].abs().max().item())


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_greedy_generation_is_the_same_with_and_without_the_fused_step(tmp_path, kind):
    path = save_gguf(hf_model(kind, seed=4), tmp_path / "m.gguf", "Q8_0")
    llm = LLM(load_model(path, packed=True), CharTokenizer())
    assert isinstance(llm.backend, CompiledStep)
    prompts = [[1, 5, 9, 33, 7], [1, 60, 2, 8]]
    fast = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=20, ignore_eos=True)]
    llm._generator.backend = ModuleBackend(llm.model)
    plain = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=20, ignore_eos=True)]
    assert fast == plain and all(len(t) == 20 for t in fast)


def chosen(model, cache_kind=KVCache, dtype=torch.float32) -> type:
    return type(select_backend(model, cache_kind, dtype))


def test_chosen_only_where_it_fits(tmp_path, monkeypatch):
    moe = load_model(save_gguf(hf_model("mixtral", seed=1), tmp_path / "x.gguf", "Q8_0"), packed=True).model
    assert chosen(moe) is CompiledStep  # packed experts, float32 router
    moe.layers[1].feed_forward.expert_range = (0, 4)  # a rank's half of the experts (expert parallelism)
    assert chosen(moe) is ModuleBackend
    dense = load_model(tmp_path / "x.gguf").model  # dequantized at load: nothing packed
    assert chosen(dense) is ModuleBackend
    monkeypatch.setattr(kernels, "_ext", None)
    path = save_gguf(hf_model("llama", seed=1), tmp_path / "l.gguf", "Q8_0")
    assert chosen(load_model(path, packed=True).model) is ModuleBackend


def test_caches_it_takes(tmp_path):
    model = load_model(save_gguf(hf_model("llama", seed=2), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    for kind in (KVCache, PagedCache):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, "q8_0"):
            assert chosen(model, kind, dtype) is CompiledStep
    assert chosen(model, Cache) is ModuleBackend  # a layout it does not know
    step, cache = CompiledStep(model), KVCache(model.config, 1, 8)
    with pytest.raises(TypeError, match="one token per row"):
        step.decode(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], cache)  # a prefill chunk


def test_int4_swap_installs_it_on_float32_models():
    from tramontane.build.random import random_model
    from tramontane.config import ModelConfig

    config = ModelConfig(
        dim=64,
        n_layers=2,
        head_dim=16,
        hidden_dim=128,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=96,
        norm_eps=1e-5,
        rope_theta=1e4,
        max_seq_len=64,
    )
    assert chosen(random_model(config, quant="int4")) is CompiledStep
    assert chosen(random_model(config, dtype=torch.bfloat16, quant="int4")) is ModuleBackend  # bf16 norms


def test_server_and_offline_pick_through_the_same_call(tmp_path, caplog):
    """A dense packed model: offline generation runs the compiled step; the server engine asks the same
    `select_backend` for its paged cache, gets the compiled step too, and says so in its start-up log
    line. Both answer alike."""
    import asyncio
    import logging

    from tramontane.decoding.sampling import SamplingParams
    from tramontane.engine import AsyncEngine, EngineRequest

    llm = LLM(
        load_model(save_gguf(hf_model("mistral", seed=4), tmp_path / "m.gguf", "Q8_0"), packed=True), CharTokenizer()
    )
    with caplog.at_level(logging.INFO, logger="tramontane.engine"):
        engine = AsyncEngine(llm, model_name="tiny", kv_cache_memory=1 << 22, block_size=4)
    assert isinstance(llm.backend, CompiledStep) and isinstance(engine.backend, CompiledStep)
    assert "decode backend: compiled (paged cache; offline generation: compiled)" in caplog.text

    prompt = [1, 5, 9, 33, 7]
    offline = llm.generate([prompt], temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids

    async def serve_one():
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            return [t async for out in engine.generate(EngineRequest("r", prompt, params)) for t in out.token_ids]
        finally:
            await engine.shutdown(1.0)

    assert asyncio.run(serve_one()) == offline


@pytest.mark.parametrize(("kind", "targets"), [("llama", None), ("mixtral", ("w1", "w2", "w3"))])
def test_a_module_swap_after_loading_is_seen(tmp_path, kind, targets):
    """LoRA applied to `llm.model` directly (not through `llm.load_adapter`): the next generation picks
    its backend again instead of running the compiled step over the base weights: a compiled step that
    carries the adapter (Llama: every projection), or the module path (Mixtral: adapters on the experts
    only, which swap no module: the block's experts gain an `expert_lora`, which the step does not run)."""
    from tramontane.lora.layers import LoraSpec, apply_lora

    llm = LLM(load_model(save_gguf(hf_model(kind, seed=6), tmp_path / "m.gguf", "Q8_0"), packed=True), CharTokenizer())
    assert isinstance(llm.backend, CompiledStep) and llm.backend.current()
    prompt = [1, 5, 9, 33, 7]
    base = llm.generate([prompt], temperature=0, max_tokens=8, ignore_eos=True)[0].token_ids
    apply_lora(llm.model, LoraSpec(rank=2) if targets is None else LoraSpec(rank=2, targets=targets), "a", seed=0)
    gen = torch.Generator().manual_seed(1)
    for name, p in llm.model.named_parameters():  # make the adapter matter: B = 0 would change nothing
        if "lora_B" in name:
            p.data.normal_(0, 2.0, generator=gen)
    from tramontane.lora.layers import set_active

    set_active(llm.model, "a")
    assert not llm.backend.current()
    adapted = llm.generate([prompt], temperature=0, max_tokens=8, ignore_eos=True)[0].token_ids
    assert type(llm.backend) is (ModuleBackend if kind == "mixtral" else CompiledStep)
    assert llm.backend.current()
    with torch.inference_mode():
        ids = torch.tensor([prompt + adapted[:-1]])
        expected = llm.model(ids)[0, len(prompt) - 1 :].argmax(-1).tolist()
    assert adapted == expected and adapted != base


def test_replaced_packed_rows_are_not_read_from_the_old_address(tmp_path):
    """The step keeps the weights' addresses: a packed tensor replaced in place of the module (same
    module object) makes the backend stale, and the next generation runs on the new rows."""
    llm = LLM(
        load_model(save_gguf(hf_model("llama", seed=6), tmp_path / "m.gguf", "Q8_0"), packed=True), CharTokenizer()
    )
    w2 = llm.model.layers[0].feed_forward.w2
    w2.packed = w2.packed.clone()  # the same values at a new address
    assert not llm.backend.current()
    llm.generate([[1, 5, 9]], temperature=0, max_tokens=2, ignore_eos=True)
    assert isinstance(llm.backend, CompiledStep) and llm.backend.current()


def test_staleness_is_seen_through_registrations_and_plain_attributes(tmp_path):
    """current() rescans the watched modules only after a registration somewhere: a module created
    elsewhere leaves the step current; a norm weight swapped as a new Parameter makes it stale; so does
    a Mixtral block given a range of experts (a plain attribute, no registration), until it is put back."""
    model = load_model(save_gguf(hf_model("mixtral", seed=6), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    step = CompiledStep(model)
    assert step.current()
    torch.nn.Linear(2, 2)  # registrations that touch nothing the step reads
    assert step.current()
    ff = model.layers[1].feed_forward
    whole, ff.expert_range = ff.expert_range, (0, 1)
    assert not step.current()
    ff.expert_range = whole
    assert step.current()
    norm = model.layers[0].ffn_norm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())
    assert not step.current() and CompiledStep(model).current()


# ---- the paged pool (the serving engine's cache) ---------------------------------------------------------

# Steps of the paged script: per step, (sequence, tokens) pairs. Prefill chunks beside decode tokens,
# a sequence joining late, then decoding past the window (8 for the tiny Mistral) so blocks fall out;
# last, chunks past the window (each row's keys start elsewhere) and longer than an attention tile (8).
PAGED_SCRIPT = [[(0, 5), (1, 3)], [(0, 1), (1, 4), (2, 2)], [(1, 1), (2, 6)]] + [[(0, 1), (1, 1), (2, 1)]] * 9
PAGED_SCRIPT += [[(0, 1), (1, 6), (2, 10)]]


def paged_run(model, backend, isa: str, block_size: int = 4, adapters: list[str | None] | None = None, kv: str = "f32"):
    """Run PAGED_SCRIPT through `backend` on a fresh pool (storing keys as `kv`) whose blocks are handed
    out shuffled; blocks wholly before a sequence's window are released (-1) as the scheduler releases
    them. Logits [N,V] per step and the pool (read back as floats). `adapters`: each sequence's LoRA
    adapter (None: the base model), set per row."""
    config, kind = model.config, kv_type(kv)
    blocks, gen = 40, torch.Generator().manual_seed(7)
    free = torch.randperm(blocks, generator=gen).tolist()
    shape = (blocks, config.n_kv_heads, block_size, kind.width(config.head_dim))
    k = [torch.zeros(shape, dtype=kind.storage) for _ in range(config.n_layers)]
    v = [torch.zeros(shape, dtype=kind.storage) for _ in range(config.n_layers)]
    tables, done, window = [[] for _ in range(3)], [0, 0, 0], config.sliding_window
    tokens = torch.randint(3, config.vocab_size, (3, 64), generator=gen)
    out = []
    prev = kernels.extension().set_isa(isa)
    try:
        for step in PAGED_SCRIPT:
            seq, pos, ids = [], [], []
            for i, (r, n) in enumerate(step):
                while len(tables[r]) * block_size < done[r] + n:
                    tables[r].append(free.pop())
                if window is not None:  # blocks wholly before the first key this step's tokens may see
                    for j in range(max(0, done[r] - window + 1) // block_size):
                        tables[r][j] = -1
                seq += [i] * n
                pos += list(range(done[r], done[r] + n))
                ids += tokens[r, done[r] : done[r] + n].tolist()
                done[r] += n
            width = max(len(tables[r]) for r, _ in step)
            table = torch.tensor([tables[r] + [-1] * (width - len(tables[r])) for r, _ in step], dtype=torch.int32)
            positions = torch.tensor(pos)
            cache = PagedCache(k, v, block_size, table, torch.tensor(seq, dtype=torch.int32), positions, window, kind)
            if adapters is not None:
                names = sorted({a for a in adapters if a is not None})
                slot = [names.index(adapters[r]) if adapters[r] is not None else -1 for r, _ in step]
                set_rows(model, torch.tensor([slot[i] for i in seq]), names)
            with torch.inference_mode():
                out.append(model.logits(backend.prefill(torch.tensor(ids)[None], positions[None], cache)[0]))
    finally:
        kernels.extension().set_isa(prev)
    return out, [kind.decode(t).float() for t in k + v]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "qtype", "overrides"),
    [
        ("mistral", "Q4_0", {}),
        ("llama", "Q4_1", {}),
        ("mixtral", "Q8_0", {}),
        ("mixtral", "Q4_0", {"num_experts_per_tok": 3}),
    ],
)
def test_paged_steps_equal_module_steps(tmp_path, isa, kind, qtype, overrides):
    """Mixed prefill and decode steps of three sequences on the paged pool, through the compiled step
    and through the module path: the same logits and the same pool (to 1e-5 of their scale). The tiny
    Mistral's window (8) is smaller than the context (20), so its early blocks are released mid-run."""
    model = load_model(save_gguf(hf_model(kind, seed=3, **overrides), tmp_path / "m.gguf", qtype), packed=True).model
    assert (model.config.sliding_window is not None) == (kind == "mistral")
    fused, fused_pool = paged_run(model, CompiledStep(model), isa)
    plain, plain_pool = paged_run(model, ModuleBackend(model), isa)
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    for a, b in zip(fused_pool, plain_pool):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_rope_rows_are_rope_cos_sin_bit_for_bit(tmp_path):
    """The compiled step reads RoPE's (cos, sin) from a table of positions 0.. (grown as positions do):
    each row is what rope_cos_sin gives that position alone, bit for bit, before and after the table
    grows, in any order and with padding (-1) beside."""
    from tramontane.model.layers import rope_cos_sin

    model = load_model(save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    step = CompiledStep(model)
    for positions, span in (([0, 5, 255], None), ([7, 1000, -1], 1001), ([3, 4], 5), ([70000], None)):
        got = step._cos_sin(torch.tensor(positions), span)
        for row, p in zip(got, positions):
            if p >= 0:
                alone = torch.view_as_real(rope_cos_sin(torch.tensor([[p]]), model.inv_freq))[0, 0, 0]
                assert torch.equal(row, alone), p
    assert step._rope[2].shape[0] >= 70001


def test_paged_steps_follow_a_new_pool(tmp_path):
    """The compiled step keeps a pool's buffers between serving steps: a second pool (another engine on
    the same model) must be read and written at its own addresses, not the first's."""
    model = load_model(save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    backend = CompiledStep(model)
    first, first_pool = paged_run(model, backend, "best")
    second, second_pool = paged_run(model, backend, "best")  # a fresh pool, the same backend
    plain, plain_pool = paged_run(model, ModuleBackend(model), "best")
    for run, pool in ((first, first_pool), (second, second_pool)):
        for a, b in zip(run + pool, plain + plain_pool):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


# Keys stored rounded: the compiled step and the module path round keys they computed in a different
# order, so a key a hair from a rounding boundary lands on either side (one step of the type); logits
# then differ by more than float32 rounding (measured at most 3.2e-3 of their scale, Q8_0), and by the
# type's own error from the float32 cache's (bf16 7e-3, f16 2.2e-3, Q8_0 3.2e-2 on these models).
# test_quant_kernels.py checks the kernel strictly, over the keys as it stored them.
KV_CROSS = {"bf16": 1e-2, "f16": 1e-2, "q8_0": 1e-2}
KV_VS_F32 = {"bf16": 2e-2, "f16": 6e-3, "q8_0": 8e-2}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", ["bf16", "f16", "q8_0"])
@pytest.mark.parametrize("kind", ["mistral", "llama"])
def test_steps_on_each_kv_type(tmp_path, isa, kv, kind):
    """Offline decode steps and paged mixed steps on caches storing bf16, f16 or q8_0 keys (head dim 32,
    a Q8_0 block): the compiled step and the module path agree, and stay within the type's error of the
    float32 cache's logits."""
    gguf = save_gguf(hf_model(kind, seed=3, hidden_size=128), tmp_path / "m.gguf", "Q8_0")
    model = load_model(gguf, packed=True).model
    tokens = torch.randint(0, model.config.vocab_size, (3, 14), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(14).repeat(3, 1)
    prev = kernels.extension().set_isa(isa)
    try:
        runs = {
            (fused, k): decode_steps(model, positions, tokens, fused, k)[0]
            for fused in (True, False)
            for k in ("f32", kv)
        }
    finally:
        kernels.extension().set_isa(prev)
    scale = runs[False, "f32"].abs().max().item()
    assert (runs[True, kv] - runs[False, kv]).abs().max().item() <= KV_CROSS[kv] * scale
    assert (runs[True, kv] - runs[False, "f32"]).abs().max().item() <= KV_VS_F32[kv] * scale
    assert (runs[True, kv] - runs[True, "f32"]).abs().max().item() > 1e-6 * scale  # the rounding happened
    fused, fused_pool = paged_run(model, CompiledStep(model), isa, kv=kv)
    plain, plain_pool = paged_run(model, ModuleBackend(model), isa, kv=kv)
    for a, b in zip(fused, plain):
        assert (a - b).abs().max().item() <= KV_CROSS[kv] * max(1.0, b.abs().max().item())
    for a, b in zip(fused_pool, plain_pool):  # the keys each stored: within one rounding step
        assert (a - b).abs().max().item() <= KV_CROSS[kv] * max(1.0, b.abs().max().item())


def adapted_model(tmp_path, kind: str, qtype: str, targets: tuple[str, ...]):
    """A packed tiny model with two LoRA adapters of different ranks on `targets` whose B are random
    (PEFT starts B at zero, which would change nothing)."""
    model = load_model(save_gguf(hf_model(kind, seed=3), tmp_path / "m.gguf", qtype), packed=True).model
    apply_lora(model, LoraSpec(rank=4, alpha=8, targets=targets), "a", seed=1)
    apply_lora(model, LoraSpec(rank=2, alpha=3, targets=targets[1:]), "b", seed=2)
    gen = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=gen)
    return model


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "qtype", "targets"),
    [
        ("mistral", "Q4_0", ("wq", "wk", "wv", "wo", "w1", "w2", "w3")),  # window 8 < 20
        ("llama", "Q8_0", ("wq", "wv", "w2")),  # some parts of the fused projections only
        ("mixtral", "Q4_1", ("wq", "wk", "wv", "wo")),  # attention adapters beside the routed experts
    ],
)
def test_paged_steps_with_mixed_adapters_equal_module_steps(tmp_path, isa, kind, qtype, targets):
    """Three sequences with adapter a, none and b in the same steps: the compiled step carries the
    adapters (no fallback) and computes what the module path's LoRA wrappers do."""
    model = adapted_model(tmp_path, kind, qtype, targets)
    step = CompiledStep(model)
    assert CompiledStep.fits(model) and step.adapters == ["a", "b"]
    fused, fused_pool = paged_run(model, step, isa, adapters=["a", None, "b"])
    plain, plain_pool = paged_run(model, ModuleBackend(model), isa, adapters=["a", None, "b"])
    base = paged_run(model, ModuleBackend(model), isa, adapters=[None, None, None])[0]
    for a, b, c in zip(fused, plain, base):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
        assert (b - c).abs().max().item() > 1e-3  # the adapters matter
    for a, b in zip(fused_pool, plain_pool):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_adapter_changes_make_the_step_stale(tmp_path, monkeypatch):
    """An in-place update of an adapter (an optimizer step) or a new adapter: the step that copied them
    is no longer current. A row naming a slot the step does not hold is refused by the kernel."""
    model = adapted_model(tmp_path, "llama", "Q8_0", ("wq", "wo", "w1"))
    step = CompiledStep(model)
    assert step.current()
    with torch.no_grad():
        model.layers[1].attention.wo.lora_B["a"].add_(1.0)
    assert not step.current()
    step = CompiledStep(model)
    apply_lora(model, LoraSpec(rank=2, targets=("w2",)), "c", seed=3)
    assert not step.current() and CompiledStep(model).adapters == ["a", "b", "c"]
    step = CompiledStep(model)
    monkeypatch.setattr("tramontane.quant.step.row_slots", lambda *_: torch.tensor([0, 7], dtype=torch.int32))
    cache = KVCache(model.config, 2, 8)
    with pytest.raises(ValueError, match="row 1: adapter slot 7 is out of range"), torch.inference_mode():
        step.decode(torch.tensor([[3], [4]]), torch.tensor([[0], [0]]), cache)


def test_paged_rows_out_of_range_are_refused(tmp_path):
    """The kernel checks each row's sequence, its table's blocks and its span before reading the pool."""
    model = load_model(save_gguf(hf_model("llama", seed=2), tmp_path / "m.gguf", "Q8_0"), packed=True).model
    step, config = CompiledStep(model), model.config
    pool = [torch.zeros(2, config.n_kv_heads, 4, config.head_dim) for _ in range(config.n_layers)]

    def run(table, seq, positions):
        cache = PagedCache(
            pool,
            pool,
            4,
            torch.tensor(table, dtype=torch.int32),
            torch.tensor(seq, dtype=torch.int32),
            torch.tensor(positions),
            None,
        )
        with torch.inference_mode():
            return step.prefill(torch.zeros(1, len(positions), dtype=torch.long), torch.tensor(positions)[None], cache)

    assert run([[1, 0]], [0, 0], [4, 5]).shape == (1, 2, config.dim)
    for table, seq, positions in [
        ([[1, 2]], [0], [5]),  # block 2 of a 2-block pool
        ([[1, -1]], [0], [5]),  # a released block inside the span
        ([[1]], [0], [4]),  # position past the table
        ([[1, 0]], [1], [1]),  # no table 1
    ]:
        with pytest.raises(ValueError, match="out of range"):
            run(table, seq, positions)
    wide = PagedCache(pool, pool, 4, torch.tensor([[1, 0]]), torch.tensor([0]), torch.tensor([5]), None)  # int64
    with pytest.raises(TypeError, match="int32"), torch.inference_mode():
        step.prefill(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[5]]), wide)


def offline_prefill(model, backend, prompts: list[list[int]], capacity: int = 32, kv: str = "f32"):
    """Right-padded prompts [B,T] in one chunk on a fresh offline cache (keys stored as `kv`): logits
    [B,T,V] and the cache."""
    width = max(map(len, prompts))
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    positions = torch.tensor([list(range(len(p))) + [-1] * (width - len(p)) for p in prompts])
    cache = KVCache(model.config, len(prompts), capacity, kv)
    cache.prompts = torch.tensor([len(p) for p in prompts], dtype=torch.int32)  # as the offline generator says
    with torch.inference_mode():
        return model.logits(backend.prefill(tokens, positions, cache)), cache


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("kind", "qtype"), [("mistral", "Q4_0"), ("llama", "Q8_0"), ("mixtral", "Q4_1")])
def test_offline_prompt_chunks_run_compiled(tmp_path, isa, kind, qtype):
    """Offline prompt chunks of several prompts (right-padded; the tiny Mistral's window 8 < 13 tokens)
    run as mapped rows of the compiled step: the logits and the cache the module path gives."""
    model = load_model(save_gguf(hf_model(kind, seed=3), tmp_path / "m.gguf", qtype), packed=True).model
    prompts = [[1, 5, 9, 33, 7, 12, 40, 2, 2, 8, 31, 17, 3], [1, 60, 2, 8], [4, 4, 50]]
    prev = kernels.extension().set_isa(isa)
    try:
        fused, fused_cache = offline_prefill(model, CompiledStep(model), prompts)
        plain, plain_cache = offline_prefill(model, ModuleBackend(model), prompts)
    finally:
        kernels.extension().set_isa(prev)
    for b, p in enumerate(prompts):
        a, e = fused[b, : len(p)], plain[b, : len(p)]
        assert (a - e).abs().max().item() <= 1e-5 * max(1.0, e.abs().max().item())
    assert torch.equal(fused_cache.pos, plain_cache.pos)
    for a, e in zip(fused_cache.k + fused_cache.v, plain_cache.k + plain_cache.v):
        assert (a - e).abs().max().item() <= 1e-5 * max(1.0, e.abs().max().item())


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
def test_one_long_prompt_runs_compiled_where_every_matrix_has_an_integer_kernel(tmp_path, monkeypatch):
    """One prompt of more tokens than the packed kernels' M: compiled under int8 activations (every
    matrix of the blocks on its integer kernel at any M: the compiled tiles are faster than sgemm there),
    equal to the module path; on the module path under the exact setting and for a bfloat16 checkpoint
    (no integer kernel: its sgemm is faster) where the pass has a dense route (AVX2; AVX-512 has none:
    its packed kernels run every chunk), and for the bfloat16 one where torch's bfloat16 GEMM runs."""
    prompt = [(7 * i) % 90 + 3 for i in range(80)]  # past DEQUANTIZE_ABOVE_M where the pass has one (AVX2)
    dense_route = kernels.use_dense(len(prompt))
    assert dense_route or kernels.DEQUANTIZE_ABOVE_M[kernels.isa()] is None  # AVX-512: compiled at any M
    calls: list[int] = []
    chunk = CompiledStep._offline_chunk
    monkeypatch.setattr(CompiledStep, "_offline_chunk", lambda self, *a: calls.append(1) or chunk(self, *a))
    previous = kernels.set_activations("q8")
    try:
        model = load_model(save_gguf(hf_model("llama", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True).model
        fused, _ = offline_prefill(model, CompiledStep(model), [prompt], capacity=96)
        assert calls == [1]
        plain, _ = offline_prefill(model, ModuleBackend(model), [prompt], capacity=96)
        # int8 activations: where a block's largest |x| moves by a rounding (attention summed in another
        # order), its scale and all 32 roundings move: measured 1.2-1.4% of the logits' scale on one of
        # the 80 rows, 0 on the others; a wrong path is off by O(1)
        assert (fused - plain).abs().max().item() <= 0.03 * plain.abs().max().item()
        kernels.set_activations("f32")
        offline_prefill(model, CompiledStep(model), [prompt], capacity=96)
        assert len(calls) == (1 if dense_route else 2)  # the exact setting: the module path's sgemm
        kernels.set_activations("q8")
        bf16 = load_model(save_hf(hf_model("llama", seed=3).to(torch.bfloat16), tmp_path / "b"), quant="bf16").model
        before = len(calls)
        offline_prefill(bf16, CompiledStep(bf16), [prompt], capacity=96)
        module = dense_route or kernels.bf16_gemm(kernels.BF16, len(prompt))  # torch's bf16 GEMM there
        assert len(calls) == before + (0 if module else 1)
    finally:
        kernels.set_activations(previous)


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
def test_a_long_chunk_gives_the_same_bits_on_one_thread_and_two(tmp_path):
    """80 rows in one chunk: from 64 rows on, the norms, residual adds and gating split their rows over
    the threads, and every packed matmul's activation rounding too; each row's arithmetic stays its own,
    so the bits do not depend on the thread count (a wrong split is off by O(1))."""
    prompt = [(7 * i) % 90 + 3 for i in range(80)]
    model = load_model(save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True).model
    previous = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = offline_prefill(model, CompiledStep(model), [prompt], capacity=96)[0]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out[1], out[2])


@pytest.mark.skipif(not kernels.available(), reason="no compiled step")
def test_chunks_on_four_threads_at_once_give_the_bits_they_give_alone(tmp_path):
    """The block step keeps its scratch from one call to the next, lent to one call at a time; a call
    finding it lent mallocs its own (block_step.c, scratch_take). Four Python threads prefilling at once
    (the binding lets the GIL go over the blocks, 90% of a prefill here; no window, so that the chunks
    run compiled), prompts of 45 to 90 tokens so that the kept block grows while others may hold one,
    each get the logits they get alone (a scratch lent to two at once mixes their rows)."""
    wide = hf_model("llama", seed=3, hidden_size=512, intermediate_size=1536, num_attention_heads=8)
    model = load_model(save_gguf(wide, tmp_path / "m.gguf", "Q4_0"), packed=True).model  # blocks: most of the time
    prompts = [[(7 * i) % 90 + 3 for i in range(n)] for n in (90, 60, 75, 45)]
    alone = [offline_prefill(model, CompiledStep(model), [p], capacity=96)[0] for p in prompts]
    got: list[list[torch.Tensor]] = [[] for _ in prompts]

    def work(j: int) -> None:
        for _ in range(12):
            got[j].append(offline_prefill(model, CompiledStep(model), [prompts[j]], capacity=96)[0])

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, want in enumerate(alone):
        assert len(got[j]) == 12
        assert all(torch.equal(x, want) for x in got[j]), j


def test_a_windowed_chunk_computes_alike_in_any_row_order_and_thread_count(tmp_path):
    """A served chunk of 63 rows of one sequence (positions 10..72, after a first chunk of 10) beside
    another sequence's token, the window (8) shorter than the chunk: every row's keys start elsewhere, so
    each row attends in a tile of its own, yet its keys include the chunk's earlier rows, which must all
    be stored before any row attends (block_step.c lets each attention item rotate and store its own row
    only where no two rows share a sequence). The chunk's rows in reverse order, on one thread and on
    two (64 rows: the attention runs on both), give each row the bits it gets in order."""
    model = load_model(save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True).model
    config, bs = model.config, 4
    assert config.sliding_window == 8
    tokens = [(5 * i) % 90 + 3 for i in range(73)]
    tables = torch.tensor([list(range(19)), [19] + [-1] * 18], dtype=torch.int32)

    def run(order: list[int]) -> torch.Tensor:
        pool = [torch.zeros(20, config.n_kv_heads, bs, config.head_dim) for _ in range(2 * config.n_layers)]
        step = CompiledStep(model)
        chunk = [(0, p, tokens[p]) for p in order] + [(1, 0, 17)]
        for rows in ([(0, p, tokens[p]) for p in range(10)], chunk):
            seq, pos, ids = (list(c) for c in zip(*rows))
            positions = torch.tensor(pos)
            cache = PagedCache(pool[::2], pool[1::2], bs, tables, torch.tensor(seq, dtype=torch.int32), positions, 8)
            with torch.inference_mode():
                logits = model.logits(step.prefill(torch.tensor(ids)[None], positions[None], cache)[0])
        return logits

    ascending = list(range(10, 73))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = run(ascending)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = run(ascending[::-1])
            assert torch.equal(got[:63].flip(0), want[:63]) and torch.equal(got[63], want[63]), threads
            assert torch.equal(run(ascending), want), threads
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("activations", ["q8", "q16"])
def test_a_prompt_computes_offline_as_served(tmp_path, activations):
    """With integer activations (either setting) every row's arithmetic is the same whatever shares its step: a prompt
    prefilled offline beside another, and the same prompt as a chunk of a serving step beside another
    sequence's tokens, give the same bits (the served answer equals the offline one)."""
    model = load_model(save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True).model
    step, prompt = CompiledStep(model), [1, 5, 9, 33, 7, 12]
    previous = kernels.set_activations(activations)
    try:
        offline, _ = offline_prefill(model, step, [prompt, [4, 4, 50, 9]])
        config = model.config
        pool = [torch.zeros(8, config.n_kv_heads, 4, config.head_dim) for _ in range(2 * config.n_layers)]
        tables = torch.tensor([[5, 6], [2, -1]], dtype=torch.int32)
        seq = torch.tensor([0] * 6 + [1] * 3, dtype=torch.int32)
        positions = torch.tensor(list(range(6)) + [0, 1, 2])
        cache = PagedCache(pool[::2], pool[1::2], 4, tables, seq, positions, config.sliding_window)
        with torch.inference_mode():
            served = model.logits(step.prefill(torch.tensor(prompt + [8, 8, 3])[None], positions[None], cache)[0])
    finally:
        kernels.set_activations(previous)
    assert torch.equal(served[:6], offline[0, :6])


def _paged_step(model, step, chunks: list[list[int]]) -> torch.Tensor:
    """One serving step on a fresh pool: each sequence's tokens from position 0 (blocks of 4 in turn), its
    prompt."""
    config, bs = model.config, 4
    blocks = [-(-len(c) // bs) for c in chunks]
    pool = [torch.zeros(sum(blocks), config.n_kv_heads, bs, config.head_dim) for _ in range(2 * config.n_layers)]
    starts = [sum(blocks[:i]) for i in range(len(chunks))]
    tables = torch.tensor([[s + j for j in range(max(blocks))] for s in starts], dtype=torch.int32)
    seq = torch.tensor([i for i, c in enumerate(chunks) for _ in c], dtype=torch.int32)
    positions = torch.tensor([p for c in chunks for p in range(len(c))])
    prompts = torch.tensor([len(c) for c in chunks], dtype=torch.int32)
    cache = PagedCache(pool[::2], pool[1::2], bs, tables, seq, positions, config.sliding_window, prompts=prompts)
    with torch.inference_mode():
        return model.logits(step.prefill(torch.tensor(sum(chunks, []))[None], positions[None], cache)[0])


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
def test_tiles_take_a_long_prompt_chunk_and_leave_the_step_s_other_rows(tmp_path):
    """Where the CPU has AMX-BF16 tiles, a serving step's prompt chunk of tiles_from() tokens or more
    takes them (as the same prompt does offline), while the step's other sequences' rows keep the
    integer kernels: their bits are those of a step without the chunk, so a decoded token does not
    depend on the prompts that share its step. Elsewhere every row keeps the integer kernels."""
    model = load_model(save_gguf(hf_model("llama", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True).model
    step = CompiledStep(model)
    previous = kernels.set_activations("q16")
    try:
        first = kernels.tiles_from() or 64
        prompt, others = [(7 * i) % 90 + 3 for i in range(first)], [[5], [9, 4]]
        mixed = _paged_step(model, step, [*others[:1], prompt, *others[1:]])
        alone = _paged_step(model, step, others)
        with torch.inference_mode():  # the rows' logits as a 2-D batch, as a serving step takes them
            cache = KVCache(model.config, 1, first + 8)
            cache.prompts = torch.tensor([first], dtype=torch.int32)
            offline = model.logits(step.prefill(torch.tensor([prompt]), torch.arange(first)[None], cache)[0])
        was = kernels.extension().set_tiles(False)
        try:
            integer = _paged_step(model, step, [*others[:1], prompt, *others[1:]])
        finally:
            kernels.extension().set_tiles(was)
    finally:
        kernels.set_activations(previous)
    chunk = slice(1, 1 + first)
    assert torch.equal(torch.cat([mixed[:1], mixed[1 + first :]]), alone)
    assert torch.equal(mixed[chunk], offline)
    if kernels.extension().tiles_ok(64, 64, 2):  # the tiles ran: bfloat16 roundings
        assert not torch.equal(mixed[chunk], integer[chunk])
        assert (mixed[chunk] - integer[chunk]).abs().max() <= 0.05 * integer[chunk].abs().max()
    else:
        assert torch.equal(mixed, integer)


def _paged_steps(model, step, prompt: list[int], cuts: list[int], length: int) -> torch.Tensor:
    """A sequence of `prompt` then more tokens (`length` in all; a recomputed answer's) through serving
    steps on one pool, cut at `cuts`: the logits of every position, each from the step that ran it."""
    config, bs = model.config, 4
    tokens = [*prompt, *((5 * i) % 80 + 2 for i in range(length - len(prompt)))]
    pool = [torch.zeros(-(-length // bs), config.n_kv_heads, bs, config.head_dim) for _ in range(2 * config.n_layers)]
    tables = torch.arange(-(-length // bs), dtype=torch.int32)[None]
    logits = []
    for start, end in zip([0, *cuts], [*cuts, length]):
        positions = torch.arange(start, end)
        seq = torch.zeros(end - start, dtype=torch.int32)
        prompts = torch.tensor([len(prompt)], dtype=torch.int32)
        cache = PagedCache(pool[::2], pool[1::2], bs, tables, seq, positions, config.sliding_window, prompts=prompts)
        with torch.inference_mode():
            logits.append(model.logits(step.prefill(torch.tensor(tokens[start:end])[None], positions[None], cache)[0]))
    return torch.cat(logits)


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
def test_a_long_prompt_computes_alike_however_it_is_chunked(tmp_path):
    """The tiles' rule is the prompt's, not the chunk's: a prompt of tiles_from() tokens or more gives the
    same bits in one step, cut 60 + 14 (a tail chunk of fewer rows than tiles_from()) and cut 72 + 2 (the
    few tokens past a prefix-cache hit), and as the offline prefill gives them. A recomputed answer's
    tokens (past the prompt, in the prompt's step) keep the integer kernels: the bits of decoding them a
    token a step. Where the tiles run, the prompt's rows differ from the tiles switched off."""
    model = load_model(save_gguf(hf_model("llama", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True).model
    step = CompiledStep(model)
    previous = kernels.set_activations("q16")
    try:
        ran = kernels.tiles_from() > 0  # (under these activations)
        n = max(kernels.tiles_from(), 64) + 10
        prompt = [(7 * i) % 90 + 3 for i in range(n)]
        whole = _paged_steps(model, step, prompt, [], n + 20)
        tail = _paged_steps(model, step, prompt, [60], n + 20)
        hit = _paged_steps(model, step, prompt, [n - 2, n + 5], n + 20)
        decoded = _paged_steps(model, step, prompt, list(range(n, n + 20)), n + 20)  # then a token a step
        cache = KVCache(model.config, 1, n + 8)
        cache.prompts = torch.tensor([n], dtype=torch.int32)
        with torch.inference_mode():  # the rows' logits as a 2-D batch, as a serving step takes them
            offline = model.logits(step.prefill(torch.tensor([prompt]), torch.arange(n)[None], cache)[0])
        was = kernels.extension().set_tiles(False)
        try:
            integer = _paged_steps(model, step, prompt, [], n + 20)
        finally:
            kernels.extension().set_tiles(was)
    finally:
        kernels.set_activations(previous)
    assert torch.equal(tail, whole) and torch.equal(hit, whole) and torch.equal(decoded, whole)
    assert torch.equal(offline, whole[:n])
    assert torch.equal(whole[:n], integer[:n]) != ran


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
def test_offline_answers_to_long_prompts_do_not_depend_on_the_prefill_chunk(tmp_path, monkeypatch):
    """The offline generator tells the step its prompts (KVCache.prompts): prompts of 70 and 90 tokens
    prefilled in chunks of 512 and of 30 (tails of 10 and 30 rows) give the same tokens and logprobs."""
    from tramontane.decoding import offline

    llm = LLM(
        load_model(save_gguf(hf_model("llama", seed=3), tmp_path / "m.gguf", "Q4_0"), packed=True), CharTokenizer()
    )
    prompts = [[(7 * i + j) % 90 + 3 for i in range(n)] for j, n in enumerate((70, 90))]
    previous = kernels.set_activations("q16")
    try:
        runs = []
        for chunk in (512, 30):
            monkeypatch.setattr(offline, "PREFILL_CHUNK", chunk)
            got = llm.generate(prompts, temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
            runs.append([(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in got])
    finally:
        kernels.set_activations(previous)
    assert runs[0] == runs[1]


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
@pytest.mark.parametrize(
    ("kind", "dim", "window", "kv"),
    [("mistral", 128, 40, "f32"), ("llama", 256, None, "f32"), ("llama", 256, None, "bf16")]
    + [("mistral", 128, 40, "q8_0"), ("llama", 256, None, "q8_0")],
)
def test_a_long_prompt_on_tiles_stays_near_transformers(tmp_path, kind, dim, window, kv):
    """A prompt chunk of 80 tokens with heads of 32 and 64 elements (the tiles' attention needs a multiple
    of 32; the other tests' tiny heads of 16 never take it), a window of 40 and none: where the CPU has
    AMX-BF16, projections and attention on bfloat16 tiles. Against the exact float32 path on the same
    file and cache type, the integer kernels stay within 2% of the logits' scale (the tiles read a
    bfloat16 cache's own rows, a Q8_0 cache's decoded to float32); the tiles within what bfloat16 itself
    costs this model (random weights, large activations: sensitive), which transformers' bfloat16 run of
    it measures against its float32 one, plus what the cache type costs the exact path; and they differ
    from the integer kernels (the tiles ran)."""
    overrides = {"hidden_size": dim, "num_attention_heads": 4, "num_key_value_heads": 2}
    hf = hf_model(kind, seed=5, **overrides, **({"sliding_window": window} if window else {}))
    model = load_model(save_gguf(hf, tmp_path / "m.gguf", "Q8_0"), packed=True).model
    prompt = [(11 * i) % 90 + 3 for i in range(80)]
    step, previous = CompiledStep(model), kernels.set_activations("f32")
    try:
        want = offline_prefill(model, ModuleBackend(model), [prompt], capacity=96, kv=kv)[0][0]
        kv_cost = (want - offline_prefill(model, ModuleBackend(model), [prompt], capacity=96)[0][0]).abs().max()
        kernels.set_activations("q16")
        tiles = offline_prefill(model, step, [prompt], capacity=96, kv=kv)[0][0]
        if kv == "bf16" and kernels.extension().tiles_ok(64, 64, 2):  # the tiles round float32 keys alike
            assert torch.equal(tiles, offline_prefill(model, step, [prompt], capacity=96)[0][0])
        was = kernels.extension().set_tiles(False)
        try:
            integer = offline_prefill(model, step, [prompt], capacity=96, kv=kv)[0][0]
        finally:
            kernels.extension().set_tiles(was)
    finally:
        kernels.set_activations(previous)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        bf16_cost = (hf.to(torch.bfloat16)(ids).logits[0].float() - hf.float()(ids).logits[0]).abs().max()
    scale = want.abs().max()
    # measured here: tiles 2.0% and 7.2% of the scale, transformers' bfloat16 4.0% and 15.4%, integer 0.02-0.09%;
    # a Q8_0 cache: tiles 5.7% and 11.6%, the cache alone (kv_cost) 3.1% and 8.1%, integer 1.2% and 0.8%
    assert (integer - want).abs().max() <= 0.02 * scale
    assert (tiles - want).abs().max() <= bf16_cost + kv_cost  # the two roundings' costs add
    assert torch.equal(tiles, integer) != kernels.extension().tiles_ok(64, 64, 2)


@pytest.fixture
def q8():
    previous = kernels.set_activations("q8")
    yield
    kernels.set_activations(previous)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("kind", "qtype"),
    [
        ("mistral", "Q4_0"),
        ("mixtral", "Q4_0"),
        ("llama", "Q4_1"),
        ("mistral", "Q4_K"),
        ("mixtral", "Q6_K"),
        ("mixtral", "Q3_K"),
        ("mistral", "Q8_0"),
        ("llama", "Q5_0"),
        ("mistral", "Q5_1"),
    ],
)
def test_interleaved_model(tmp_path, isa, kind, qtype, q8, monkeypatch):
    """Where the integer kernel runs, a Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K or Q3_K file's matrices (the embedding and the head
    tied to it too) are interleaved 8 rows by 8
    at load (quant/kernels.py regroup): the compiled step equals the module path on them, the
    logits equal those of the same file kept in GGML's layout (the same rounded x, summed in another
    order), and writing the model back gives the file's own bytes. One layer: with int8 activations a
    float32 rounding difference can move one value to the next int8 step, and a second random layer
    amplifies that to 1e-2 of the logits; within one layer the paths agree to 1e-6. The K-quants:
    written by our writer (gguf's quantizer has none; Q3_K: random valid blocks), rows of 256."""
    from tramontane.weights.gguf import open_gguf
    from tramontane.weights.gguf_writer import write_gguf

    k_quant = qtype.endswith("_K")
    width = 256 if k_quant else 128
    hf = hf_model(kind, seed=3, hidden_size=width, intermediate_size=width if k_quant else 96, num_hidden_layers=1)
    if qtype == "Q3_K":  # no writer of ours quantizes to Q3_K: random valid blocks
        from test_packed_experts import write_random_mixtral

        path = tmp_path / "m.gguf"
        write_random_mixtral(path, qtype, dim=width, ffn=width, layers=1)
    elif k_quant:
        from models import save_hf

        quant = qtype.lower()
        path = write_gguf(load_model(save_hf(hf, tmp_path / "f")).model, tmp_path / "m.gguf", {}, quant=quant)
    else:
        path = save_gguf(hf, tmp_path / "m.gguf", qtype)
    model = load_model(path, packed=True).model
    types = {m.qtype for m in model.layers[0].modules() if hasattr(m, "qtype")}
    ggml = int(gguf.GGMLQuantizationType[qtype])
    assert types == {kernels.INTERLEAVED[ggml]}  # attention, and the dense feed-forward or the stacked experts
    assert model.tok_embeddings.qtype == kernels.INTERLEAVED[ggml]  # looked up row by row out of its groups
    if kind == "mixtral":  # int8 activations can flip a near-tie of the router between the two paths:
        kernels.set_activations("f32")  # compare them exactly, on the regrouped decoder (the fixture restores)
    assert_fused_steps_equal_module_steps(model, isa)
    kernels.set_activations("q8")

    tokens = torch.tensor([[1, 5, 9, 33, 7, 60]])
    with torch.inference_mode():
        got = model(tokens)
        import tramontane.build.load as load_module

        monkeypatch.setattr(load_module, "regroup", lambda rows, qtype, k, huge=False: (rows, qtype))
        plain = load_model(path, packed=True).model
        assert plain.layers[0].attention.wo.qtype == ggml
        want = plain(tokens)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    out = write_gguf(model, tmp_path / "back.gguf")
    with open_gguf(path) as a, open_gguf(out) as b:
        for name, info in a.tensors.items():
            assert b.tensors[name].ggml_type == info.ggml_type, name
            assert bytes(a.raw(name)) == bytes(b.raw(name)), name


def _file_mapping(path) -> tuple[list[tuple[int, int]], int]:
    """This process's mappings of `path`: their address ranges, and their resident bytes (smaps Rss)."""
    ranges, rss, current = [], 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = line.rstrip().endswith(str(path))
                if current:
                    lo, hi = (int(v, 16) for v in head[0].split("-"))
                    ranges.append((lo, hi))
            elif current and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return ranges, rss


@pytest.mark.skipif(not kernels.available() or kernels.isa() == "scalar", reason="no integer kernel")
@pytest.mark.parametrize("mmap", [True, False])
def test_regrouped_rows_are_read_through_the_mapping_and_released(tmp_path, q8, mmap):
    """Matrices interleaved at load are read straight out of the mapping into their new layout and its
    pages dropped: after load none of them is a view of the file and the file's resident pages are a
    few boundary pages. A matrix whose rows are not whole groups of 8 (here the 100-row embedding)
    stays a view of the file when mapped, and is a copy of its own under --no-mmap."""
    hf = hf_model("mistral", seed=3, hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=100)
    path = save_gguf(hf, tmp_path / "m.gguf", "Q4_0")
    model = load_model(path, packed=True, mmap=mmap).model
    ranges, resident = _file_mapping(path)

    def in_file(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in ranges)

    held = [m for m in model.modules() if hasattr(m, "qtype")]
    regrouped = [m.packed for m in held if kernels.interleaved(m.qtype)]
    assert len(regrouped) >= 8 and not any(in_file(t) for t in regrouped)
    assert model.tok_embeddings.qtype == int(gguf.GGMLQuantizationType.Q4_0)
    assert in_file(model.tok_embeddings.packed) == mmap
    size = path.stat().st_size
    assert resident <= 0.15 * size, (resident, size)
