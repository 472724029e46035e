"""Fine-tuning settings: one frozen dataclass, read from a TOML or YAML file and overridden by flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "gate")  # "gate": Mixtral's router


@dataclass(frozen=True)
class TrainConfig:
    model: str | None = None  # None: the default model
    data: str | None = None  # JSONL, instruct ({"messages": ...}) or pretraining ({"text": ...}) lines
    eval: str | None = None  # JSONL of the same kinds, for the eval loss
    out: str | None = None  # folder: adapter, checkpoints, loss plot, metrics
    seq_len: int = 1024  # tokens per packed row; longer lines are reported as errors
    batch_size: int = 4  # packed rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps
    lr: float = 1e-4
    warmup_steps: int = 10  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    activation_checkpointing: bool = False
    autocast: str = "auto"  # "auto" (bfloat16 where the CPU has native bf16), "bfloat16", "off"
    quantized_base: bool = False  # keep a GGUF base packed (QLoRA-style) instead of dequantizing it
    seed: int = 0
    eval_every: int = 0  # steps between eval losses (0: only at the end, when there is eval data)
    save_every: int = 0  # steps between checkpoints (0: only the final adapter)

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "rank")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0 or not self.alpha > 0:
            raise ConfigError(f"lr and alpha must be positive, got lr={self.lr!r} alpha={self.alpha!r}")
        if not 0 <= self.dropout < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"dropout must be in [0, 1) and min_lr_ratio in [0, 1], got {self.dropout!r}, {self.min_lr_ratio!r}"
            )
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must not be negative")
        if self.autocast not in ("auto", "bfloat16", "off"):
            raise ConfigError(f"autocast must be 'auto', 'bfloat16' or 'off', got {self.autocast!r}")

    def with_(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a .toml, .yaml/.yml or .json file (a flat table; a [lora] table is flattened)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files are .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers' own syntax errors
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a table of settings, got {type(data).__name__}")
    return _flatten(path, data)


def _flatten(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("lora", "optim", "training"):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(FIELD_TYPES)})")
    if "targets" in flat:
        flat["targets"] = tuple(flat["targets"])
    return flat


def build_config(file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file's settings, then the flags that were given (None = not given)."""
    settings = read_config_file(file) if file else {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"bad fine-tuning settings: {exc}") from None
