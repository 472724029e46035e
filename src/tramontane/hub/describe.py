"""`tramontane show`: what a model is, read from its config and file headers (no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..weights.sources import GGUFSource, open_source


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def describe(path: Path) -> dict[str, str]:
    from ..text.tokenizer import load_tokenizer, tokenizer_from_gguf

    fmt, config, source, _ = open_source(path)
    if isinstance(source, GGUFSource):  # fmt == "gguf"
        tokenizer = tokenizer_from_gguf(source.file.metadata, str(path))
    else:
        tokenizer = load_tokenizer(path)
    experts = (
        f"{config.moe.num_experts_per_tok} of {config.moe.num_experts} per token" if config.moe else "none (dense)"
    )
    types = ", ".join(f"{k} x{v}" for k, v in sorted(source.type_counts().items(), key=lambda kv: -kv[1]))
    info = {
        "path": str(path),
        "format": {"hf": "Hugging Face safetensors", "mistral": "Mistral native", "gguf": "GGUF"}[fmt],
        "architecture": config.architecture,
        "parameters": _human(config.parameter_count()),
        "layers": str(config.n_layers),
        "embedding dim": str(config.dim),
        "feed-forward dim": str(config.hidden_dim),
        "heads": str(config.n_heads),
        "kv heads": str(config.n_kv_heads),
        "head dim": str(config.head_dim),
        "sliding window": str(config.sliding_window) if config.sliding_window else "none",
        "experts": experts,
        "context length": str(config.max_seq_len),
        "rope theta": f"{config.rope_theta:g}",
        "vocabulary": str(config.vocab_size),
        "tied embeddings": "yes" if config.tie_embeddings else "no",
        "weight types": types,
        "chat format": tokenizer.chat_format,
    }
    if config.moe:
        info["active parameters"] = _human(config.active_parameter_count())
    return info


@dataclass(frozen=True)
class Summary:
    """A model in a few facts, as model lists show it (Ollama's /api/tags and /api/show)."""

    format: str  # "gguf", "safetensors" or "mistral"
    family: str  # the architecture: "llama", "mistral", "mixtral"...
    parameters: int
    quantization: str  # the most common type of its matrices: "Q4_K", "BF16"...
    context_length: int
    size: int  # bytes on disk
    modified: float  # the newest file's modification time (seconds since the epoch)
    config: ModelConfig


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in sorted(path.iterdir()) if p.is_file()]


def summarize(path: Path) -> Summary:
    """Read from the config and the file headers (no weights loaded)."""
    fmt, config, source, _ = open_source(path)
    counts = {k.upper(): v for k, v in source.type_counts().items()}
    matrices = {k: v for k, v in counts.items() if k not in ("F32", "FLOAT32")} or counts
    files = _files(path)
    return Summary(
        format={"hf": "safetensors"}.get(fmt, fmt),
        family=config.architecture,
        parameters=config.parameter_count(),
        quantization=max(matrices, key=lambda k: matrices[k]) if matrices else "F32",
        context_length=config.max_seq_len,
        size=sum(p.stat().st_size for p in files),
        modified=max((p.stat().st_mtime for p in files), default=0.0),
        config=config,
    )
