"""The compiled step's attention alone, at long contexts: one decode step of one block (one token) of
Mistral-7B's attention shapes (32 query heads, 8 kv heads, head dim 128) with tiny weights (model dim
256: the matmuls are negligible), over a cache of S positions filled with random rows of each KV type.

    .venv/bin/python benchmarks/attention_speed.py [--contexts 4096,32768] [--kv q8_0,f32] [--threads 2]
                                                   [--calls 12] [--rounds 3] [--activations q16] [--spread 1.5]

Prints per context and type the fastest call of each round (ms per layer: the attention of one token in
one layer), the KV bytes a call reads, and the rate it reads them at. Multiply by the layers (32 for
Mistral 7B) for a token's attention; benchmarks/kv_cache.py measures whole decode steps. Types alternate
within a round, in one process (a micro benchmark: the kernel's own speed, no loading).

Each context and type has as many one-layer caches as make --spread GB (1.5 by default), and each call
takes the next, so that the rows come from memory as a model's layers do: a single cache of 68 MB (32k
q8_0 keys) stays in a large last-level cache (480 MB on this host), where it was read at 1.3-1.6x the
rate the same kernel reached inside a 32-layer decode (--spread 0: one cache, the kernel's arithmetic)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tramontane.model.kv_types import kv_type
from tramontane.quant import kernels
from tramontane.quant.step import _buffer, _kv_buffers
from tramontane.weights.random_gguf import TYPE_IDS, random_blocks

HEADS, KV_HEADS, HEAD_DIM, DIM, HIDDEN = 32, 8, 128, 256, 256
UNUSED = {"gate": (0, 0), "w1e": (0, 0, 0), "w3e": (0, 0, 0), "tables": (0, 0), "seq": (0, 0)}
UNUSED |= {"lora_row": (0, 0), "lora_cols": (0, 0), "lora": (0, 0), "wk": (0, 0, 0), "wv": (0, 0, 0), "w3": (0, 0, 0)}
UNUSED |= {"prompts": (0, 0)}


def step_case(context: int, kv: str, rng: np.random.Generator) -> tuple[tuple[int, ...], dict, dict]:
    """decode_block's shape and buffers for one token at position context - 1 (every earlier one cached)."""
    g = torch.Generator().manual_seed(0)
    kind, q8 = kv_type(kv), TYPE_IDS["Q8_0"]
    weights = {
        "wqkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, DIM),
        "wo": (DIM, HEADS * HEAD_DIM),
        "w13": (2 * HIDDEN, DIM),
        "w2": (DIM, HIDDEN),
    }
    keep = {n: torch.from_numpy(random_blocks("Q8_0", r, c, rng)) for n, (r, c) in weights.items()}
    keep |= {
        "x": torch.randn(1, DIM, generator=g),
        "attn_norm": torch.ones(DIM),
        "ffn_norm": torch.ones(DIM),
        "cos_sin": torch.stack([torch.ones(1, HEAD_DIM // 2), torch.zeros(1, HEAD_DIM // 2)], -1).contiguous(),
        "kpos": torch.arange(context, dtype=torch.long)[None],
        "qpos": torch.tensor([context - 1]),
        "k_cache": kind.encode(torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=g)),
        "v_cache": kind.encode(torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=g)),
    }
    buffers = {n: _buffer(keep[n], q8) for n in weights}
    buffers |= {n: _buffer(keep[n]) for n in ("x", "attn_norm", "ffn_norm", "cos_sin", "kpos", "qpos")}
    buffers |= _kv_buffers(keep["k_cache"], keep["v_cache"], kind) | UNUSED
    return (1, DIM, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, context), buffers, keep


def spread_cases(
    context: int, kv: str, rng: np.random.Generator, spread: float
) -> list[tuple[tuple[int, ...], dict, dict]]:
    """step_case's one-layer caches, as many as span `spread` GB (at least one)."""
    cases = [step_case(context, kv, rng)]
    while len(cases) * kv_bytes(cases[0][2]) < spread * 1e9:
        cases.append(step_case(context, kv, rng))
    return cases


def kv_bytes(keep: dict) -> int:
    return sum(keep[n].numel() * keep[n].element_size() for n in ("k_cache", "v_cache"))


def fastest_call(cases: list[tuple[tuple[int, ...], dict, dict]], threads: int, calls: int) -> float:
    """The fastest of `calls` calls (at least one a cache: every cache read once a round, so that none is
    still cached when its turn comes again), each on the next of the caches."""
    best = float("inf")
    for i in range(max(calls, len(cases))):
        shape, buffers, keep = cases[i % len(cases)]
        x0 = keep.setdefault("x0", keep["x"].clone())
        keep["x"].copy_(x0)
        start = time.perf_counter()
        kernels._ext.decode_block(shape, buffers, 1e-5, 0, threads)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--kv", default="q8_0,f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--activations", default="q16", choices=["q16", "q8", "f32"])
    ap.add_argument("--spread", type=float, default=1.5, help="GB of one-layer caches a context cycles over")
    args = ap.parse_args()
    if kernels._ext is None:
        raise SystemExit("the compiled extension tramontane.quant._kernels is not built")
    kernels.set_activations(args.activations)
    rng = np.random.default_rng(0)
    print(f"{args.threads} threads, activations {args.activations}, isa {kernels.isa()}")
    print("| context | kv | ms per layer, each round | KV MiB x caches | GB/s |\n|---|---|---|---|---|")
    for context in (int(c) for c in args.contexts.split(",")):
        cases = {kv: spread_cases(context, kv, rng, args.spread) for kv in args.kv.split(",")}
        times: dict[str, list[float]] = {kv: [] for kv in cases}
        for _ in range(args.rounds):
            for kv, spread in cases.items():
                times[kv].append(fastest_call(spread, args.threads, args.calls))
        for kv, spread in cases.items():
            size = kv_bytes(spread[0][2])
            rounds = " / ".join(f"{t * 1e3:.2f}" for t in times[kv])
            print(
                f"| {context} | {kv} | {rounds} | {size / 2**20:.0f} x {len(spread)} | {size / min(times[kv]) / 1e9:.1f} |"
            )
        del cases


if __name__ == "__main__":
    main()
