"""Model assembly, above the readers: files -> tensors -> packed / fused / sharded modules -> backend.

`load_model` (load.py) builds a `Transformer` from a folder or GGUF file; `random_model` (random.py)
from random weights; `select_backend` (backend.py) picks the decode backend a runner uses."""

from .backend import select_backend
from .load import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model", "select_backend"]
