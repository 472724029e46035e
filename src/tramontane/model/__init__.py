"""Model code: tensors in, tensors out. No I/O, no tokenizers, no sampling."""

from .cache import KVCache
from .transformer import Transformer

__all__ = ["KVCache", "Transformer"]
