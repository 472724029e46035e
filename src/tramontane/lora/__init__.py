"""LoRA adapters as module swaps on a built model, PEFT-compatible files, merging."""

from .layers import (
    AdapterSelection,
    ExpertLoRA,
    LoRALinear,
    LoraSpec,
    add_adapter,
    apply_lora,
    lora_scales,
    lora_state,
    merge_lora,
    set_active,
    set_rows,
)
from .peft import load_adapter, save_adapter

__all__ = [
    "AdapterSelection",
    "ExpertLoRA",
    "LoRALinear",
    "LoraSpec",
    "add_adapter",
    "apply_lora",
    "load_adapter",
    "lora_scales",
    "lora_state",
    "merge_lora",
    "save_adapter",
    "set_active",
    "set_rows",
]
