"""Model code: tensors in, tensors out. No I/O, no tokenizers, no sampling."""

from .backend import Backend, ModuleBackend
from .cache import Cache, KVCache, PagedCache
from .transformer import Transformer

__all__ = ["Backend", "Cache", "KVCache", "ModuleBackend", "PagedCache", "Transformer"]
