"""RMSNorm, rotary embedding and the SwiGLU feed-forward: pure tensor code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as mistral-inference and HF do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.float32 and self.weight.dtype is torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same formula
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D) for i in [0, D/2), float32: [D/2]."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """e^(i * position * frequency): positions [B,T] -> complex64 [B,T,1,D/2] (broadcast over heads).

    Positions are absolute (padding slots carry -1; their values are never attended)."""
    angles = positions.float()[..., None] * inv_freq  # [B,T,1] * [D/2] -> [B,T,D/2]
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # [B,T,1,D/2]


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position's angle, Mistral's native layout: the
    pair read as the complex number x[2i] + i x[2i+1], times e^(i angle). x [B,T,H,D] -> [B,T,H,D]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B,T,H,D] -> complex [B,T,H,D/2]
    return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)  # [B,T,H,D/2,2] -> [B,T,H,D]


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask, True = may attend: q_pos [B,T], k_pos [B,S] -> [B,1,T,S].

    A query at position i sees keys at positions j with 0 <= j <= i and, with a window W, i - W < j.
    With segments [B,T] (queries and keys are the same tokens: packed training rows), a token sees only
    its own segment: sequences packed into one row stay independent."""
    qi, kj = q_pos[:, :, None], k_pos[:, None, :]  # [B,T,1], [B,1,S]
    allowed = (kj >= 0) & (kj <= qi)
    if window is not None:
        allowed &= qi - kj < window
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]  # [B,T,1] == [B,1,T]
    # Padding queries (position -1) see nothing; let them see everything so SDPA returns no NaN.
    allowed |= ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]  # [B,1,T,S]


def empty_embedding(rows: int, dim: int, device: torch.device | str | None = None) -> nn.Embedding:
    """An nn.Embedding whose table is left as allocated: the models are built on the meta device and
    their weights come from the loaders. Its own N(0, 1) initialisation, run on a meta tensor, goes
    through torch._refs and so imports torch._dynamo: 1.1 s and ~60 MB resident in every process that
    loads a model, for nothing."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim, device=device))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1: nn.Module = nn.Linear(dim, hidden_dim, bias=False)
        self.w2: nn.Module = nn.Linear(hidden_dim, dim, bias=False)
        self.w3: nn.Module = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # set by quant.linear.fuse_projections (replaces w1, w3)
        self.hidden_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)  # [B,T,2F] -> 2 x [B,T,F]
        return self.w2(F.silu(gate) * up)
