"""Decode backends: what runs a model's forward step for a runner, chosen once, explicitly.

A runner (the offline generator in decoding/offline.py, the serving engine in engine/) holds one
`Backend` and calls `prefill` for chunks of prompt tokens and `decode` for one-token steps; both return
the final normed hidden states [B,T,dim], from which `model.logits` makes logits. The backend is picked
by `build.select_backend(model, cache_kind, dtype)` when the runner is built; no package grafts a fast
path onto the model.

`ModuleBackend` (here) is the portable default: the PyTorch modules, every cache layout, every model
(dense, MoE, LoRA, sharded, training). `quant.step.CompiledStep` runs whole decode blocks in the
compiled C step where the model and the cache fit it (see its `fits` and `supports`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .cache import Cache
from .kv_types import KvType
from .transformer import Transformer


@runtime_checkable
class Backend(Protocol):
    """One model's forward step, for one kind of cache."""

    name: str  # shown in the server's start-up log line and by `tramontane show --backend`
    model: Transformer  # what it runs (logits, adapters and embeddings are read from it)

    def supports(self, cache_kind: type[Cache], kv: KvType) -> bool:
        """Whether this backend can run steps on caches of this class storing keys/values as `kv`."""
        ...

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        """tokens, positions [B,T] (-1 = padding; None = 0..T-1 on every row) -> final normed hidden
        states [B,T,dim]."""
        ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One token per row: tokens, positions [B,1] -> [B,1,dim]."""
        ...

    def current(self) -> bool:
        """Whether the model still holds the modules this backend was built over (a module swap since,
        such as LoRA, means the runner must pick again)."""
        ...

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax of logits [B,V] float32 (greedy decoding's tokens) -> [B] int64: the first of
        equal maxima, the first NaN where a row has one (numpy's rule, and torch's)."""
        ...

    def greedy(self, hidden: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor | None:
        """Each row's greedy token from final hidden states [B,dim]: the argmax of model.logits(hidden) plus
        `bias` (a logit_bias every row shares, as apply_logit_bias adds it) as `argmax` takes it -> [B]
        int64, where the backend finds it without every logit; None where it does not."""
        ...


class ModuleBackend:
    """The PyTorch module path: every layer as modules, any cache."""

    name = "module"

    def __init__(self, model: Transformer) -> None:
        self.model = model

    def supports(self, cache_kind: type[Cache], kv: KvType) -> bool:
        return True

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, cache)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, cache)

    def current(self) -> bool:
        return True  # runs whatever modules the model holds

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return rows_argmax(logits)

    def greedy(self, hidden: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor | None:
        return None  # the modules compute every logit


def rows_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`Backend.argmax` in numpy, whose argmax is vectorised (16 rows of 49,152 logits: 60 us against
    torch's 390-770 us; one row 5 us against 52 us), on the logits' own memory where it can be."""
    rows = logits if logits.dtype is torch.float32 and logits.is_contiguous() else logits.float().contiguous()
    return torch.from_numpy(rows.detach().numpy().argmax(axis=-1))
