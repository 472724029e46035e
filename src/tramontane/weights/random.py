"""Configs for random weights with real shapes (`--random mistral-7b|mistral-7b-v0.2|mixtral-8x7b|CONFIG.json`), for
benchmarks; build/random.py makes the weights.

Nothing is downloaded: presets are the published v0.1 shapes (DESIGN.md), and v0.2's (no sliding window,
RoPE theta 1e6, 32k tokens of context); a CONFIG.json may be a Mistral
`params.json` or a Hugging Face `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import ConfigError, LoadError

_COMMON = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-5,
    "vocab_size": 32000,
}
PRESETS: dict[str, dict] = {
    "mistral-7b": {**_COMMON, "sliding_window": 4096},
    "mistral-7b-v0.2": {**_COMMON, "rope_theta": 1e6, "max_seq_len": 32768},  # no window: 32k of context
    "mixtral-8x7b": {**_COMMON, "moe": {"num_experts": 8, "num_experts_per_tok": 2}},
}


def random_config(spec: str) -> ModelConfig:
    """A preset name or the path of a params.json / config.json."""
    if spec in PRESETS:
        return ModelConfig.from_params_json(PRESETS[spec], source=f"preset {spec}")
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--random {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(path, f"cannot read JSON: {e}") from None
    if "model_type" in data:
        return ModelConfig.from_hf_config(data, source=str(path))
    return ModelConfig.from_params_json(data, source=str(path))
