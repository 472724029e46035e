"""Tiny random models for tests, written in the three weight formats.

Hugging Face models come from transformers itself (the reference); the native and GGUF files are
written from the same weights following each format's published conventions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 96


def hf_config(kind: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": 8, "rope_theta": 10000.0, **overrides})
    elif kind == "mixtral":
        cfg = MixtralConfig(
            **{**common, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6, **overrides}
        )
    elif kind == "llama":
        cfg = LlamaConfig(**{**common, "tie_word_embeddings": True, "rope_theta": 500.0, **overrides})
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(kind: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), attn_implementation="eager")
    with torch.no_grad():  # larger than the default init so that errors would show
        for p in model.parameters():
            p.normal_(0, 0.15 if p.dim() > 1 else 0.3).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def save_hf(model, folder: Path, shard: str | None = "40KB") -> Path:
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    return folder


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(f))
    return state


def native_state(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """params.json and consolidated tensors (mistral-inference names) for a transformers model."""
    from tramontane.weights.names import unpermute_rotary

    c = model.config
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "head_dim": c.hidden_size // c.num_attention_heads,
        "hidden_dim": c.intermediate_size,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
    }
    if getattr(c, "sliding_window", None):
        params["sliding_window"] = c.sliding_window  # v0.1 style: no rope_theta (10000 by rule)
    theta = float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 1e4)))
    if theta != (10_000.0 if params.get("sliding_window") else 1e6):
        params["rope_theta"] = theta  # v0.1 files omit it when the rule gives the right value
    if c.model_type == "mixtral":
        params["moe"] = {"num_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok}
    hf = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if getattr(c, "tie_word_embeddings", False):
        params["tied_embeddings"] = True
    else:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention.wq.weight"] = unpermute_rotary(hf[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[q + "attention.wk.weight"] = unpermute_rotary(hf[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[q + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[q + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if c.model_type == "mixtral":
            out[q + "feed_forward.gate.weight"] = hf[p + "mlp.gate.weight"]
            gate_up, down = hf[p + "mlp.experts.gate_up_proj"], hf[p + "mlp.experts.down_proj"]
            f = c.intermediate_size
            for e in range(c.num_local_experts):
                out[q + f"feed_forward.experts.{e}.w1.weight"] = gate_up[e, :f].contiguous()
                out[q + f"feed_forward.experts.{e}.w3.weight"] = gate_up[e, f:].contiguous()
                out[q + f"feed_forward.experts.{e}.w2.weight"] = down[e].contiguous()
        else:
            out[q + "feed_forward.w1.weight"] = hf[p + "mlp.gate_proj.weight"]
            out[q + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
            out[q + "feed_forward.w3.weight"] = hf[p + "mlp.up_proj.weight"]
    return params, out


def save_native(model, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    params, state = native_state(model)
    (folder / "params.json").write_text(json.dumps(params))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "consolidated.safetensors")
    return folder


GGUF_NAMES = {
    "attention.wq.weight": "attn_q",
    "attention.wk.weight": "attn_k",
    "attention.wv.weight": "attn_v",
    "attention.wo.weight": "attn_output",
    "attention_norm.weight": "attn_norm",
    "ffn_norm.weight": "ffn_norm",
    "feed_forward.w1.weight": "ffn_gate",
    "feed_forward.w2.weight": "ffn_down",
    "feed_forward.w3.weight": "ffn_up",
    "feed_forward.gate.weight": "ffn_gate_inp",
}


def save_gguf(model, path: Path, qtype: str = "F32", types: dict[str, str] | None = None) -> Path:
    """A GGUF file the way llama.cpp's converter writes one: arch llama, interleaved q/k rows,
    stacked `*_exps` expert tensors, 2-D weights quantized with `qtype` (or types[kind] for tensors
    blk.N.<kind>.weight, as llama-quantize's mixed recipes: {"attn_v": "Q8_0"}), norms in F32."""
    import gguf

    c = model.config
    params, state = native_state(model)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(
        float(c.rope_parameters["rope_theta"])
        if hasattr(c, "rope_parameters") and c.rope_parameters
        else float(c.rope_theta)
    )
    w.add_vocab_size(c.vocab_size)
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    if c.model_type == "mixtral":
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    tensors = _gguf_tensors(c, state)
    for name, t in tensors.items():
        kind = name.split(".")[-2]
        _add_gguf_tensor(w, name, t.float().numpy(), (types or {}).get(kind, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gguf_tensors(c, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"token_embd.weight": state["tok_embeddings.weight"], "output_norm.weight": state["norm.weight"]}
    if "output.weight" in state:
        out["output.weight"] = state["output.weight"]
    for i in range(c.num_hidden_layers):
        for ours, theirs in GGUF_NAMES.items():
            if f"layers.{i}.{ours}" in state:
                out[f"blk.{i}.{theirs}.weight"] = state[f"layers.{i}.{ours}"]
        if c.model_type == "mixtral":
            for ours, theirs in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
                experts = [
                    state[f"layers.{i}.feed_forward.experts.{e}.{ours}.weight"] for e in range(c.num_local_experts)
                ]
                out[f"blk.{i}.{theirs}.weight"] = torch.stack(experts)  # [E, out, in]
    return out


def _add_gguf_tensor(w, name: str, data: np.ndarray, qtype: str) -> None:
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if (
        data.ndim == 1
        or kind == gguf.GGMLQuantizationType.F32
        or name == "blk.0.ffn_gate_inp.weight"
        or "ffn_gate_inp" in name
    ):
        w.add_tensor(name, data.astype(np.float32))
        return
    packed = gguf.quants.quantize(data.astype(np.float32), kind)
    w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
