"""LoRA: PEFT parity both ways, merging, per-row adapters, packed bases, and the HF safetensors writer."""

from __future__ import annotations

import json

import pytest
import torch
from models import VOCAB, hf_model, save_gguf, save_hf

from tramontane.build.load import load_model
from tramontane.errors import ConfigError, LoadError
from tramontane.lora import (
    LoRALinear,
    LoraSpec,
    apply_lora,
    load_adapter,
    lora_state,
    merge_lora,
    save_adapter,
    set_active,
    set_rows,
)
from tramontane.lora.layers import ExpertLoRA
from tramontane.quant.linear import PackedLinear
from tramontane.quant.step import CompiledStep
from tramontane.weights.hf_writer import write_hf

peft = pytest.importorskip("peft")

TOKENS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))  # past the window of 8
ATTENTION = ("wq", "wk", "wv", "wo")
DENSE = ATTENTION + ("w1", "w2", "w3")
HF_DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize(model: torch.nn.Module, name: str, seed: int, std: float = 0.2) -> None:
    """Non-zero lora_B (and fresh lora_A) so that the adapter changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ("lora_A" in key or "lora_B" in key) and key.endswith("." + name):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff}"


def setup(tmp_path, kind: str, seed: int):
    hf = hf_model(kind, seed=seed)
    folder = save_hf(hf, tmp_path / "base")
    return hf, folder, load_model(folder).model


# ---- spec validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ("wq", "q_proj")}, "targets"),
        ({"rank": 2.5}, "rank"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"LoraSpec.{field}"):
        LoraSpec(**kwargs)


# ---- PEFT parity ------------------------------------------------------------------------------------

DEFAULT = LoraSpec().targets  # on Mixtral: attention, the router and every expert's w1/w2/w3


@pytest.mark.parametrize(
    "kind,targets,read_back",
    [
        ("mistral", DEFAULT, DENSE),
        ("llama", DEFAULT, DENSE),
        ("mixtral", ATTENTION + ("gate",), None),
        ("mixtral", ("experts",), None),
        ("mixtral", DEFAULT, ATTENTION + ("gate", "experts")),
    ],
)
def test_our_adapter_loads_in_peft(tmp_path, kind, targets, read_back):
    hf, folder, ours = setup(tmp_path, kind, seed=3)
    base = logits(ours)
    spec = LoraSpec(rank=4, alpha=8.0, targets=targets)
    apply_lora(ours, spec, "a", seed=1)
    randomize(ours, "a", seed=2)
    save_adapter(ours, tmp_path / "adapter", "a", spec, base_model=str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    mine = logits(ours)
    assert (mine - base).abs().max().item() > 1e-2, "the adapter should matter"
    theirs = logits(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter"))
    assert_close(mine, theirs, 1e-4, f"{kind} {targets}: ours vs PEFT")
    fresh = load_model(folder).model
    assert load_adapter(fresh, tmp_path / "adapter", "again").targets == tuple(sorted(read_back or targets))
    assert_close(logits(fresh), mine, 1e-5, "our adapter read back")


@pytest.mark.parametrize(
    "kind,config",
    [
        ("mistral", {"target_modules": HF_DENSE}),
        ("llama", {"target_modules": HF_DENSE}),
        ("mixtral", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate"]}),
        ("mixtral", {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),  # transformers 5 layout
        ("mixtral", {"target_modules": ["w1", "w2", "w3"]}),  # transformers 4 names, converted by PEFT
    ],
)
def test_peft_adapter_loads_in_ours(tmp_path, kind, config):
    hf, _, ours = setup(tmp_path, kind, seed=4)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **config))
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    theirs = logits(model)
    base = logits(ours)
    spec = load_adapter(ours, tmp_path / "adapter", "p")
    assert spec.rank == 4 and spec.alpha == 8.0
    mine = logits(ours)
    assert (mine - base).abs().max().item() > 1e-2, "the adapter should matter"
    assert_close(mine, theirs, 1e-4, f"{kind} {config}: PEFT vs ours")


def test_load_adapter_errors_name_file_and_key(tmp_path):
    _, folder, ours = setup(tmp_path, "mistral", seed=3)
    spec = LoraSpec(rank=2, targets=("wq",))
    apply_lora(ours, spec, "a")
    save_adapter(ours, tmp_path / "ad", "a", spec, base_model="x")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(2, 64)
    save_file(tensors, weights)
    with pytest.raises(LoadError, match=r"adapter_model\.safetensors.*self_attn\.rotary"):
        load_adapter(ours, tmp_path / "ad", "b")
    (tmp_path / "ad" / "adapter_config.json").unlink()
    with pytest.raises(LoadError, match="adapter_config.json"):
        load_adapter(ours, tmp_path / "ad", "b")


# ---- merge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,targets", [("mistral", LoraSpec().targets), ("mixtral", ATTENTION + ("gate", "experts"))]
)
def test_merge_then_write_hf(tmp_path, kind, targets):
    _, _, ours = setup(tmp_path, kind, seed=6)
    apply_lora(ours, LoraSpec(rank=4, alpha=6.0, targets=targets), "a", seed=3)
    randomize(ours, "a", seed=4)
    adapted = logits(ours)
    merge_lora(ours, "a")
    assert not any(isinstance(m, LoRALinear | ExpertLoRA) for m in ours.modules())
    assert all(getattr(b.feed_forward, "expert_lora", None) is None for b in ours.layers)
    merged = logits(ours)
    assert_close(merged, adapted, 1e-4, "merged vs base + adapter")
    from transformers import AutoModelForCausalLM

    write_hf(ours, tmp_path / "merged")
    assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), merged, 1e-4, "transformers")
    assert_close(logits(load_model(tmp_path / "merged").model), merged, 1e-5, "ours reloaded")


# ---- per-row selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,targets", [("mistral", LoraSpec().targets), ("mixtral", ("wq", "wo", "gate", "experts"))]
)
def test_rows_with_different_adapters_equal_separate_runs(tmp_path, kind, targets):
    _, _, ours = setup(tmp_path, kind, seed=8)
    tokens = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    base = logits(ours, tokens)
    for i, name in enumerate(("a", "b")):
        apply_lora(ours, LoraSpec(rank=2 + 2 * i, alpha=8.0, targets=targets), name, seed=i)
        randomize(ours, name, seed=10 + i)
    rows = torch.tensor([0, 1, -1]).repeat_interleave(tokens.shape[1])  # [B*T]: row 0 "a", row 1 "b", row 2 none
    set_rows(ours, rows, ["a", "b"])
    batch = logits(ours, tokens)
    for i, name in enumerate(("a", "b", None)):
        set_active(ours, name)
        alone = logits(ours, tokens[i : i + 1])
        assert_close(batch[i : i + 1], alone, 1e-5, f"row {i} (adapter {name})")
    if kind == "mixtral":  # the other rows' routing changed, so each expert's matmul has other shapes
        assert_close(batch[2], base[2], 1e-5, "row without adapter vs base")
    else:
        assert torch.equal(batch[2], base[2]), "a row without adapter gets exactly the base logits"
    wq = ours.layers[0].attention.wq
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(wq(x)[2], wq.base(x)[2]), "LoRALinear: rows without adapter are exactly base(x)"
    assert (batch[0] - base[0]).abs().max() > 1e-2 and (batch[1] - batch[0]).abs().max() > 1e-2


def test_moe_batched_path_equals_oracle_with_expert_adapters(tmp_path):
    _, _, ours = setup(tmp_path, "mixtral", seed=9)
    apply_lora(ours, LoraSpec(rank=3, targets=("gate", "experts")), "a", seed=1)
    apply_lora(ours, LoraSpec(rank=2, targets=("experts",)), "b", seed=2)
    randomize(ours, "a", seed=3)
    randomize(ours, "b", seed=4)
    moe = ours.layers[0].feed_forward
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    set_rows(ours, torch.tensor([0, 1, -1, 1, 0, -1, 0] * 2), ["a", "b"])
    with torch.no_grad():
        batched, oracle = moe(x), moe.forward_reference(x)
        set_active(ours, None)
        plain = moe(x)
    assert_close(batched, oracle, 1e-5, "batched vs oracle")
    assert (batched - plain).abs().max() > 1e-2


def test_set_active_and_rows_validate(tmp_path):
    _, _, ours = setup(tmp_path, "llama", seed=1)
    apply_lora(ours, LoraSpec(rank=2), "a")
    with pytest.raises(ConfigError, match="'nope'"):
        set_active(ours, "nope")
    with pytest.raises(ConfigError, match="'nope'"):
        set_rows(ours, torch.zeros(4, dtype=torch.long), ["nope"])
    with pytest.raises(ConfigError, match="already installed"):
        apply_lora(ours, LoraSpec(rank=2), "a")
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(ours, LoraSpec(rank=2, targets=("experts",)), "c")
    assert set(lora_state(ours, "a")) >= {"layers.0.attention.wq.lora_A", "layers.1.feed_forward.w2.lora_B"}


# ---- packed base ------------------------------------------------------------------------------------


def test_packed_base_unfuses_and_trains_only_the_adapter(tmp_path):
    path = save_gguf(hf_model("mistral", seed=5), tmp_path / "m.gguf", "Q8_0")
    plain = load_model(path, packed=True).model
    model = load_model(path, packed=True).model
    assert model.layers[0].attention.wqkv is not None and model.layers[0].feed_forward.w13 is not None
    packed_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("packed")}
    params = apply_lora(model, LoraSpec(rank=4), "a", seed=0)
    att, ff = model.layers[0].attention, model.layers[0].feed_forward
    assert CompiledStep.fits(model) and att.wqkv is None and ff.w13 is None  # views of the same rows
    assert isinstance(att.wq, LoRALinear) and isinstance(att.wq.base, PackedLinear)
    assert isinstance(ff.w3.base, PackedLinear)
    assert_close(logits(model), logits(plain), 1e-5, "zero B equals the plain packed model")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    model.train()
    for _ in range(2):  # the first step moves B off zero, so that A gets a gradient too
        model.zero_grad()
        model(TOKENS).logsumexp(-1).mean().backward()
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in packed_before.items() if k in model.state_dict())
    model.eval()
    assert (logits(model) - logits(plain)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_merge_of_packed_model_gives_float_model(tmp_path, kind):
    from tramontane.quant.linear import PackedExperts

    path = save_gguf(hf_model(kind, seed=2), tmp_path / "m.gguf", "Q8_0")
    model = load_model(path, packed=True).model
    apply_lora(model, LoraSpec(rank=4, targets=("wq", "w2")), "a")  # Mixtral: w2 of every expert
    randomize(model, "a", seed=1)
    adapted = logits(model)
    merge_lora(model, "a")
    assert not any(isinstance(m, PackedLinear | PackedExperts | LoRALinear) for m in model.modules())
    assert model.config.quant is None and (model.output is None) == (kind == "llama")
    assert_close(logits(model), adapted, 1e-4, "merged packed")


# ---- HF writer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mistral", "llama", "mixtral"])
def test_write_hf_round_trip(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    hf, _, ours = setup(tmp_path, kind, seed=7)
    reference = logits(hf)
    write_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind and config["num_key_value_heads"] == 2
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_close(logits(again), reference, 1e-5, "transformers reload")
    assert_close(logits(load_model(tmp_path / "out").model), logits(ours), 1e-6, "our reload")


def test_write_hf_packed_sharded_with_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_gguf(hf_model("mistral", seed=3), tmp_path / "m.gguf", "Q8_0")
    packed = load_model(path, packed=True).model
    source = tmp_path / "tok"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer.model.v3", "tokenizer_config.json", "notes.txt"):
        (source / name).write_text(name)
    write_hf(packed, tmp_path / "out", tokenizer_source=source, max_shard_bytes=20_000)
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert {p.name for p in out.iterdir() if "token" in p.name} == {
        "tokenizer.json",
        "tokenizer.model.v3",
        "tokenizer_config.json",
    }
    assert not (out / "notes.txt").exists()
    expected = logits(packed)
    assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), expected, 1e-3, "transformers vs packed")
    assert_close(logits(load_model(out).model), expected, 1e-3, "ours vs packed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no tokenizer files"):
        write_hf(packed, tmp_path / "out2", tokenizer_source=tmp_path / "empty")
    assert not (tmp_path / "out2").exists(), "nothing is written when the tokenizer source is bad"


def test_write_hf_refuses_unmerged_adapters(tmp_path):
    _, _, ours = setup(tmp_path, "llama", seed=1)
    apply_lora(ours, LoraSpec(rank=2), "a")
    with pytest.raises(ConfigError, match="merge"):
        write_hf(ours, tmp_path / "out")


def test_written_folders_are_complete_and_readable_by_others(tmp_path):
    """Issue 19: safetensors wrote its files 0600 (unreadable by the other users of a shared model
    folder) and a written HF folder lost the source's generation_config.json and chat template."""
    import os
    import stat

    from tramontane.weights.native_writer import write_native

    hf, folder, ours = setup(tmp_path, "mistral", seed=2)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (folder / "tokenizer.json").write_text("{}")  # copied as it is: the writer reads no tokenizer
    assert (folder / "generation_config.json").is_file()  # transformers' save_pretrained writes one
    previous = os.umask(0o022)
    try:
        out = write_hf(ours, tmp_path / "out", tokenizer_source=folder)
        native = write_native(ours, tmp_path / "native")
        spec = LoraSpec(rank=2)
        apply_lora(ours, spec, "a")
        adapter = save_adapter(ours, tmp_path / "adapter", "a", spec, base_model=str(folder))
    finally:
        os.umask(previous)
    for written in (*out.glob("*.safetensors"), *native.glob("*.safetensors"), *adapter.glob("*.safetensors")):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    assert (out / "generation_config.json").read_text() == (folder / "generation_config.json").read_text()
    assert (out / "chat_template.jinja").is_file()
