"""Adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a LoRA tensor `base_model.model.<HF module>.lora_A.weight` ([r,in]; lora_B [out,r]). Our wq/wk
rows are in Mistral's interleaved rotary order and HF's q_proj/k_proj rows in rotate-half order
(weights/names.py): W_hf = P W_ours, so delta_hf = (P B) A: lora_B of q/k is permuted, lora_A is not.

Mixtral is written the way every Mixtral adapter was written before transformers 5 (and the way
transformers 4 + PEFT load it): router `block_sparse_moe.gate`, experts `block_sparse_moe.experts.{e}.w1`
(target_modules gate, w1, w2, w3). PEFT >= 0.18 with transformers 5 converts this on load to its fused
`mlp.gate.weight` / `mlp.experts.gate_up_proj` / `down_proj` parameter targets. Reading accepts both
that layout and the one PEFT itself saves on transformers 5 (`mlp.gate`, and the expert ParamWrappers
`mlp.experts[.base_layer].lora_A.weight` [r*E,in] expert-major, lora_B [out,r*E] rank-major).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, LoadError
from ..model.transformer import Transformer
from ..weights.hf_writer import as_umask_allows
from ..weights.names import permute_rotary, unpermute_rotary
from ..weights.safetensors import SafetensorsFile
from .layers import LoraSpec, add_adapter, lora_scales, lora_state
from .peft_config import AdapterConfig, read_adapter_config

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# our projection (after "layers.{i}.") -> (HF module after "model.layers.{i}.", PEFT target_modules name)
HF_MODULES = {
    "attention.wq": ("self_attn.q_proj", "q_proj"),
    "attention.wk": ("self_attn.k_proj", "k_proj"),
    "attention.wv": ("self_attn.v_proj", "v_proj"),
    "attention.wo": ("self_attn.o_proj", "o_proj"),
    "feed_forward.w1": ("mlp.gate_proj", "gate_proj"),
    "feed_forward.w2": ("mlp.down_proj", "down_proj"),
    "feed_forward.w3": ("mlp.up_proj", "up_proj"),
    "feed_forward.gate": ("block_sparse_moe.gate", "gate"),
}
OURS = {hf: ours for ours, (hf, _) in HF_MODULES.items()} | {"mlp.gate": "feed_forward.gate"}
TARGET_NAMES = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "gate": "gate",
}
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_(A|B)\.weight")
V4_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])")
V5_EXPERTS = re.compile(r"mlp\.experts(?:\.base_layer)*")


def save_adapter(model: Transformer, folder: str | Path, name: str, spec: LoraSpec, base_model: str) -> Path:
    """Write adapter `name` as a PEFT LoRA adapter that `PeftModel.from_pretrained` loads onto the HF model.

    lora_dropout is written as 0 when the router or experts are targeted: PEFT refuses dropout on the
    parameter targets transformers 5 maps them to, and dropout does not change inference."""
    config = model.config
    state, scales = lora_state(model, name), lora_scales(model, name)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key, t in state.items():
        path, kind = key.rsplit(".", 1)  # "layers.0.attention.wq", "lora_A"
        layer, ours = path.split(".", 2)[1], path.split(".", 2)[2]
        if abs(scales[path] - spec.scale) > 1e-9 * spec.scale or t.shape[-2 if kind == "lora_A" else -1] != spec.rank:
            raise ConfigError(
                f"save_adapter: {path} has rank {t.shape[-2 if kind == 'lora_A' else -1]} and "
                f"scale {scales[path]}, but spec says rank {spec.rank}, scale {spec.scale}"
            )
        if t.dim() == 3:  # experts [E,r,in] / [E,out,r]: one tensor per expert
            leaf = ours.rsplit(".", 1)[1]
            for e in range(t.shape[0]):
                hf = f"block_sparse_moe.experts.{e}.{leaf}"
                tensors[f"{PREFIX}model.layers.{layer}.{hf}.{kind}.weight"] = t[e].contiguous()
            targets.add(leaf)
            continue
        hf, target = HF_MODULES[ours]
        if kind == "lora_B" and ours in ("attention.wq", "attention.wk"):
            t = permute_rotary(t, config.n_heads if ours == "attention.wq" else config.n_kv_heads)
        tensors[f"{PREFIX}model.layers.{layer}.{hf}.{kind}.weight"] = t.contiguous()
        targets.add(target)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moe_targets = targets & {"gate", "w1", "w2", "w3"}
    (folder / CONFIG_FILE).write_text(
        json.dumps(_peft_config(spec, sorted(targets), base_model, 0.0 if moe_targets else spec.dropout), indent=2)
    )
    from safetensors.torch import save_file

    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    as_umask_allows(folder / WEIGHTS_FILE)
    return folder


def _peft_config(spec: LoraSpec, targets: list[str], base_model: str, dropout: float) -> dict:
    """PEFT LoraConfig fields (those every PEFT release since 0.9 reads)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }


def load_adapter(model: Transformer, folder: str | Path, name: str) -> LoraSpec:
    """Read a PEFT LoRA adapter (ours, or one PEFT saved on transformers 4 or 5) into `model` as `name`.

    The config and the safetensors header are checked against the model (every shape, every rank against
    r / rank_pattern) before any tensor is read, so a bad file costs no allocation."""
    folder = Path(folder)
    cfg = read_adapter_config(folder / CONFIG_FILE)
    weights = _weights_file(folder)
    with SafetensorsFile(weights) as st:
        shapes = {key: entry.shape for key, entry in st.tensors.items()}
        groups = [_plan(model, weights, cfg, layer, module, g) for (layer, module), g in _pairs(model, weights, shapes)]
        _check_experts(weights, groups, model.config.moe.num_experts if model.config.moe else 0)
        state, scales, targets = _read(model, st, groups)
    try:
        spec = LoraSpec(cfg.r, cfg.alpha, cfg.dropout, targets)
        add_adapter(model, name, state, scales, spec.dropout)
    except ConfigError as e:
        raise LoadError(folder / CONFIG_FILE, str(e)) from None
    return spec


def _weights_file(folder: Path) -> Path:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        why = (
            "pickle weights are refused (unpickling runs code); save with safetensors"
            if pickled.is_file()
            else "missing"
        )
        raise LoadError(weights, why)
    return weights


@dataclass(frozen=True)
class _Group:
    """One adapted module of the file, checked against the model and the config from the header alone.

    kind "linear": `proj` is ours ("attention.wq", "feed_forward.gate"); "v4": one expert's `proj`
    ("w1"), expert index `expert`; "v5": transformers 5's fused experts, `proj` "gate_up_proj" or
    "down_proj", A [r*E,in] and B [out,r*E]."""

    layer: int
    kind: str
    proj: str
    a: str  # tensor names in the file
    b: str
    rank: int
    scale: float
    expert: int = -1


def _pairs(model: Transformer, path: Path, shapes: dict[str, tuple[int, ...]]) -> list[tuple[tuple[int, str], dict]]:
    """Group the file's keys by (layer, HF module) -> {"A": name, "B": name, "A_shape": .., "B_shape": ..,
    "key": a name}, sorted; every key must name a LoRA tensor of a known module, in pairs of [r,in] / [out,r]."""
    n_layers = model.config.n_layers
    groups: dict[tuple[int, str], dict] = {}
    for key, shape in shapes.items():
        m = KEY.fullmatch(key)
        if m is None:
            raise LoadError(path, f"unknown key {key!r}: not a LoRA tensor of a Mistral/Llama/Mixtral layer")
        layer, module, kind = int(m[1]), m[2], m[3]
        if layer >= n_layers:
            raise LoadError(path, f"key {key!r}: layer {layer}, but the model has {n_layers} layers")
        if module not in OURS and not V4_EXPERT.fullmatch(module) and not V5_EXPERTS.fullmatch(module):
            raise LoadError(path, f"unknown key {key!r}: module {module!r} is not a supported LoRA target")
        group = groups.setdefault((layer, module), {"key": key})
        group[kind], group[kind + "_shape"] = key, shape
    for g in groups.values():
        if "A" not in g or "B" not in g:
            raise LoadError(path, f"key {g['key']!r}: lora_{'B' if 'A' in g else 'A'} of the same module is missing")
        a, b = g["A_shape"], g["B_shape"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
            raise LoadError(path, f"key {g['key']!r}: lora_A {list(a)} and lora_B {list(b)} are not [r,in] and [out,r]")
    return sorted(groups.items())


def _plan(model: Transformer, path: Path, cfg: AdapterConfig, layer: int, module: str, g: dict) -> _Group:
    """Check one module's pair against the model's projection and the config's rank; its scale alpha / r."""
    a, b, hf_key = g["A_shape"], g["B_shape"], f"model.layers.{layer}.{module}"
    if V5_EXPERTS.fullmatch(module):
        return _plan_v5(model, path, cfg, layer, g)
    if (v4 := V4_EXPERT.fullmatch(module)) is not None:
        kind, proj, expert, ours = "v4", v4[2], int(v4[1]), "experts." + v4[2]
        n_exp = model.config.moe.num_experts if model.config.moe else 0
        if expert >= n_exp:
            raise LoadError(path, f"key {g['key']!r}: expert {expert}, but the model has {n_exp} experts per layer")
    else:
        kind, proj, expert, ours = "linear", OURS[module], -1, OURS[module]
    shape = _expected(model, ours)
    if shape is None:
        raise LoadError(path, f"key {g['key']!r}: this model has no such module")
    if a[1] != shape[1] or b[0] != shape[0]:
        raise LoadError(
            path,
            f"key {g['key']!r}: lora_A {list(a)} and lora_B {list(b)} do not fit a [{shape[0]}, {shape[1]}] projection",
        )
    scale = _scale(cfg, path, g["key"], hf_key, a[0], shape)
    return _Group(layer, kind, proj, g["A"], g["B"], a[0], scale, expert)


def _plan_v5(model: Transformer, path: Path, cfg: AdapterConfig, layer: int, g: dict) -> _Group:
    """PEFT's ParamWrapper on transformers 5's fused experts: which parameter it wraps follows from the
    shapes (gate_up_proj is [dim -> 2F], down_proj [F -> dim]); the rank is rows of A / experts."""
    c = model.config
    n_exp, f, a, b = (c.moe.num_experts if c.moe else 0), c.hidden_dim, g["A_shape"], g["B_shape"]
    if not n_exp or a[0] % n_exp:
        raise LoadError(path, f"key {g['key']!r}: lora_A {list(a)} is not [r*{n_exp} experts, in]")
    fits = {(c.dim, 2 * f): "gate_up_proj", (f, c.dim): "down_proj"}
    proj = fits.get((a[1], b[0]))
    if proj is None:
        raise LoadError(
            path,
            f"key {g['key']!r}: lora_A {list(a)} / lora_B {list(b)} fit neither "
            f"experts.gate_up_proj [{2 * f}, {c.dim}] nor experts.down_proj [{c.dim}, {f}]",
        )
    rank = a[0] // n_exp
    scale = _scale(cfg, path, g["key"], f"model.layers.{layer}.mlp.experts.{proj}", rank, (b[0], a[1]))
    return _Group(layer, "v5", proj, g["A"], g["B"], rank, scale)


def _scale(cfg: AdapterConfig, path: Path, key: str, hf_key: str, rank: int, shape: tuple[int, int]) -> float:
    """alpha / r for module `hf_key` after checking the file's rank against the config's (r or rank_pattern,
    as PEFT resolves them) and against the projection: a rank above both its dimensions makes A and B each
    larger than the weight they adapt. Not min(out, in): PEFT's all-linear puts r=16 on Mixtral's 8-row router."""
    expected, where = cfg.rank_of(hf_key)
    if rank != expected:
        raise LoadError(
            cfg.path,
            f"field {where} gives {hf_key} rank {expected}, but {path.name} key {key!r} has rank {rank}",
        )
    if rank > max(shape):
        raise LoadError(cfg.path, f"field {where}: rank {rank} exceeds both dimensions of {hf_key} {list(shape)}")
    return cfg.alpha_of(hf_key) / rank


def _check_experts(path: Path, groups: list[_Group], n_experts: int) -> None:
    """Per-expert (transformers 4) pairs stack into [E,r,in] / [E,out,r]: every expert there, one rank."""
    per: dict[tuple[int, str], dict[int, int]] = {}
    for g in groups:
        if g.kind == "v4":
            per.setdefault((g.layer, g.proj), {})[g.expert] = g.rank
    for (layer, proj), ranks in per.items():
        missing = sorted(set(range(n_experts)) - set(ranks))
        if missing:
            raise LoadError(path, f"layer {layer} {proj}: LoRA for experts {missing} missing")
        if len(set(ranks.values())) != 1:
            raise LoadError(
                path, f"layer {layer} {proj}: experts have different LoRA ranks {sorted(set(ranks.values()))}"
            )


def _expected(model: Transformer, ours: str) -> tuple[int, int] | None:
    """(out, in) of our projection "attention.wq" / "feed_forward.w1" / expert "experts.w1"; None if absent."""
    c = model.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {
        "attention.wq": (q, c.dim),
        "attention.wk": (kv, c.dim),
        "attention.wv": (kv, c.dim),
        "attention.wo": (c.dim, q),
    }
    if c.moe is None:
        shapes |= {
            "feed_forward.w1": (c.hidden_dim, c.dim),
            "feed_forward.w3": (c.hidden_dim, c.dim),
            "feed_forward.w2": (c.dim, c.hidden_dim),
        }
    else:
        shapes |= {
            "feed_forward.gate": (c.moe.num_experts, c.dim),
            "experts.w1": (c.hidden_dim, c.dim),
            "experts.w3": (c.hidden_dim, c.dim),
            "experts.w2": (c.dim, c.hidden_dim),
        }
    return shapes.get(ours)


def _read(
    model: Transformer, st: SafetensorsFile, groups: list[_Group]
) -> tuple[dict[str, torch.Tensor], dict[str, float], tuple[str, ...]]:
    """The checked groups' tensors as `add_adapter` state (our names), per-path scales, and our target names."""
    c = model.config
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    targets: set[str] = set()
    experts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for g in groups:
        a, b = st.read(g.a).float(), st.read(g.b).float()
        if g.kind == "v4":
            experts.setdefault((g.layer, g.proj), {})[g.expert] = (a, b)
            scales[f"layers.{g.layer}.feed_forward.{g.proj}"] = g.scale
            targets.add("experts")
        elif g.kind == "v5":
            _v5_experts(model, g, a, b, state, scales)
            targets.add("experts")
        else:
            if g.proj in ("attention.wq", "attention.wk"):
                b = unpermute_rotary(b, c.n_heads if g.proj == "attention.wq" else c.n_kv_heads)
            state[f"layers.{g.layer}.{g.proj}.lora_A"], state[f"layers.{g.layer}.{g.proj}.lora_B"] = a, b
            scales[f"layers.{g.layer}.{g.proj}"] = g.scale
            targets.add(TARGET_NAMES[HF_MODULES[g.proj][1]])
    for (layer, proj), per_expert in experts.items():  # complete and of one rank (_check_experts)
        state[f"layers.{layer}.feed_forward.{proj}.lora_A"] = torch.stack(
            [per_expert[e][0] for e in sorted(per_expert)]
        )
        state[f"layers.{layer}.feed_forward.{proj}.lora_B"] = torch.stack(
            [per_expert[e][1] for e in sorted(per_expert)]
        )
    return state, scales, tuple(sorted(targets))


def _v5_experts(
    model: Transformer,
    g: _Group,
    a: torch.Tensor,
    b: torch.Tensor,
    state: dict[str, torch.Tensor],
    scales: dict[str, float],
) -> None:
    """PEFT's ParamWrapper on transformers 5's fused experts: A [r*E,in] (expert-major rows), B [out,r*E]
    (rank-major columns; peft ParamWrapper.get_delta_factors) -> our [E,r,in] / [E,out,r] per projection."""
    n_exp, f, r = a.shape[0] // g.rank, model.config.hidden_dim, g.rank
    a_e = a.reshape(n_exp, r, a.shape[1])  # [E*r,in] -> [E,r,in]
    b_e = b.reshape(b.shape[0], r, n_exp).permute(2, 0, 1)  # [out,r*E] -> [out,r,E] -> [E,out,r]
    p = f"layers.{g.layer}.feed_forward."
    if g.proj == "gate_up_proj":  # rows [gate; up] share one A
        for proj, rows in (("w1", slice(0, f)), ("w3", slice(f, 2 * f))):
            state[p + proj + ".lora_A"], state[p + proj + ".lora_B"] = a_e.clone(), b_e[:, rows].contiguous()
            scales[p + proj] = g.scale
    else:
        state[p + "w2.lora_A"], state[p + "w2.lora_B"] = a_e.contiguous(), b_e.contiguous()
        scales[p + "w2"] = g.scale
