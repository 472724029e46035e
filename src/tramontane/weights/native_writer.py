"""Write a built float model in Mistral's native layout: `params.json` + `consolidated.safetensors`
(mistral-inference's names and interleaved rotary rows, which are ours), Mixtral's stacked experts
split back into `layers.{i}.feed_forward.experts.{e}.w1.weight`, no `output.weight` when the
embeddings are tied (`tied_embeddings: true`). The tokenizer files of the source folder are copied."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ._protocols import model_config
from .hf_writer import as_umask_allows

STACKED = re.compile(r"layers\.(\d+)\.feed_forward\.(w[123])$")
TOKENIZER_FILES = (
    "tekken.json",
    "tokenizer.model",
    "tokenizer.model.v*",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def params_json(config: ModelConfig) -> dict[str, Any]:
    """mistral-inference's ModelArgs for this configuration (the inverse of ModelConfig.from_params_json)."""
    params: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "norm_eps": config.norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "max_seq_len": config.max_seq_len,
    }
    if config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    if config.moe is not None:
        params["moe"] = {"num_experts": config.moe.num_experts, "num_experts_per_tok": config.moe.num_experts_per_tok}
    if config.tie_embeddings:
        params["tied_embeddings"] = True
    return params


def native_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under native names (float tensors, contiguous, as safetensors wants them)."""
    config = model_config(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            raise ConfigError(f"write_native: {name} is not a float tensor; load the model with packed=False")
        stacked = STACKED.match(name)
        if stacked:  # [E, rows, cols] -> one matrix per expert
            layer, w = stacked.groups()
            for e in range(tensor.shape[0]):
                out[f"layers.{layer}.feed_forward.experts.{e}.{w}.weight"] = tensor[e].contiguous()
        elif name == "output.weight" and config.tie_embeddings:
            continue
        else:
            out[name] = tensor.contiguous()
    return out


def write_native(model: nn.Module, folder: str | Path, tokenizer_source: Path | None = None) -> Path:
    from safetensors.torch import save_file

    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ConfigError("write_native: the model has LoRA adapters installed; merge them first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params_json(model_config(model)), indent=2) + "\n")
    save_file(native_state(model), str(folder / "consolidated.safetensors"), metadata={"format": "pt"})
    as_umask_allows(folder / "consolidated.safetensors")
    if tokenizer_source is not None and Path(tokenizer_source).is_dir():
        for pattern in TOKENIZER_FILES:
            for path in Path(tokenizer_source).glob(pattern):
                if path.resolve() != (folder / path.name).resolve():
                    shutil.copyfile(path, folder / path.name)
    return folder
