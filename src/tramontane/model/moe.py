"""Mixtral's sparse mixture-of-experts feed-forward.

Routing (DESIGN.md, mistral-inference MoeLayer): logits = gate(x) without bias; take the top K; softmax
over those K logits in float32; output = sum over the K chosen experts of weight * SwiGLU_e(x)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoeConfig


class ExpertAdapters(Protocol):
    """Per-expert LoRA adapters (lora.layers.ExpertLoRA, a module set by lora.apply_lora)."""

    def delta(self, proj: str, e: int, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The adapters' term for expert e's projection `proj` ("w1", "w2", "w3"): [n,out], or None."""
        ...


class ExpertMatrices(Protocol):
    """A stack of expert matrices [E, out, in] held some other way than a float tensor (quant/'s
    `PackedExperts`: GGML blocks, decoded on the fly). A module set in place of w1, w2 or w3."""

    num_experts: int
    out_features: int
    in_features: int

    def matmul(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n,in] @ W[e]^T -> [n,out] in x's dtype."""
        ...


class MoeFeedForward(nn.Module):
    # w1, w2, w3: float stacks (nn.Parameter) or, once a module swap packed them, ExpertMatrices modules
    w1: torch.Tensor | ExpertMatrices
    w2: torch.Tensor | ExpertMatrices
    w3: torch.Tensor | ExpertMatrices

    def __init__(self, dim: int, hidden_dim: int, moe: MoeConfig) -> None:
        super().__init__()
        e = moe.num_experts
        self.top_k = moe.num_experts_per_tok
        self.gate = nn.Linear(dim, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, hidden_dim, dim))  # [E,F,dim]
        self.w2 = nn.Parameter(torch.empty(e, dim, hidden_dim))  # [E,dim,F]
        self.w3 = nn.Parameter(torch.empty(e, hidden_dim, dim))  # [E,F,dim]
        # Set by lora.apply_lora: per-expert adapters, `delta(proj, e, x, tokens)` -> [n,out] or None.
        self.expert_lora: ExpertAdapters | None = None
        # Expert parallelism (parallel/shard.py): this module holds experts [first, stop) of all E; the
        # others' tokens contribute zeros here and are summed in from the ranks that hold them.
        self.expert_range: tuple[int, int] = (0, e)

    def stack_shape(self, name: str) -> tuple[int, int, int]:
        """[E, out, in] of the projection `name` ("w1", "w2", "w3"), float or packed."""
        w = getattr(self, name)
        if isinstance(w, torch.Tensor):
            e, out, inp = w.shape
            return e, out, inp
        return w.num_experts, w.out_features, w.in_features

    @property
    def num_experts(self) -> int:
        """Experts held by this module (all of them, or this rank's under expert parallelism)."""
        w1 = self.w1
        return w1.shape[0] if isinstance(w1, torch.Tensor) else w1.num_experts

    def matmul(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n,in] @ W[e]^T for the projection `name` ("w1", "w2", "w3") of held expert e -> [n,out]."""
        w = getattr(self, name)
        return F.linear(x, w[e]) if isinstance(w, torch.Tensor) else w.matmul(e, x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,dim] -> weights [N,K] (x's dtype) and expert ids [N,K]."""
        logits = self.gate(x)  # [N,E]
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)  # [N,K]
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)
        return weights, experts

    def expert(self, e: int, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU of expert e: x [n,dim] -> [n,dim]. tokens [n]: each row's index in the flattened input
        (tells per-row LoRA adapters which row is which)."""
        lora = self.expert_lora
        if lora is None:
            return self.matmul("w2", e, F.silu(self.matmul("w1", e, x)) * self.matmul("w3", e, x))
        h = F.silu(self._project(lora, "w1", e, x, tokens)) * self._project(lora, "w3", e, x, tokens)
        return self._project(lora, "w2", e, h, tokens)

    def _project(
        self, lora: ExpertAdapters, name: str, e: int, x: torch.Tensor, tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """x @ W[e]^T plus the adapters' term for this expert's projection `name`."""
        y = self.matmul(name, e, x)
        delta = lora.delta(name, e, x, tokens)
        return y if delta is None else y + delta.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batched path: group the (token, expert) pairs by expert, one matmul chain per used expert."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N,dim]
        weights, experts = self.route(flat)  # [N,K]
        if flat.shape[0] == 1:
            return self._one_token(flat, weights, experts).view(shape)
        order = experts.reshape(-1).argsort(stable=True)  # [N*K], grouped by expert
        token = order // self.top_k  # [N*K] token row of each pair
        first, stop = self.expert_range
        counts = torch.bincount(experts.reshape(-1), minlength=stop).tolist()  # one sync/layer
        grouped = flat[token]  # [N*K,dim]
        out = torch.empty_like(grouped) if stop - first == len(counts) else torch.zeros_like(grouped)
        start = 0
        for e, n in enumerate(counts):
            if n and first <= e < stop:
                out[start : start + n] = self.expert(e - first, grouped[start : start + n], token[start : start + n])
            start += n
        out *= weights.reshape(-1)[order, None]  # [N*K,dim]
        y = torch.zeros_like(flat).index_add_(0, token, out)  # [N,dim]
        return y.view(shape)

    def _one_token(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """A decode step's single token [1,dim]: its K experts in expert order (the order the batched path
        sums them in), without the grouping machinery."""
        first, stop = self.expert_range
        y = torch.zeros_like(flat)
        row = torch.zeros(1, dtype=torch.long)
        for k, e in sorted(enumerate(experts[0].tolist()), key=lambda pair: pair[1]):
            if first <= e < stop:
                y += self.expert(e - first, flat, row) * weights[0, k]
        return y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The test oracle: a plain loop over every expert, masking the tokens that chose it."""
        flat = x.reshape(-1, x.shape[-1])  # [N,dim]
        weights, experts = self.route(flat)  # [N,K]
        y = torch.zeros_like(flat)
        first, stop = self.expert_range
        for e in range(first, stop):
            chosen = experts == e  # [N,K]
            rows = chosen.any(dim=-1).nonzero().flatten()
            if len(rows):
                w = (weights * chosen).sum(dim=-1)[rows, None]  # [n,1]
                y[rows] += w * self.expert(e - first, flat[rows], rows)
        return y.view(x.shape)
