"""LoRA as a module swap: adapters wrap the built model's projections, several named adapters at once.

`apply_lora` wraps the target projections (nn.Linear or packed PackedLinear) in `LoRALinear`, and gives
Mixtral's experts per-expert A/B stacks through `ExpertLoRA` (MoeFeedForward calls its `delta` hook).
Each adapter adds scale * B(A(dropout(x))) with scale = alpha / r, as PEFT's lora.Linear computes it
(Hu et al. 2021, "LoRA", eq. 3). Which adapter applies comes from one `AdapterSelection` shared by all
LoRA modules of a model: either one active adapter for every row, or a slot per flattened row (the
server's mixed batches). Rows without an adapter get exactly base(x).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.moe import MoeFeedForward
from ..model.transformer import Transformer
from ..quant.linear import PackedLinear, dequantize_model, set_module, unfuse_projections

DENSE_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Mixtral: the router, and every expert's w1/w2/w3 (on a Mixtral block "w1" etc. name the experts' too)
MOE_TARGETS = ("gate", "experts")
DEFAULT_TARGETS = DENSE_TARGETS + ("gate",)  # dense models have no router: "gate" matches nothing there
EXPERT_PROJECTIONS = ("w1", "w2", "w3")


@dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (scale = alpha / r), dropout on the adapter input while training, target names."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoraSpec.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ConfigError(f"LoraSpec.alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in DENSE_TARGETS + MOE_TARGETS]
        if not self.targets or unknown:
            raise ConfigError(
                f"LoraSpec.targets: unknown target(s) {unknown or '(none given)'}; "
                f"known: {', '.join(DENSE_TARGETS + MOE_TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class AdapterSelection:
    """Which adapter applies to which row, shared by every LoRA module of one model.

    `rows` [N] int64 (N = rows of x.reshape(-1, in)) gives each row's slot in `names` (-1 = no adapter)
    and takes precedence over `active` (one adapter name for all rows, or None = base only)."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.rows: torch.Tensor | None = None
        self.names: list[str] = []
        self.adapters: set[str] = set()  # every adapter name installed in the model


def _row_masks(sel: AdapterSelection, rows: torch.Tensor, have: nn.ParameterDict) -> Iterator[tuple[str, torch.Tensor]]:
    """(adapter name, row mask [n,1]) for each slot this module holds an adapter for; no host sync."""
    for slot, name in enumerate(sel.names):
        if name in have:
            yield name, (rows == slot)[:, None]


def _adapter_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float, training: bool
) -> torch.Tensor:
    """scale * B(A(dropout(x))) in the adapter's dtype (PEFT's lora.Linear order): x [..., in] -> [..., out]."""
    h = x.to(a.dtype)
    if dropout and training:
        h = F.dropout(h, dropout, training=True)
    return F.linear(F.linear(h, a), b) * scale


class LoRALinear(nn.Module):
    """A frozen base projection (nn.Linear or PackedLinear) plus named adapters A [r,in], B [out,r]."""

    def __init__(self, base: nn.Module, selection: AdapterSelection) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.dropouts: dict[str, float] = {}
        self.selection = selection

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float) -> list[nn.Parameter]:
        self.lora_A[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(b)
        self.scales[name], self.dropouts[name] = scale, dropout
        return [self.lora_A[name], self.lora_B[name]]

    def remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scales[name], self.dropouts[name]

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return _adapter_delta(
            x, self.lora_A[name], self.lora_B[name], self.scales[name], self.dropouts[name], self.training
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        sel = self.selection
        if sel.rows is None:
            if sel.active is not None and sel.active in self.lora_A:
                y = y + self.delta(x, sel.active).to(y.dtype)
            return y
        flat = x.reshape(-1, self.in_features)  # [N,in]: the rows `sel.rows` numbers
        if sel.rows.shape[0] != flat.shape[0]:
            raise ValueError(f"adapter rows has {sel.rows.shape[0]} entries for {flat.shape[0]} input rows")
        total = None
        for name, mask in _row_masks(sel, sel.rows, self.lora_A):
            d = torch.where(mask, self.delta(flat, name).to(y.dtype), 0.0)  # [N,out], zero for other rows
            total = d if total is None else total + d
        return y if total is None else y + total.view(y.shape)  # [N,out] -> [..., out]

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}"


class ExpertLoRA(nn.Module):
    """Per-expert adapters of a MoeFeedForward's w1/w2/w3: A [E,r,in], B [E,out,r] for each projection."""

    def __init__(self, selection: AdapterSelection) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({p: nn.ParameterDict() for p in EXPERT_PROJECTIONS})
        self.lora_B = nn.ModuleDict({p: nn.ParameterDict() for p in EXPERT_PROJECTIONS})
        self.scales: dict[tuple[str, str], float] = {}
        self.dropouts: dict[str, float] = {}
        self.selection = selection

    def names(self) -> set[str]:
        return {n for p in EXPERT_PROJECTIONS for n in self.lora_A[p]}

    def add(
        self, proj: str, name: str, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float
    ) -> list[nn.Parameter]:
        self.lora_A[proj][name], self.lora_B[proj][name] = nn.Parameter(a), nn.Parameter(b)
        self.scales[proj, name], self.dropouts[name] = scale, dropout
        return [self.lora_A[proj][name], self.lora_B[proj][name]]

    def remove(self, name: str) -> None:
        for p in EXPERT_PROJECTIONS:
            if name in self.lora_A[p]:
                del self.lora_A[p][name], self.lora_B[p][name], self.scales[p, name]
        self.dropouts.pop(name, None)

    def _one(self, proj: str, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[proj][name][e], self.lora_B[proj][name][e]  # [r,in], [out,r]
        return _adapter_delta(x, a, b, self.scales[proj, name], self.dropouts[name], self.training)

    def delta(self, proj: str, e: int, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """The adapters' term for expert e's `proj` on x [n,in] -> [n,out], or None when no adapter applies.

        tokens [n]: each row's index in the MoE layer's flattened input (None: row i is token i)."""
        sel, have = self.selection, self.lora_A[proj]
        if sel.rows is None:
            return self._one(proj, sel.active, e, x) if sel.active is not None and sel.active in have else None
        rows = sel.rows if tokens is None else sel.rows[tokens]  # [n]
        total = None
        for name, mask in _row_masks(sel, rows, have):
            d = torch.where(mask, self._one(proj, name, e, x), 0.0)  # [n,out]
            total = d if total is None else total + d
        return total


# ---- installing, selecting, reading and merging adapters -------------------------------------------


def selection_of(model: Transformer) -> AdapterSelection:
    """The model's shared adapter selection (created on first use)."""
    sel = getattr(model, "lora_selection", None)
    if sel is None:
        sel = AdapterSelection()
        model.lora_selection = sel
    return sel


def _targets(model: Transformer, spec: LoraSpec) -> list[str]:
    """Our names of the targeted projections ("layers.0.attention.wq", "layers.0.feed_forward.w1" of experts)."""
    paths: list[str] = []
    for i, block in enumerate(model.layers):
        ff, p = block.feed_forward, f"layers.{i}."
        paths += [f"{p}attention.{t}" for t in ("wq", "wk", "wv", "wo") if t in spec.targets]
        if isinstance(ff, MoeFeedForward):
            paths += [f"{p}feed_forward.gate"] if "gate" in spec.targets else []
            paths += [
                f"{p}feed_forward.{w}" for w in EXPERT_PROJECTIONS if w in spec.targets or "experts" in spec.targets
            ]
        else:
            paths += [f"{p}feed_forward.{t}" for t in EXPERT_PROJECTIONS if t in spec.targets]
    if not paths:
        raise ConfigError(
            f"LoraSpec.targets {list(spec.targets)} match no module of this {model.config.architecture} model"
        )
    return paths


def _shape(model: Transformer, path: str) -> tuple[int, int, int | None]:
    """(out, in, experts or None) of the projection at `path`."""
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(owner, MoeFeedForward) and leaf in EXPERT_PROJECTIONS:
        e, out, inp = owner.stack_shape(leaf)  # [E,out,in]
        return out, inp, e
    module = owner.get_submodule(leaf)
    return module.out_features, module.in_features, None


def apply_lora(model: Transformer, spec: LoraSpec, name: str = "default", seed: int = 0) -> list[nn.Parameter]:
    """Add adapter `name` on spec.targets, initialised as PEFT does (A kaiming-uniform a=sqrt(5), B zeros).

    Fused packed projections are split back first (into views of the same rows, which the compiled step
    still runs as one matrix, adapters included; quant/step_adapters.py). Everything but the new adapter is frozen; the new adapter becomes the active one. Returns its
    trainable parameters."""
    gen = torch.Generator().manual_seed(seed)
    unfuse_projections(model)
    state: dict[str, torch.Tensor] = {}
    for path in _targets(model, spec):
        out, inp, experts = _shape(model, path)
        a = torch.empty((experts or 1), spec.rank, inp)  # [E,r,in]
        for a_e in a:  # per expert, so fan_in is `in` as for one nn.Linear
            nn.init.kaiming_uniform_(a_e, a=math.sqrt(5), generator=gen)
        state[path + ".lora_A"] = a if experts else a[0]
        state[path + ".lora_B"] = torch.zeros(*([experts] if experts else []), out, spec.rank)
    return add_adapter(model, name, state, spec.scale, spec.dropout)


def _check_new_name(sel: AdapterSelection, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without '.'")
    if name in sel.adapters:
        raise ConfigError(f"adapter {name!r} is already installed in this model")


def add_adapter(
    model: Transformer, name: str, state: dict[str, torch.Tensor], scale: float | dict[str, float], dropout: float = 0.0
) -> list[nn.Parameter]:
    """Install adapter `name` from tensors named as `lora_state` returns them ("<path>.lora_A" [r,in] or,
    for experts, [E,r,in]; "<path>.lora_B" [out,r] / [E,out,r]). scale: one value or one per path."""
    sel = selection_of(model)
    _check_new_name(sel, name)
    unfuse_projections(model)
    paths = sorted({k.rpartition(".")[0] for k in state})
    params: list[nn.Parameter] = []
    for path in paths:
        a, b = state.get(path + ".lora_A"), state.get(path + ".lora_B")
        if a is None or b is None:
            raise ConfigError(f"adapter {name!r}: {path} needs both lora_A and lora_B")
        _check_pair(model, path, a, b)
        s = scale[path] if isinstance(scale, dict) else scale
        params += _install(model, path, name, a, b, s, dropout, sel)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    sel.adapters.add(name)
    sel.active = name
    return params


def _check_pair(model: Transformer, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    try:
        out, inp, experts = _shape(model, path)
    except AttributeError:
        raise ConfigError(f"adapter tensor {path!r}: the model has no such projection") from None
    lead = (experts,) if experts else ()
    r = a.shape[-2] if a.dim() >= 2 else -1
    if tuple(a.shape) != (*lead, r, inp) or tuple(b.shape) != (*lead, out, r) or r < 1:
        raise ConfigError(
            f"adapter tensors for {path!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do "
            f"not fit a {list((*lead, out, inp))} projection"
        )


def _install(
    model: Transformer,
    path: str,
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: float,
    sel: AdapterSelection,
) -> list[nn.Parameter]:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(owner, MoeFeedForward) and leaf in EXPERT_PROJECTIONS:
        device = next(itertools.chain(owner.parameters(), owner.buffers())).device  # float or packed experts
        if owner.expert_lora is None:
            owner.expert_lora = ExpertLoRA(sel)
        return owner.expert_lora.add(leaf, name, a.float().to(device), b.float().to(device), scale, dropout)
    module = owner.get_submodule(leaf)
    if not isinstance(module, LoRALinear):
        if not isinstance(module, nn.Linear | PackedLinear):
            raise ConfigError(f"{path}: cannot put LoRA on a {type(module).__name__}")
        module = LoRALinear(module, sel)
        set_module(model, path, module)
    device = next(
        iter(module.base.buffers() if isinstance(module.base, PackedLinear) else module.base.parameters())
    ).device
    return module.add(name, a.float().to(device), b.float().to(device), scale, dropout)


def _known(model: Transformer, name: str | None) -> None:
    if name is not None and name not in selection_of(model).adapters:
        raise ConfigError(f"no adapter named {name!r} (installed: {sorted(selection_of(model).adapters)})")


def set_active(model: Transformer, name: str | None) -> None:
    """Apply adapter `name` to every row (None: the base model alone); clears per-row selection."""
    _known(model, name)
    sel = selection_of(model)
    sel.active, sel.rows, sel.names = name, None, []


def set_rows(model: Transformer, rows: torch.Tensor | None, names: list[str]) -> None:
    """Per-row adapters: rows [N] int64 = slot in `names` of each flattened input row, -1 = none.
    rows=None returns to the single active adapter."""
    for n in names:
        _known(model, n)
    if rows is not None and (rows.dtype != torch.int64 or rows.dim() != 1):
        raise ConfigError(f"adapter rows must be a 1-D int64 tensor, got {rows.dtype} {list(rows.shape)}")
    sel = selection_of(model)
    sel.rows, sel.names = rows, list(names) if rows is not None else []


def _wrappers(model: Transformer) -> Iterator[tuple[str, LoRALinear | ExpertLoRA]]:
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module
        elif isinstance(module, ExpertLoRA):
            yield path.rpartition(".")[0], module  # the MoeFeedForward's path


def lora_state(model: Transformer, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` as tensors with our names: "layers.0.attention.wq.lora_A" [r,in], ".lora_B" [out,r];
    experts "layers.0.feed_forward.w1.lora_A" [E,r,in] and ".lora_B" [E,out,r]."""
    _known(model, name)
    out: dict[str, torch.Tensor] = {}
    for path, m in _wrappers(model):
        if isinstance(m, LoRALinear) and name in m.lora_A:
            out[path + ".lora_A"], out[path + ".lora_B"] = m.lora_A[name].detach(), m.lora_B[name].detach()
        elif isinstance(m, ExpertLoRA):
            for p in EXPERT_PROJECTIONS:
                if name in m.lora_A[p]:
                    out[f"{path}.{p}.lora_A"] = m.lora_A[p][name].detach()
                    out[f"{path}.{p}.lora_B"] = m.lora_B[p][name].detach()
    return out


def lora_scales(model: Transformer, name: str) -> dict[str, float]:
    """scale (alpha / r) of adapter `name` per projection path."""
    _known(model, name)
    out: dict[str, float] = {}
    for path, m in _wrappers(model):
        if isinstance(m, LoRALinear) and name in m.lora_A:
            out[path] = m.scales[name]
        elif isinstance(m, ExpertLoRA):
            out |= {f"{path}.{p}": m.scales[p, name] for p in EXPERT_PROJECTIONS if (p, name) in m.scales}
    return out


@torch.no_grad()
def merge_lora(model: Transformer, name: str) -> None:
    """Fold adapter `name` (W += scale * B @ A) into the base weights and put plain modules back.

    A packed model is dequantized to float32 first, so the result is a plain float model. Other adapters
    stay installed (on top of the merged weights)."""
    _known(model, name)
    for path, m in list(_wrappers(model)):
        if isinstance(m, LoRALinear) and name in m.lora_A:
            base = m.base
            weight = base.dequantize() if isinstance(base, PackedLinear) else base.weight.float()  # [out,in]
            merged = weight + m.scales[name] * (m.lora_B[name].float() @ m.lora_A[name].float())
            dtype = torch.float32 if isinstance(base, PackedLinear) else base.weight.dtype
            linear = nn.Linear(m.in_features, m.out_features, bias=False, device=merged.device, dtype=dtype)
            linear.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
            m.remove(name)
            m.base = linear
            if not m.lora_A:
                set_module(model, path, linear)
        elif isinstance(m, ExpertLoRA) and name in m.names():
            moe = model.get_submodule(path)
            for p in EXPERT_PROJECTIONS:
                if name in m.lora_A[p]:
                    w = getattr(moe, p)  # [E,out,in]
                    if not isinstance(w, torch.Tensor):  # packed experts: merged into float32 weights
                        w = nn.Parameter(w.dequantize(), requires_grad=False)
                        setattr(moe, p, w)
                    delta = torch.bmm(m.lora_B[p][name].float(), m.lora_A[p][name].float())  # [E,out,r]@[E,r,in]
                    w.copy_((w.float() + m.scales[p, name] * delta).to(w.dtype))
            m.remove(name)
            if not m.names():
                moe.expert_lora = None
    sel = selection_of(model)
    sel.adapters.discard(name)
    sel.active = None if sel.active == name else sel.active  # rows naming it now get the merged weights
    dequantize_model(model)
