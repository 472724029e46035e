"""The compiled decode step: whole transformer blocks of a one-token step in one C call each.

A decoding step (one new token per sequence) through the module path costs about fifteen PyTorch
operations per block, each a few microseconds of dispatch: for a small model that overhead, not the
weights, sets the speed. `CompiledStep` is a decode backend (model/backend.py) for models whose blocks
are all packed (fused wqkv and w13 `PackedLinear`s, dense SwiGLU, float32 norms; or a Mixtral block:
`PackedExperts` stacks and a float32 router, every expert held here) decoding on the offline
`KVCache` or on the serving pool's `PagedCache`, whatever type they store keys as (f32, bf16, f16,
q8_0: model/kv_types.py; the kernel rounds new keys as the cache does and decodes keys as it attends): it runs each block as one call of the compiled
`decode_block` (RMSNorm, packed projections, RoPE, cache write, attention over the visible keys,
SwiGLU or the routed experts; see quant/csrc/). On the pool a step is many sequences' tokens in one
row (decode tokens and prefill chunks), each attending its own sequence's blocks; offline, a prompt
chunk's tokens are rows mapped to their cache rows. One sequence's prompt chunk takes the module path
where that is faster (`_module_chunk`). Both compute the same arithmetic; they differ by rounding order
only (tests compare them). The one exception: where the CPU has AMX-BF16, the prompt rows of a prompt of
kernels.tiles_from() tokens or more (the cache's `prompts`: the runner's, the offline prefill's) take
bfloat16 tiles here, however the prompt was chunked. `build.select_backend` decides where it serves.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..model.backend import rows_argmax
from ..model.cache import Cache, KVCache, PagedCache
from ..model.kv_types import KvType
from ..model.layers import FeedForward, RMSNorm, rope_cos_sin
from ..model.moe import MoeFeedForward
from ..model.transformer import Transformer, TransformerBlock
from . import kernels
from .linear import PackedEmbedding, PackedExperts, PackedLinear, fuse_projections
from .step_adapters import (
    GROUPS,
    adapter_names,
    base_of,
    layer_adapters,
    packed_pieces,
    parts_of,
    row_slots,
    watched_tensors,
)

_get: Callable[[dict, str], object] = dict.get  # current()'s look-up, mapped over the watched holders
_registrations = [0]  # modules, parameters and buffers assigned anywhere in this process since import


def _count_registration(*_: object) -> None:
    _registrations[0] += 1  # returns None: the value is registered unchanged


for _hook in (
    torch.nn.modules.module.register_module_module_registration_hook,
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
):
    _hook(_count_registration)


def _block_fits(block: TransformerBlock) -> bool:
    att, ff = block.attention, block.feed_forward
    return (
        all(parts_of(att, fused, parts) is not None for _, fused, parts in GROUPS[:2])
        and (_dense_fits(ff) or _moe_fits(ff))
        and block.attention_norm.weight.dtype == torch.float32
        and block.ffn_norm.weight.dtype == torch.float32
    )


def _dense_fits(ff: nn.Module) -> bool:
    return type(ff) is FeedForward and all(parts_of(ff, fused, parts) is not None for _, fused, parts in GROUPS[2:])


def _moe_fits(ff: nn.Module) -> bool:
    """A whole Mixtral feed-forward (every expert here, no adapters, no hooks: not a rank's part of one)
    with packed experts and a float32 router."""
    return (
        type(ff) is MoeFeedForward
        and ff.expert_lora is None
        and ff.expert_range == (0, ff.num_experts)
        and not ff._forward_hooks
        and all(isinstance(getattr(ff, w), PackedExperts) for w in ("w1", "w2", "w3"))
        and type(ff.gate) is nn.Linear
        and ff.gate.weight.dtype == torch.float32
        and ff.top_k <= 64
    )


def fuse(model: Transformer) -> None:
    """Fuse the packed projections of `model` (q/k/v into wqkv, gate/up into w13): a module swap that
    the compiled step needs and that the module path runs faster too."""
    fuse_projections(model)


class CompiledStep:
    """Decode backend running every block of a one-token step through the compiled `decode_block`."""

    name = "compiled"

    def __init__(self, model: Transformer) -> None:
        if not self.fits(model):
            raise ValueError("the compiled step needs a model whose blocks are all packed (dense, or Mixtral's)")
        config = model.config
        self.model = model
        self.shape = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim)
        moe = config.moe
        self.experts = (moe.num_experts, moe.num_experts_per_tok) if moe is not None else (0, 0)
        self.eps = float(config.norm_eps)
        self.window = config.sliding_window or 0
        ext = kernels.extension()
        assert ext is not None  # fits() checked that the kernels are built
        self._run = ext.decode_block
        self._rms_norm = ext.rms_norm
        self._argmax = ext.argmax_rows
        self._lookup = ext.lookup_rows
        self._table: tuple | None = None  # (a PackedEmbedding's packed rows, their buffer)
        self._held: tuple | None = None  # (weakref to a KVCache, its layout, its _offline_layers)
        self._pool: tuple | None = None  # (weakrefs to a paged pool's k and v tensors, its kv type, their buffers)
        self._rope: tuple | None = None  # (inv_freq, its version, RoPE (cos, sin) of positions 0.. [n,D/2,2])
        self._merged: tuple | None = None  # (a per_layer list, run_blocks' dicts made from it)
        self.adapters = adapter_names(model)  # LoRA slots, copied per layer (quant/step_adapters.py)
        self._adapter_values = [layer_adapters(block, self.adapters) for block in model.blocks()]
        self._weights = [  # fixed while this backend serves
            _block_buffers(block) | _lora_buffers(*values, len(self.adapters))
            for block, values in zip(model.blocks(), self._adapter_values)
        ]
        self._types = frozenset(b[2] for w in self._weights for b in w.values() if len(b) == 3 and b[1])
        watched = _watch(model)  # what current() compares, and keeps alive while this step serves
        self._holders: list[dict] = [holder for holder, _, _ in watched]
        self._names: list[str] = [name for _, name, _ in watched]
        self._seen: list[object] = [value for _, _, value in watched]
        # Plain attributes (Mixtral's expert_range) change without a registration: compared every time.
        tables = {id(t) for t in _tables_of(model)}
        plain = [(h, n, v) for h, n, v in watched if v is not None and id(h) not in tables]
        self._plain = ([h for h, _, _ in plain], [n for _, n, _ in plain], [v for _, _, v in plain])
        self._versions = watched_tensors(model, self.adapters)
        self._clean_at = _registrations[0]  # no registration since: no module or tensor was swapped

    @staticmethod
    def fits(model: Transformer) -> bool:
        """Whether the compiled kernels are built and every block of `model` is packed, dense, float32,
        and whole: a rank's part of a sharded model (`model.parallel`) needs the collectives its
        modules' hooks run, which one C call per block would skip."""
        whole = getattr(model, "parallel", None) is None
        return kernels.available() and whole and all(_block_fits(b) for b in model.blocks())

    def supports(self, cache_kind: type[Cache], kv: KvType) -> bool:
        """The offline `KVCache` or the serving pool's `PagedCache`, keys stored as any KV type."""
        return issubclass(cache_kind, (KVCache, PagedCache))

    def current(self) -> bool:
        """False once any block's norm or packed projection was swapped (LoRA, re-quantization, ...), or an
        adapter was added, removed or updated in place. The engine asks before every step: every watched
        holder is looked at again only after a module, parameter or buffer was registered somewhere
        (torch's global registration hooks count them), since any swap registers one."""
        if _registrations[0] != self._clean_at:
            if not self._same_objects():
                return False
            self._clean_at = _registrations[0]
        holders, names, seen = self._plain
        return (
            all(map(operator.is_, map(_get, holders, names), seen))
            and adapter_names(self.model) == self.adapters
            and all(t._version == v for t, v in self._versions)
        )

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows split over the threads (rows.c): numpy's argmax read a 16-row step's 3 MB of logits
        on one thread, from memory, 0.3 ms of a 15 ms step of SmolLM2 (0.14 ms so)."""
        if logits.dim() != 2 or logits.dtype is not torch.float32 or not logits.is_contiguous() or logits.shape[1] == 0:
            return rows_argmax(logits)
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax(_buffer(logits), _buffer(out), logits.shape[0], logits.shape[1], torch.get_num_threads())
        return out

    def greedy(self, hidden: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor | None:
        """A packed Q8_0 head's argmax without every logit (csrc/greedy.c): its rows against x's first
        rounding to int8 alone (half the products of q16's two), then the exact logits of the few groups
        of rows that can hold the largest: SmolLM2's head at 16 rows in 0.69-0.81 of the matmul's time."""
        head = self.model.output
        return head.greedy(hidden, bias) if isinstance(head, PackedLinear) else None

    def _same_objects(self) -> bool:
        return len(self.model.layers) == len(self._weights) and all(
            map(operator.is_, map(_get, self._holders, self._names), self._seen)
        )

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        """A serving step on the paged pool runs compiled, unless it is one sequence's prompt chunk that
        the module path runs faster (`_module_chunk`). (Over several sequences the module path attends
        every query to every sequence's keys, masked: work that grows with the square of the batch; 14
        prompts of 2,000 shared tokens took 8.5 s through it against 2.4 s compiled.) Offline prompt
        chunks follow the same rule, so that a prompt computes offline as it does served."""
        if positions is not None and isinstance(cache, PagedCache):
            if cache.tables.shape[0] > 1 or not self._module_chunk(tokens.shape[1]):
                return self._paged(tokens, positions, cache)
        elif positions is not None and isinstance(cache, KVCache) and self._chunk_fits(positions, cache):
            if cache.batch_size > 1 or not self._module_chunk(tokens.shape[1]):
                return self._offline_chunk(tokens, positions, cache)
        return self.model.hidden_states(tokens, positions, cache)

    def _module_chunk(self, n: int) -> bool:
        """Whether one sequence's chunk of n tokens runs faster on the module path: where its matmuls take
        dequantize + sgemm there (more tokens than the packed kernels' M, `kernels.use_dense`), unless
        every block matrix runs its integer kernel at any M anyway; then the compiled tiles win (512-token
        prompt, same run: SmolLM2 Q4_0 785-896 tok/s against 604-733 on the module path, Q5_K_M 680-730
        against 506-652; a bfloat16 checkpoint, no integer kernel, 179-245 against 257-325); or where
        every block matrix is bfloat16 and the module path's matmuls take torch's bfloat16 GEMM
        (`kernels.bf16_gemm`: a 246M Mistral-shaped checkpoint's 512-token prefill 3.4x faster there),
        which they do only where the compiled step's own bfloat16 tiles do not run (`kernels.tiles_from`)."""
        if self._types and all(kernels.bf16_gemm(t, n) for t in self._types):
            return True
        return kernels.use_dense(n) and not kernels.integer_everywhere(self._types)

    @staticmethod
    def _chunk_fits(positions: torch.Tensor, cache: KVCache) -> bool:
        """An offline prompt chunk runs compiled where no position wraps the rolling buffer (every row's
        chunk is stored before any row attends)."""
        return int(positions.max()) < cache.size

    def _offline_chunk(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, positions [B,T] (-1 = padding) -> [B,T,dim]: every token one row of the compiled step,
        mapped to its cache row (so a prompt computes as it does as a serving step's chunk)."""
        B, T = tokens.shape
        cache.begin(positions)
        h = self._embedded(tokens.clamp(min=0))  # [B,T,dim]
        qpos = positions.reshape(-1).contiguous()  # [B*T]
        rows = torch.arange(B, dtype=torch.int32).repeat_interleave(T)  # [B*T] each token's cache row
        return self._final_norm(self.run_blocks(h, qpos, self._cos_sin(qpos), _offline_layers(cache, rows)))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
        """tokens, positions [B,1] -> final normed hidden states [B,1,dim]."""
        if isinstance(cache, PagedCache):
            return self._paged(tokens, positions, cache)
        if not isinstance(cache, KVCache) or tokens.shape[1] != 1:
            raise TypeError("CompiledStep.decode takes one token per row on a KVCache or PagedCache")
        cache.begin(positions)
        qpos = positions[:, 0]  # [B]
        layers = self._decode_layers(cache)
        return self._final_norm(self.run_blocks(self._embedded(tokens.clamp(min=0)), qpos, self._cos_sin(qpos), layers))

    def _paged(self, tokens: torch.Tensor, positions: torch.Tensor, cache: PagedCache) -> torch.Tensor:
        """tokens, positions [1,N] (one row of many sequences' tokens) -> [1,N,dim]."""
        if tokens.shape[0] != 1:
            raise TypeError("the compiled step reads the paged pool's step as one row of tokens")
        qpos = cache.positions  # [N]: positions[0], as the cache holds them
        span = cache.span if cache.span is not None else int(qpos.max()) + 1
        h = self._embedded(tokens)  # [1,N,dim] (a step's tokens: no padding)
        layers = _paged_layers(cache, span, self._pool_buffers(cache))
        return self._final_norm(self.run_blocks(h, qpos, self._cos_sin(qpos, span), layers))

    def _embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embeddings [...,dim] in float32, the blocks' residual stream. Packed rows are looked
        up by the kernel's own call (which checks every id), not through the module's five torch calls
        (0.3 ms of a served SmolLM2 token once the step's weights have flushed the CPU's caches)."""
        emb = self.model.tok_embeddings
        if type(emb) is not PackedEmbedding or tokens.dtype is not torch.int64 or not tokens.is_contiguous():
            h = emb(tokens)
            return h if h.dtype is torch.float32 else h.float()
        packed, held = emb.packed, self._table
        if held is None or held[0] is not packed:
            self._table = held = (packed, _buffer(packed))
        out = torch.empty((*tokens.shape, emb.dim))
        ids = (tokens.data_ptr(), tokens.numel() * 8)
        self._lookup(held[1], ids, (out.data_ptr(), out.numel() * 4), packed.shape[0], emb.dim, emb.qtype)
        return out

    def _cos_sin(self, qpos: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """RoPE's (cos, sin) pairs [N,D/2,2] of the positions qpos [N] (-1 = padding, any values),
        `span` above the largest if known: rows of a table of positions 0.. that grows as they do, the
        values rope_cos_sin gives each position alone (one index in place of its six torch calls; each
        costs tens of microseconds once a step's weights have flushed the CPU's caches)."""
        inv = self.model.inv_freq
        if span is None:
            span = int(qpos.numpy().max(initial=0)) + 1
        held = self._rope
        if held is None or held[0] is not inv or held[1] != inv._version or held[2].shape[0] < span:
            grown = min(2 * held[2].shape[0] if held is not None else 256, self.model.config.max_seq_len)
            n = max(span, grown)  # (Mistral 7B at 32k: 16 MB)
            table = torch.view_as_real(rope_cos_sin(torch.arange(n)[None], inv))[0, :, 0].contiguous()
            self._rope = held = (inv, inv._version, table)
        return held[2][qpos]

    def _decode_layers(self, cache: KVCache) -> _Layers:
        """_offline_layers(cache), made again only when the cache's tensors were replaced (`layout`): a
        decoding loop's steps share it, and with it run_blocks' dicts (SmolLM2: 0.2 ms a token saved)."""
        held = self._held
        if held is not None and held[0]() is cache and held[1] == cache.layout:
            return held[2]
        layers = _offline_layers(cache)
        self._held = (weakref.ref(cache), cache.layout, layers)
        return layers

    def _pool_buffers(self, cache: PagedCache) -> list[dict[str, tuple[int, ...]]]:
        """The pool's keys and values per layer as buffers, made again only when the step reads other
        tensors: a server's pool stays put, so its steps share them, and with them run_blocks' dicts
        (SmolLM2: ~2% of a served token's time). Weak references: a dropped pool is not kept alive."""
        tensors = (*cache.k, *cache.v)
        held = self._pool
        if held is not None and held[1] == cache.kv and len(held[0]) == len(tensors):
            if all(ref() is t for ref, t in zip(held[0], tensors)):
                return held[2]
        buffers = [_kv_buffers(k, v, cache.kv) for k, v in zip(cache.k, cache.v)]
        self._pool = ([weakref.ref(t) for t in tensors], cache.kv, buffers)
        return buffers

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The model's final norm of run_blocks' rows h [...,dim] (float32, contiguous, the step's own), in
        place through the blocks' own C loop. torch's rms_norm costs ~0.3 ms a token here once the step's
        weights have streamed through the CPU's caches (SmolLM2: 3% of its decoding step), the C loop a few
        microseconds. Every compiled step (offline and served, decode and prompt chunks) takes it, so a
        token computes alike whichever of them runs it; another kind of norm goes through its module."""
        norm = self.model.norm
        if not isinstance(norm, RMSNorm) or norm.weight.dtype != torch.float32 or not norm.weight.is_contiguous():
            return norm(h)
        x = _buffer(h)
        self._rms_norm(x, _buffer(norm.weight), x, h.numel() // h.shape[-1], h.shape[-1], float(norm.eps))
        return h

    def run_blocks(self, h: torch.Tensor, qpos: torch.Tensor, cos_sin: torch.Tensor, layers: _Layers) -> torch.Tensor:
        """h [...,dim] float32 (B rows, one per token; updated in place), qpos [B] int64, cos_sin [B,D/2,2]
        float32 (`_cos_sin`) -> h, through every block on the cache `layers` describes."""
        h, qpos = h.contiguous(), qpos.contiguous()
        extra, per_layer, common = layers
        slots, B = len(self.adapters), qpos.shape[0]
        # (B, dim, H, Hkv, D, F, S, E, K, P, bs, R, T, L); the kernel checks every buffer's nbytes against them
        shape = (B, *self.shape, extra[0], *self.experts, *extra[1:], slots)
        threads = torch.get_num_threads()
        rows = row_slots(self.model, self.adapters, B) if slots else None  # int32 [B]
        step = {"x": _buffer(h), "cos_sin": _buffer(cos_sin), "qpos": _buffer(qpos)}
        step["lora_row"] = _buffer(rows) if rows is not None else _UNUSED
        step |= common
        if self._merged is not None and self._merged[0] is per_layer:  # the same cache layout: its dicts
            blocks = self._merged[1]
            for block in blocks:
                block.update(step)
        else:
            blocks = [{**weights, **kv, **step} for weights, kv in zip(self._weights, per_layer)]
            self._merged = (per_layer, blocks)
        self._run(shape, blocks, self.eps, self.window, threads)  # one call: the GIL is let go once per step
        return h


# What the blocks read of the cache: (S, P, bs, R, T), per layer the buffers k_cache and v_cache, and the
# buffers every layer shares: kpos, tables and seq.
_Layers = tuple[tuple[int, ...], list[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]


def _offline_layers(cache: KVCache, rows: torch.Tensor | None = None) -> _Layers:
    """The rolling offline cache: [B,Hkv,S,D] per layer, the positions each slot holds [B,S] (this
    step's recorded by cache.begin); `rows` int32 [N]: each step row's cache row (None: row b is b, a
    decoding step, whose rows are no prompt's)."""
    common = {"kpos": _buffer(cache.pos), "tables": _UNUSED, "seq": _UNUSED if rows is None else _buffer(rows)}
    common["prompts"] = _UNUSED if rows is None else _prompts(cache.prompts, cache.batch_size)  # (decoding: none)
    per_layer = [_kv_buffers(k, v, cache.kv) for k, v in zip(cache.k, cache.v)]
    return (cache.size, 0, 1, cache.batch_size, 1), per_layer, common


def _paged_layers(cache: PagedCache, span: int, per_layer: list[dict[str, tuple[int, ...]]]) -> _Layers:
    """The paged pool [P,Hkv,D] per layer (`per_layer`: its buffers), read through the block tables, for
    tokens below position `span`; S bounds the keys a row sees."""
    window = cache.window
    S = max(1, min(span, window) if window is not None else span)
    if cache.tables.dtype != torch.int32 or cache.seq.dtype != torch.int32:
        raise TypeError(f"block tables and sequence ids are int32, got {cache.tables.dtype} and {cache.seq.dtype}")
    tables, seq = cache.tables.contiguous(), cache.seq.contiguous()
    common = {"kpos": _UNUSED, "tables": _buffer(tables), "seq": _buffer(seq)}
    common["prompts"] = _prompts(cache.prompts, tables.shape[0])
    slots = cache.k[0].shape[0] * cache.k[0].shape[2]  # [blocks,Hkv,bs,D]
    return (S, slots, cache.block_size, *tables.shape), per_layer, common


def _prompts(prompts: torch.Tensor | None, sequences: int) -> tuple[int, ...]:
    """The step's prompt lengths (int32, one per sequence; None: no row is a prompt's) as a buffer: the
    prompt rows of a prompt of kernels.tiles_from() tokens or more take the bfloat16 tiles."""
    if prompts is None:
        return _UNUSED
    if prompts.dtype != torch.int32 or prompts.shape != (sequences,) or not prompts.is_contiguous():
        raise TypeError(f"prompt lengths are int32 [{sequences}], got {prompts.dtype} {tuple(prompts.shape)}")
    return _buffer(prompts)


def _kv_buffers(k: torch.Tensor, v: torch.Tensor, kv: KvType) -> dict[str, tuple[int, ...]]:
    """One layer's keys and values, stored as `kv` (its GGML type tells the kernel how to read them)."""
    return {"k_cache": _buffer(k, kv.ggml), "v_cache": _buffer(v, kv.ggml)}


def _buffer(t: torch.Tensor, qtype: int | None = None) -> tuple[int, ...]:
    """(data_ptr, nbytes) of a contiguous CPU tensor for `decode_block`; (data_ptr, nbytes, qtype) for a packed
    weight or a cache (its rows' GGML type). The kernel checks each nbytes against the extent the shapes need before touching the memory."""
    if not (t.is_contiguous() and t.is_cpu):
        raise ValueError(
            f"decode_block takes contiguous CPU tensors, got {t.dtype} {list(t.shape)} on {t.device}"
            f"{'' if t.is_contiguous() else ', not contiguous'}"
        )
    return (t.data_ptr(), t.nbytes) if qtype is None else (t.data_ptr(), t.nbytes, qtype)


_UNUSED = (0, 0)  # a buffer the block does not read: no bytes (the kernel checks it needs none)


def _block_buffers(block: TransformerBlock) -> dict[str, tuple[int, ...]]:
    """A block's norms and packed weights as `decode_block` buffers (they do not move while it serves)."""
    ff = block.feed_forward
    out = {"attn_norm": _buffer(block.attention_norm.weight), "ffn_norm": _buffer(block.ffn_norm.weight)}
    out |= dict.fromkeys(("wk", "wv", "w3"), (*_UNUSED, 0))  # pieces of their own type, where given
    for owner, fused, parts in GROUPS[: 2 if isinstance(ff, MoeFeedForward) else 4]:
        modules = parts_of(getattr(block, owner), fused, parts)
        assert modules is not None  # _block_fits said so
        for first, piece in packed_pieces(modules):
            out[_PIECES[fused][first]] = piece
    if isinstance(ff, MoeFeedForward):  # _block_fits said: packed experts, float32 router
        stacks = {name: _experts(getattr(ff, w)) for name, w in (("w1e", "w1"), ("w3e", "w3"), ("w2", "w2"))}
        out |= {name: _buffer(m.packed, m.qtype) for name, m in stacks.items()}
        return out | {"gate": _buffer(ff.gate.weight), "w13": (*_UNUSED, 0)}
    return out | {"gate": _UNUSED, "w1e": (*_UNUSED, 0), "w3e": (*_UNUSED, 0)}


# decode_block's buffer for a piece of each projection starting at part i (q, k, v; gate, up)
_PIECES = {"wqkv": ("wqkv", "wk", "wv"), "wo": ("wo",), "w13": ("w13", "w3"), "w2": ("w2",)}


def _lora_buffers(cols: torch.Tensor, values: torch.Tensor, slots: int) -> dict[str, tuple[int, ...]]:
    """A layer's adapter columns and values (empty without adapters)."""
    if not slots:
        return {"lora_cols": _UNUSED, "lora": _UNUSED}
    return {"lora_cols": _buffer(cols), "lora": _buffer(values)}


def _experts(module: object) -> PackedExperts:
    if not isinstance(module, PackedExperts):
        raise TypeError(f"the compiled step runs packed experts, not {type(module).__name__}")
    return module


def _watch(model: Transformer) -> list[tuple[dict, str, object]]:
    """Every module and tensor the compiled step reads, as (the dict that holds it, its name, it): one
    dict look-up each tells a swap (the engine asks before every step, so this stays cheap: no
    nn.Module.__getattr__ on the way)."""
    out: list[tuple[dict, str, object]] = []

    def watch(owner: object, name: str) -> object:
        value = getattr(owner, name, None)
        out.append((_holder(owner, name), name, value))
        return value

    for block in model.blocks():
        for name in ("attention_norm", "ffn_norm", "attention", "feed_forward"):
            watch(block, name)
        watch(block.attention_norm, "weight")
        watch(block.ffn_norm, "weight")
        ff = block.feed_forward
        moe = isinstance(ff, MoeFeedForward)
        for owner_name, fused, parts in GROUPS[: 2 if moe else 4]:
            owner = getattr(block, owner_name)
            for name in dict.fromkeys((fused, *parts)):
                watch(owner, name)
            for m in parts_of(owner, fused, parts) or []:  # wrappers, and the packed tensors (their addresses)
                base = base_of(m)
                if base is not m:
                    watch(m, "base")
                watch(base, "packed")
        for expert in [watch(ff, n) for n in ("w1", "w2", "w3", "gate")] if moe else []:
            if isinstance(expert, nn.Module):
                watch(expert, "packed" if hasattr(expert, "packed") else "weight")
        # Mixtral: adapters set on the experts, or a rank's range of them, change what the block computes
        watch(ff, "expert_lora")
        watch(ff, "expert_range")
    return out


def _tables_of(model: nn.Module) -> list[dict]:
    """Every module's parameter, buffer and submodule dicts: where a registration happens."""
    return [t for m in model.modules() for t in (m._parameters, m._buffers, m._modules)]


def _holder(owner: object, name: str) -> dict:
    """The dict an attribute lives in: an nn.Module's parameters, buffers or submodules, else __dict__."""
    if isinstance(owner, nn.Module):
        for table in (owner._parameters, owner._buffers, owner._modules):
            if name in table:
                return table
    return vars(owner)
