"""`ModelConfig`: the one description of a model's architecture.

Built only through the named constructors below, which do all defaulting and validation; model code
never guesses from paths or file names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigError

# DESIGN.md: the v0.1 params.json has no rope_theta; 10000 with a sliding window, 1e6 without.
ROPE_THETA_WITH_SLIDING_WINDOW = 10_000.0
ROPE_THETA_WITHOUT_SLIDING_WINDOW = 1_000_000.0
MAX_LAYERS = 1024
MAX_DIM = 1 << 17
MAX_VOCAB = 1 << 24


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    sliding_window: int | None = None
    max_seq_len: int = 32768
    tie_embeddings: bool = False
    moe: MoeConfig | None = None
    architecture: str = "mistral"
    quant: str | None = None  # how weights are held after loading: None (float), "gguf" (packed blocks)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- named constructors -------------------------------------------------------------------
    @classmethod
    def from_params_json(cls, params: Mapping[str, Any], source: str = "params.json") -> ModelConfig:
        """Mistral's native `params.json` (mistral-inference's ModelArgs field names)."""
        get = _getter(params, source)
        dim, n_heads = get("dim", int), get("n_heads", int)
        sliding_window = _window(params.get("sliding_window"), source)
        moe = None
        if params.get("moe"):
            m = params["moe"]
            if not isinstance(m, Mapping):
                raise ConfigError(f"{source}: field 'moe' must be an object, got {m!r}")
            moe = MoeConfig(
                _getter(m, source + ":moe")("num_experts", int), _getter(m, source + ":moe")("num_experts_per_tok", int)
            )
        theta = params.get("rope_theta")
        if theta is None:
            theta = ROPE_THETA_WITH_SLIDING_WINDOW if sliding_window else ROPE_THETA_WITHOUT_SLIDING_WINDOW
        return _build(
            source,
            vocab_size=get("vocab_size", int),
            dim=dim,
            n_layers=get("n_layers", int),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads", n_heads)),
            head_dim=int(params.get("head_dim") or _div(dim, n_heads, source)),
            hidden_dim=get("hidden_dim", int),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(theta),
            sliding_window=sliding_window,
            max_seq_len=int(params.get("max_seq_len") or params.get("max_position_embeddings") or 32768),
            tie_embeddings=bool(params.get("tied_embeddings", False)),
            moe=moe,
            architecture="mixtral" if moe else "mistral",
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """A Hugging Face `config.json` with model_type mistral, mixtral or llama."""
        model_type = cfg.get("model_type")
        if model_type not in ("mistral", "mixtral", "llama"):
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: mistral, mixtral, llama)"
            )
        get = _getter(cfg, source)
        _check_rope_scaling(cfg.get("rope_scaling"), source)
        dim, n_heads = get("hidden_size", int), get("num_attention_heads", int)
        moe = None
        if model_type == "mixtral":
            moe = MoeConfig(get("num_local_experts", int), get("num_experts_per_tok", int))
        window = _window(cfg.get("sliding_window"), source) if model_type != "llama" else None
        if cfg.get("use_sliding_window") is False:
            window = None
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(cfg.get("rope_parameters"), Mapping):
            theta = cfg["rope_parameters"].get("rope_theta")
        if theta is None:
            theta = 10_000.0
        return _build(
            source,
            vocab_size=get("vocab_size", int),
            dim=dim,
            n_layers=get("num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or _div(dim, n_heads, source)),
            hidden_dim=get("intermediate_size", int),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            sliding_window=window,
            max_seq_len=int(cfg.get("max_position_embeddings") or 32768),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            moe=moe,
            architecture=model_type,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF metadata") -> ModelConfig:
        """GGUF key/value metadata of architecture `llama` (Mistral, Mixtral and Llama files)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{source}: general.architecture {arch!r} is not supported (supported: llama)")
        get = _getter(meta, source)
        p = "llama."
        dim, n_heads = get(p + "embedding_length", int), get(p + "attention.head_count", int)
        n_kv = meta.get(p + "attention.head_count_kv", n_heads)
        vocab = meta.get(p + "vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{source}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
            vocab = len(tokens)
        n_experts = int(meta.get(p + "expert_count", 0) or 0)
        moe = MoeConfig(n_experts, get(p + "expert_used_count", int)) if n_experts > 0 else None
        head_dim = meta.get(p + "attention.key_length") or meta.get(p + "rope.dimension_count")
        return _build(
            source,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=get(p + "block_count", int),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            head_dim=int(head_dim or _div(dim, n_heads, source)),
            hidden_dim=get(p + "feed_forward_length", int),
            norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(p + "rope.freq_base", 10_000.0)),
            sliding_window=_window(meta.get(p + "attention.sliding_window"), source),
            max_seq_len=int(meta.get(p + "context_length") or 4096),
            tie_embeddings=bool(meta.get("_tramontane.tied", False)),
            moe=moe,
            architecture="mixtral" if moe else "llama",
        )

    # ---- derived --------------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def parameter_count(self) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        e = self.moe.num_experts if self.moe else 1
        ffn = 3 * d * self.hidden_dim * e + (d * e if self.moe else 0)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + ffn + 2 * d) + d + emb

    def active_parameter_count(self) -> int:
        if not self.moe:
            return self.parameter_count()
        unused = self.moe.num_experts - self.moe.num_experts_per_tok
        return self.parameter_count() - self.n_layers * 3 * self.dim * self.hidden_dim * unused


def _getter(m: Mapping[str, Any], source: str):
    def get(key: str, kind: type):
        if key not in m or m[key] is None:
            raise ConfigError(f"{source}: required field {key!r} is missing")
        try:
            value = kind(m[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: field {key!r} has value {m[key]!r}, expected {kind.__name__}") from None
        return value

    return get


def _div(a: int, b: int, source: str) -> int:
    if b <= 0 or a % b:
        raise ConfigError(f"{source}: dimension {a} is not divisible by head count {b}")
    return a // b


def _window(value: Any, source: str) -> int | None:
    if value is None or value == 0:
        return None
    if isinstance(value, list):  # per-layer lists (newer params.json): one value when all agree
        if len(set(value)) != 1:
            raise ConfigError(f"{source}: per-layer sliding_window {value!r} is not supported")
        return _window(value[0], source)
    try:
        w = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: sliding_window {value!r} is not an integer") from None
    if w < 0:
        raise ConfigError(f"{source}: sliding_window {w} must be positive")
    return w


def _check_rope_scaling(scaling: Any, source: str) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) else scaling
    if kind not in (None, "default"):
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported")


def _build(source: str, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _validate(c: ModelConfig) -> None:
    checks = [
        (0 < c.n_layers <= MAX_LAYERS, f"n_layers {c.n_layers} must be in 1..{MAX_LAYERS}"),
        (0 < c.dim <= MAX_DIM, f"dim {c.dim} must be in 1..{MAX_DIM}"),
        (0 < c.hidden_dim <= 16 * MAX_DIM, f"hidden_dim {c.hidden_dim} out of range"),
        (0 < c.vocab_size <= MAX_VOCAB, f"vocab_size {c.vocab_size} must be in 1..{MAX_VOCAB}"),
        (c.n_heads > 0 and c.n_kv_heads > 0, f"head counts {c.n_heads}/{c.n_kv_heads} must be positive"),
        (
            c.n_kv_heads > 0 and c.n_heads % c.n_kv_heads == 0,
            f"n_heads {c.n_heads} is not a multiple of n_kv_heads {c.n_kv_heads}",
        ),
        (0 < c.head_dim <= 4096 and c.head_dim % 2 == 0, f"head_dim {c.head_dim} must be even and positive"),
        (c.rope_theta > 0, f"rope_theta {c.rope_theta} must be positive"),
        (c.norm_eps > 0, f"norm_eps {c.norm_eps} must be positive"),
        (c.max_seq_len > 0, f"max_seq_len {c.max_seq_len} must be positive"),
    ]
    if c.moe is not None:
        checks.append(
            (
                0 < c.moe.num_experts_per_tok <= c.moe.num_experts <= 1024,
                f"moe: {c.moe.num_experts_per_tok} of {c.moe.num_experts} experts is not valid",
            )
        )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
