"""Packed GGUF matmul speed: qmatmul vs dense float32 F.linear vs dequantize + F.linear.

SmolLM2-135M shapes (N, K) at M = 1 (decode) and M = 16 (batched decode); prints µs per call and the
effective GB/s of packed weight bytes read per call (the same weight every call, so the smaller ones
sit in cache), then the time of all the matmuls of one SmolLM2 decode step with per-layer weights.

    .venv/bin/python benchmarks/qmatmul_speed.py [--threads 2] [--types Q4_1,Q8_0] [--m 1,16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf.quants import QuantError, quantize

from tramontane.quant import kernels
from tramontane.weights.gguf_quants import GGML_TYPES
from tramontane.weights.random_gguf import random_blocks

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
TYPES = ["Q4_1", "Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q6_K"]


def packed_weight(qtype: QT, n: int, k: int, rng: np.random.Generator, quantized: bool = True) -> torch.Tensor:
    """Random packed rows [n, row_bytes]: quantized with the gguf package where it can (and `quantized`),
    otherwise random blocks with small finite float16 scales (same speed, much faster to make)."""
    info = GGML_TYPES[int(qtype)]
    if quantized:
        try:
            raw = quantize(rng.standard_normal((n, k), dtype=np.float32), qtype)
            return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1))
        except (NotImplementedError, QuantError):
            pass
    return torch.from_numpy(random_blocks(info.name, n, k, rng, scale=0.05))


def per_call_us(fn, budget_s: float = 0.25) -> float:
    """Median-of-5 time per call, each sample running for about budget_s / 5."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(budget_s / 5 / once))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps)
    return float(np.median(samples)) * 1e6


def measure(qtype: QT, m: int, n: int, k: int, threads: int, budget: float, rng: np.random.Generator) -> float:
    """Prints one table row; returns the qmatmul time in µs."""
    q = int(qtype)
    packed = packed_weight(qtype, n, k, rng)
    dense = kernels.dequantize_packed(packed, q, k)
    x = torch.randn(m, k)
    t_q = per_call_us(lambda: kernels.qmatmul(x, packed, q, k, threads), budget)
    t_d = per_call_us(lambda: F.linear(x, dense), budget)
    t_dl = per_call_us(lambda: F.linear(x, kernels.dequantize_packed(packed, q, k, threads)), budget)
    mb = packed.numel() / 1e6
    print(
        f"{qtype.name:5} {m:3} {n:6} {k:5} {mb:6.2f} | {t_q:10.1f} {mb * 1e3 / t_q:6.1f} | {t_d:9.1f} | {t_dl:10.1f}",
        flush=True,
    )
    return t_q


def smollm2_token(threads: int, m: int, budget: float, rng: np.random.Generator) -> None:
    """All matmuls of one SmolLM2-135M Q4_1 decode step, each layer with its own weights (96 MB in all,
    more than the caches: the weights stream from memory as in a real decode)."""
    layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    weights = [(packed_weight(QT.Q4_1, n, k, rng, False), k) for _ in range(30) for n, k in layer]
    weights.append((packed_weight(QT.Q8_0, 49152, 576, rng, False), 576))  # tied embeddings as the output head
    xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
    types = [int(QT.Q4_1)] * (len(weights) - 1) + [int(QT.Q8_0)]

    def token() -> None:
        for (packed, k), q in zip(weights, types):
            kernels.qmatmul(xs[k], packed, q, k, threads)

    total = sum(p.numel() for p, _ in weights) / 1e6
    t = per_call_us(token, budget * 4) / 1e3
    print(
        f"SmolLM2-135M Q4_1 step, M={m}: {len(weights)} matmuls, {total:.1f} MB packed: {t:.2f} ms "
        f"({total / t:.1f} GB/s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds per measurement")
    ap.add_argument(
        "--activations",
        choices=kernels.ACTIVATIONS,
        default=kernels.DEFAULT_ACTIVATIONS,
        help="q16 (the default) or q8: the integer kernels where a type has them; f32: the exact float32 path",
    )
    args = ap.parse_args()
    kernels.set_activations(args.activations)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    ms = [int(v) for v in args.m.split(",")]
    print(
        f"compiled kernels: {kernels.available()} ({kernels.isa()}), threads {args.threads}, "
        f"activations {kernels.activations()}"
    )
    print(
        f"{'type':5} {'M':>3} {'N':>6} {'K':>5} {'MB':>6} | {'qmatmul µs':>10} {'GB/s':>6} | "
        f"{'dense µs':>9} | {'deq+lin µs':>10}"
    )
    totals: dict[tuple[str, int], float] = {}
    for name in args.types.split(","):
        for m in ms:
            for n, k in SHAPES:
                if k % GGML_TYPES[int(QT[name])].block_size:
                    k = 768  # K-quants need rows of whole 256-blocks: 576 -> 768
                t = measure(QT[name], m, n, k, args.threads, args.budget, rng)
                totals[(name, m)] = totals.get((name, m), 0.0) + t
    print()
    for (name, m), t in totals.items():
        print(f"{name} M={m}: sum over the five shapes {t:.0f} µs")
    print()
    for m in ms:
        smollm2_token(args.threads, m, args.budget, rng)


if __name__ == "__main__":
    main()
