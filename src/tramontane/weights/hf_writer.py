"""Write a model as a Hugging Face folder: config.json, safetensors with HF names, tokenizer files.

The tensors are named and laid out as transformers' own `save_pretrained` writes them, which is also
what `AutoModelForCausalLM.from_pretrained` (4.x and 5.x) and our loader read: wq/wk rows back in HF's
rotate-half order (`permute_rotary`), Mixtral's experts one tensor per expert under
`block_sparse_moe.experts.{e}.w1/w2/w3` (transformers 5 fuses them into `mlp.experts.gate_up_proj` /
`down_proj` while loading). Packed (GGUF) matrices are dequantized to float32, one shard at a time, so
peak memory is the model plus one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, LoadError
from ..progress import tracked
from ._protocols import as_packed, fused, layers, model_config
from .names import permute_rotary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tekken.json")
# copied beside them where the source has them: the chat template, and the stop ids and sampling defaults
# transformers and vLLM read
COMPANION_FILES = ("chat_template.jinja", "generation_config.json")
TOKENIZER_PREFIX = "tokenizer.model"  # tokenizer.model, tokenizer.model.v1, .v3 ...
MAX_SHARD_BYTES = 5 * 2**30
ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}

# (HF name, tensor producer, bytes): producers run shard by shard, so packed weights decode lazily.
Entry = tuple[str, Callable[[], torch.Tensor], int]


def write_hf(
    model: nn.Module,
    folder: str | Path,
    tokenizer_source: Path | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Write a float or packed model (no LoRA adapters installed) as a Hugging Face safetensors folder;
    `progress`: show the tensors written (progress.py)."""
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ConfigError(
            "write_hf: the model has LoRA adapters installed; merge them (lora.merge_lora) "
            "or save them apart (lora.save_adapter)"
        )
    config = model_config(model)
    tokenizer = _tokenizer_files(Path(tokenizer_source)) if tokenizer_source is not None else []
    entries = _entries(model, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = _dtype(model.get_submodule("tok_embeddings"))
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2))
    _write_shards(folder, entries, max_shard_bytes, progress)
    for p in tokenizer:
        if p.resolve() != (folder / p.name).resolve():
            shutil.copyfile(p, folder / p.name)
    return folder


def model_type(config: ModelConfig) -> str:
    """HF model_type: mixtral with experts; mistral with a sliding window (GGUF files of Mistral say
    'llama'); else the configured architecture."""
    if config.moe is not None:
        return "mixtral"
    return "mistral" if config.sliding_window is not None or config.architecture == "mistral" else "llama"


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json fields of MistralConfig / LlamaConfig / MixtralConfig (both transformers 4 and 5 names
    for rope theta and dtype)."""
    kind = model_type(config)
    dtype_name = str(dtype).removeprefix("torch.")
    out = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if kind == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    else:
        out["sliding_window"] = config.sliding_window
    if config.moe is not None:
        out |= {
            "num_local_experts": config.moe.num_experts,
            "num_experts_per_tok": config.moe.num_experts_per_tok,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
        }
    return out


def _dtype(module: nn.Module) -> torch.dtype:
    return module.weight.dtype if isinstance(module, nn.Linear | nn.Embedding) else torch.float32


def _entry(
    name: str,
    module: nn.Module,
    shape: tuple[int, int],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Entry:
    """A 2-D weight of a float (nn.Linear / nn.Embedding) or packed (dequantize()) module."""

    def produce() -> torch.Tensor:
        w = module.weight.detach() if isinstance(module, nn.Linear | nn.Embedding) else as_packed(module).dequantize()
        return (transform(w) if transform else w).contiguous()

    return name, produce, shape[0] * shape[1] * _dtype(module).itemsize


def _expert_entry(name: str, ff: nn.Module, w: str, e: int, shape: tuple[int, int]) -> Entry:
    """Expert e's matrix of projection w: a slice of the float stack [E,out,in], or of packed experts
    (a module whose `expert(e)` is a packed matrix; decoded when its shard is written)."""
    stack = getattr(ff, w)
    if isinstance(stack, torch.Tensor):
        return _tensor(name, stack[e])
    return _entry(name, stack.expert(e), shape)


def _tensor(name: str, t: torch.Tensor) -> Entry:
    return name, (lambda: t.detach().contiguous()), t.numel() * t.element_size()


def _entries(model: nn.Module, c: ModelConfig) -> list[Entry]:
    entries = [_entry("model.embed_tokens.weight", model.get_submodule("tok_embeddings"), (c.vocab_size, c.dim))]
    for i, block in enumerate(layers(model)):
        entries += _block_entries(f"model.layers.{i}.", block, c)
    entries.append(_tensor("model.norm.weight", model.get_parameter("norm.weight")))
    if not c.tie_embeddings:
        entries.append(_entry("lm_head.weight", model.get_submodule("output"), (c.vocab_size, c.dim)))
    return entries


def _block_entries(p: str, block: nn.Module, c: ModelConfig) -> list[Entry]:
    att, ff = block.get_submodule("attention"), block.get_submodule("feed_forward")
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    wqkv = fused(att, "wqkv")
    wq, wk, wv = wqkv.split([q, kv, kv]) if wqkv is not None else [att.get_submodule(n) for n in ("wq", "wk", "wv")]
    out = [
        _entry(p + "self_attn.q_proj.weight", wq, (q, c.dim), lambda w: permute_rotary(w, c.n_heads)),
        _entry(p + "self_attn.k_proj.weight", wk, (kv, c.dim), lambda w: permute_rotary(w, c.n_kv_heads)),
        _entry(p + "self_attn.v_proj.weight", wv, (kv, c.dim)),
        _entry(p + "self_attn.o_proj.weight", att.get_submodule("wo"), (c.dim, q)),
        _tensor(p + "input_layernorm.weight", block.get_parameter("attention_norm.weight")),
        _tensor(p + "post_attention_layernorm.weight", block.get_parameter("ffn_norm.weight")),
    ]
    if c.moe is not None:
        out.append(_entry(p + "block_sparse_moe.gate.weight", ff.get_submodule("gate"), (c.moe.num_experts, c.dim)))
        shapes = {"w1": (c.hidden_dim, c.dim), "w2": (c.dim, c.hidden_dim), "w3": (c.hidden_dim, c.dim)}
        for e in range(c.moe.num_experts):
            out += [_expert_entry(f"{p}block_sparse_moe.experts.{e}.{w}.weight", ff, w, e, shapes[w]) for w in shapes]
        return out
    f = c.hidden_dim
    w13 = fused(ff, "w13")
    w1, w3 = w13.split([f, f]) if w13 is not None else (ff.get_submodule("w1"), ff.get_submodule("w3"))
    return out + [
        _entry(p + "mlp.gate_proj.weight", w1, (f, c.dim)),
        _entry(p + "mlp.up_proj.weight", w3, (f, c.dim)),
        _entry(p + "mlp.down_proj.weight", ff.get_submodule("w2"), (c.dim, f)),
    ]


def _write_shards(folder: Path, entries: list[Entry], max_shard_bytes: int, progress: bool = False) -> None:
    """One model.safetensors, or numbered shards + model.safetensors.index.json past max_shard_bytes."""
    from safetensors.torch import save_file

    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[2]
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for stale in folder.glob("model*.safetensors*"):
        stale.unlink()  # leftovers of an earlier write would be read as part of this model
    weight_map: dict[str, str] = {}
    for shard, file in zip(shards, names):
        shown = tracked(shard, len(shard), f"writing {file}", "tensors", progress)
        save_file({name: produce() for name, produce, _ in shown}, folder / file, metadata={"format": "pt"})
        as_umask_allows(folder / file)
        weight_map |= {name: file for name, _, _ in shard}
    if n > 1:
        index = {"metadata": {"total_size": sum(e[2] for e in entries)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def as_umask_allows(path: Path) -> None:
    """Give a written file the mode an ordinary new file gets (0666 less the umask): safetensors writes
    its files 0600, which other users of a shared model folder then cannot read."""
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    """The process's umask: from /proc where Linux shows it (reading it through os.umask means setting
    it for a moment, which another thread creating a file would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tokenizer_files(source: Path) -> list[Path]:
    """The tokenizer files of `source` (a folder, or one tokenizer file)."""
    if not source.exists():
        raise LoadError(source, "tokenizer source: no such file or folder")
    candidates = [source] if source.is_file() else sorted(source.iterdir())
    found = [
        p for p in candidates if p.is_file() and (p.name in TOKENIZER_FILES or p.name.startswith(TOKENIZER_PREFIX))
    ]
    if not found:
        raise LoadError(
            source, f"no tokenizer files found (looked for {', '.join(TOKENIZER_FILES)}, {TOKENIZER_PREFIX}*)"
        )
    return found + [p for p in candidates if p.is_file() and p.name in COMPANION_FILES]
