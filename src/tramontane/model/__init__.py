"""Model code: tensors in, tensors out. No I/O, no tokenizers, no sampling."""

from .backend import Backend, ModuleBackend
from .cache import Cache, KVCache, PagedCache
from .kv_types import KV_TYPES, KvType, kv_type
from .transformer import Transformer

__all__ = [
    "KV_TYPES",
    "Backend",
    "Cache",
    "KVCache",
    "KvType",
    "ModuleBackend",
    "PagedCache",
    "Transformer",
    "kv_type",
]
