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
from pathlib import Path

import torch

from ..errors import ConfigError, LoadError
from ..model.transformer import Transformer
from ..weights.names import permute_rotary, unpermute_rotary
from ..weights.safetensors import SafetensorsFile
from ..weights.sources import read_json_object
from .layers import LoraSpec, add_adapter, lora_scales, lora_state

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
    """Read a PEFT LoRA adapter (ours, or one PEFT saved on transformers 4 or 5) into `model` as `name`."""
    folder = Path(folder)
    cfg = _read_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        why = (
            "pickle weights are refused (unpickling runs code); save with safetensors"
            if pickled.is_file()
            else "missing"
        )
        raise LoadError(weights, why)
    with SafetensorsFile(weights) as st:
        tensors = {k: st.read(k) for k in st.tensors}
    state, scales, targets = _to_ours(model, weights, tensors, cfg)
    try:
        spec = LoraSpec(cfg["r"], float(cfg["lora_alpha"]), float(cfg.get("lora_dropout") or 0.0), targets)
        add_adapter(model, name, state, scales, spec.dropout)
    except ConfigError as e:
        raise LoadError(folder / CONFIG_FILE, str(e)) from None
    return spec


def _read_config(path: Path) -> dict:
    cfg = read_json_object(path)
    if cfg.get("peft_type") != "LORA":
        raise LoadError(path, f"field 'peft_type' is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoadError(path, f"field 'r' must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise LoadError(path, f"field 'lora_alpha' must be a number > 0, got {alpha!r}")
    allowed = {
        "use_dora": (False, None),
        "use_rslora": (False, None),
        "fan_in_fan_out": (False, None),
        "lora_bias": (False, None),
        "bias": ("none", None),
        "modules_to_save": (None, []),
    }
    for field, ok in allowed.items():
        if field in cfg and cfg[field] not in ok:
            raise LoadError(path, f"field {field!r} = {cfg[field]!r} is not supported (expected {ok[0]!r})")
    return cfg


def _alpha(cfg: dict, hf_key: str) -> float:
    """lora_alpha for one module, honouring alpha_pattern as PEFT matches it (utils.other.get_pattern_key)."""
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", hf_key):
            return float(value)
    return float(cfg["lora_alpha"])


def _expected(model: Transformer, ours: str) -> tuple[int, int] | None:
    """(out, in) of our projection "attention.wq" / "feed_forward.w1" / expert "experts.w1"; None if absent."""
    c = model.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    dense = c.moe is None
    shapes = {
        "attention.wq": (q, c.dim),
        "attention.wk": (kv, c.dim),
        "attention.wv": (kv, c.dim),
        "attention.wo": (c.dim, q),
    }
    if dense:
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


def _pairs(model: Transformer, path: Path, tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], dict]:
    """Group the file's keys: (layer, HF module) -> {"A": tensor, "B": tensor, "key": a key}."""
    n_layers = model.config.n_layers
    groups: dict[tuple[int, str], dict] = {}
    for key, t in tensors.items():
        m = KEY.fullmatch(key)
        if m is None:
            raise LoadError(path, f"unknown key {key!r}: not a LoRA tensor of a Mistral/Llama/Mixtral layer")
        layer, module, kind = int(m[1]), m[2], m[3]
        if layer >= n_layers:
            raise LoadError(path, f"key {key!r}: layer {layer}, but the model has {n_layers} layers")
        if module not in OURS and not V4_EXPERT.fullmatch(module) and not V5_EXPERTS.fullmatch(module):
            raise LoadError(path, f"unknown key {key!r}: module {module!r} is not a supported LoRA target")
        group = groups.setdefault((layer, module), {"key": key})
        group[kind] = t
    for g in groups.values():
        if "A" not in g or "B" not in g:
            raise LoadError(path, f"key {g['key']!r}: lora_{'B' if 'A' in g else 'A'} of the same module is missing")
        if g["A"].dim() != 2 or g["B"].dim() != 2 or g["A"].shape[0] != g["B"].shape[1]:
            raise LoadError(
                path,
                f"key {g['key']!r}: lora_A {list(g['A'].shape)} and lora_B "
                f"{list(g['B'].shape)} are not [r,in] and [out,r]",
            )
    return groups


def _check(path: Path, key: str, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int] | None) -> None:
    if shape is None:
        raise LoadError(path, f"key {key!r}: this model has no such module")
    if a.shape[1] != shape[1] or b.shape[0] != shape[0]:
        raise LoadError(
            path,
            f"key {key!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
            f"a [{shape[0]}, {shape[1]}] projection",
        )


def _to_ours(
    model: Transformer, path: Path, tensors: dict[str, torch.Tensor], cfg: dict
) -> tuple[dict[str, torch.Tensor], dict[str, float], tuple[str, ...]]:
    """The file's tensors as `add_adapter` state (our names), per-path scales, and our target names."""
    c = model.config
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    targets: set[str] = set()
    experts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), g in sorted(_pairs(model, path, tensors).items()):
        a, b, hf_key = g["A"].float(), g["B"].float(), f"model.layers.{layer}.{module}"
        if (v4 := V4_EXPERT.fullmatch(module)) is not None:
            _check(path, g["key"], a, b, _expected(model, "experts." + v4[2]))
            experts.setdefault((layer, v4[2]), {})[int(v4[1])] = (a, b)
            scales[f"layers.{layer}.feed_forward.{v4[2]}"] = _alpha(cfg, hf_key) / a.shape[0]
            targets.add("experts")
            continue
        if V5_EXPERTS.fullmatch(module):
            targets.add("experts")
            _v5_experts(model, path, g, layer, state, scales, cfg)
            continue
        ours = OURS[module]
        _check(path, g["key"], a, b, _expected(model, ours))
        if ours in ("attention.wq", "attention.wk"):
            b = unpermute_rotary(b, c.n_heads if ours == "attention.wq" else c.n_kv_heads)
        state[f"layers.{layer}.{ours}.lora_A"], state[f"layers.{layer}.{ours}.lora_B"] = a, b
        scales[f"layers.{layer}.{ours}"] = _alpha(cfg, hf_key) / a.shape[0]
        targets.add(TARGET_NAMES[HF_MODULES[ours][1]])
    _stack_experts(path, experts, c.moe.num_experts if c.moe else 0, state)
    return state, scales, tuple(sorted(targets))


def _stack_experts(
    path: Path,
    experts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]],
    n_experts: int,
    state: dict[str, torch.Tensor],
) -> None:
    """Per-expert v4 tensors -> our stacks A [E,r,in], B [E,out,r]; every expert must be there."""
    for (layer, proj), per_expert in experts.items():
        missing = sorted(set(range(n_experts)) - set(per_expert))
        extra = sorted(set(per_expert) - set(range(n_experts)))
        if missing or extra:
            raise LoadError(path, f"layer {layer} {proj}: LoRA for experts {missing} missing, {extra} unknown")
        if len({per_expert[e][0].shape for e in per_expert}) != 1:
            raise LoadError(path, f"layer {layer} {proj}: experts have different LoRA ranks")
        state[f"layers.{layer}.feed_forward.{proj}.lora_A"] = torch.stack([per_expert[e][0] for e in range(n_experts)])
        state[f"layers.{layer}.feed_forward.{proj}.lora_B"] = torch.stack([per_expert[e][1] for e in range(n_experts)])


def _v5_experts(
    model: Transformer,
    path: Path,
    g: dict,
    layer: int,
    state: dict[str, torch.Tensor],
    scales: dict[str, float],
    cfg: dict,
) -> None:
    """PEFT's ParamWrapper on transformers 5's fused experts: A [r*E,in] (expert-major rows), B [out,r*E]
    (rank-major columns; peft ParamWrapper.get_delta_factors). Which parameter it wraps follows from the
    shapes: gate_up_proj is [dim -> 2F], down_proj [F -> dim]."""
    c = model.config
    n_exp, f = (c.moe.num_experts if c.moe else 0), c.hidden_dim
    a, b = g["A"].float(), g["B"].float()
    if not n_exp or a.shape[0] % n_exp:
        raise LoadError(path, f"key {g['key']!r}: lora_A {list(a.shape)} is not [r*{n_exp} experts, in]")
    r = a.shape[0] // n_exp
    a_e = a.reshape(n_exp, r, a.shape[1])  # [E*r,in] -> [E,r,in]
    b_e = b.reshape(b.shape[0], r, n_exp).permute(2, 0, 1)  # [out,r*E] -> [out,r,E] -> [E,out,r]
    p = f"layers.{layer}.feed_forward."
    if (a.shape[1], b.shape[0]) == (c.dim, 2 * f):  # gate_up_proj: rows [gate; up] share one A
        alpha = _alpha(cfg, f"model.layers.{layer}.mlp.experts.gate_up_proj")
        for proj, rows in (("w1", slice(0, f)), ("w3", slice(f, 2 * f))):
            state[p + proj + ".lora_A"], state[p + proj + ".lora_B"] = a_e.clone(), b_e[:, rows].contiguous()
            scales[p + proj] = alpha / r
    elif (a.shape[1], b.shape[0]) == (f, c.dim):  # down_proj
        state[p + "w2.lora_A"], state[p + "w2.lora_B"] = a_e.contiguous(), b_e.contiguous()
        scales[p + "w2"] = _alpha(cfg, f"model.layers.{layer}.mlp.experts.down_proj") / r
    else:
        raise LoadError(
            path,
            f"key {g['key']!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} fit neither "
            f"experts.gate_up_proj [{2 * f}, {c.dim}] nor experts.down_proj [{c.dim}, {f}]",
        )
