"""Random weights with real shapes (`--random mistral-7b|mixtral-8x7b|CONFIG.json`), for benchmarks.

Nothing is downloaded: presets are the published v0.1 shapes (DESIGN.md); a CONFIG.json may be a Mistral
`params.json` or a Hugging Face `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError, LoadError
from ..model import Transformer
from ..model.layers import rope_frequencies

_COMMON = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
           "norm_eps": 1e-5, "vocab_size": 32000}
PRESETS: dict[str, dict] = {
    "mistral-7b": {**_COMMON, "sliding_window": 4096},
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


def meta_model(config: ModelConfig) -> Transformer:
    """The model on the meta device: shapes and parameter counts without memory."""
    with torch.device("meta"):
        return Transformer(config)


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0,
                 quant: str | None = None) -> Transformer:
    """Weights ~ N(0, 0.02) (norms 1), materialised one tensor at a time. With quant ("int8", "int4")
    each matrix is quantized as soon as it exists, so peak memory is the packed model plus one matrix."""
    from ..quant.linear import GGUFLinear, PackedEmbedding, set_module
    from ..quant.quantize import SCHEMES, TARGETS, quantize_rows, type_id

    model = meta_model(config.with_(quant=quant) if quant else config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=dtype)
            continue
        module = name.removesuffix(".weight")
        if quant and (TARGETS.fullmatch(module) or module == "tok_embeddings"):
            cols = p.shape[1]
            packed = quantize_rows(p.shape[0], lambda a, b, c=cols: torch.randn(b - a, c, generator=gen) * 0.02,
                                   quant)
            kind = PackedEmbedding if module == "tok_embeddings" else GGUFLinear
            with torch.device("meta"):
                set_module(model, module, kind(torch.empty(packed.shape, dtype=torch.uint8),
                                               type_id(SCHEMES[quant]), cols))
            state[module + ".packed"] = packed
        else:
            state[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(dtype)
    model.load_state_dict(state, assign=True)
    del state  # the modules own the tensors now: fusing projections below must not double them
    model.inv_freq = rope_frequencies(config.head_dim, config.rope_theta)
    if quant:
        from ..quant.fused import install

        if config.tie_embeddings:
            model.output = model.tok_embeddings.as_linear()
        install(model)
    return model.eval().requires_grad_(False)
