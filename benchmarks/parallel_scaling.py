"""Per-token latency of one model on 1 and 2 ranks (torch.distributed, gloo on CPU, nccl on CUDA).

    python benchmarks/parallel_scaling.py [--dim 2048 --layers 18 ...] [--modes tp] [--device cpu|cuda]
    python benchmarks/parallel_scaling.py --experts 8 --hidden 1408 --layers 16 --modes tp,ep,tp+ep

Random weights of about 1B parameters (no download). Each configuration runs in its own processes:
1 rank with every thread, then `torchrun --nproc-per-node 2` with the threads split between the ranks.
Prints prefill (128 tokens) and decode (32 tokens, batch 1) latency per token, the share of the decode
time spent in the collectives (measured inside all-reduce / all-gather), and the weights per rank."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PREFILL, DECODE = 128, 32


def worker(args: argparse.Namespace) -> None:
    import torch

    from tramontane.build.random import random_model
    from tramontane.config import ModelConfig, MoeConfig
    from tramontane.model.cache import KVCache
    from tramontane.parallel.dist import COMM, init_from_env, rank_and_world, shutdown
    from tramontane.parallel.plan import layout_for
    from tramontane.parallel.shard import shard_model

    init_from_env(args.device)
    rank, world = rank_and_world()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    config = ModelConfig(
        vocab_size=32000,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.dim // args.heads,
        hidden_dim=args.hidden,
        norm_eps=1e-5,
        rope_theta=1e4,
        max_seq_len=4096,
        moe=MoeConfig(args.experts, 2) if args.experts else None,
    )
    model = random_model(config, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, seed=0)
    params = sum(p.numel() for p in model.parameters())
    if world > 1:
        shard_model(model, layout_for(config, args.mode, rank, world))
    model = model.to(device)
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    tokens = torch.randint(0, 32000, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.inference_mode():
        cache = KVCache(model.config, 1, PREFILL + DECODE, dtype=next(model.parameters()).dtype, device=device)
        model(tokens[:, :8], torch.arange(8, device=device)[None], cache)  # warm-up
        cache = KVCache(model.config, 1, PREFILL + DECODE, dtype=next(model.parameters()).dtype, device=device)
        sync()
        t = time.perf_counter()
        model(tokens[:, :PREFILL], torch.arange(PREFILL, device=device)[None], cache)
        sync()
        prefill = time.perf_counter() - t
        COMM["seconds"], COMM["calls"] = 0.0, 0
        t = time.perf_counter()
        for i in range(PREFILL, PREFILL + DECODE):
            model(tokens[:, i : i + 1], torch.tensor([[i]], device=device), cache)
        sync()
        decode = time.perf_counter() - t
    if rank == 0:
        print(
            json.dumps(
                {
                    "params": params,
                    "prefill_ms_per_token": 1e3 * prefill / PREFILL,
                    "decode_ms_per_token": 1e3 * decode / DECODE,
                    "comm_share": COMM["seconds"] / decode,
                    "collectives_per_token": COMM["calls"] / DECODE,
                    "weights_gb_per_rank": weight_gb,
                }
            )
        )
    shutdown()


def launch(args: argparse.Namespace, ranks: int, mode: str) -> dict:
    threads = max(1, args.threads // ranks)
    flags = [
        "--worker",
        "--mode",
        mode,
        "--dim",
        str(args.dim),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--kv-heads",
        str(args.kv_heads),
        "--hidden",
        str(args.hidden),
        "--device",
        args.device,
        "--experts",
        str(args.experts),
    ]
    if ranks == 1:
        cmd = [sys.executable, __file__, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), __file__, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{ranks} ranks ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=5632)
    ap.add_argument("--experts", type=int, default=0, help="Mixtral-style: this many experts, 2 per token")
    ap.add_argument("--modes", default="tp", help="comma-separated plans for the 2-rank runs (dense models: tp)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all, split over ranks")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="tp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [("1 rank", launch(args, 1, "tp"))] + [(f"2 ranks {m}", launch(args, 2, m)) for m in args.modes.split(",")]
    base = rows[0][1]
    kind = f"{args.experts} experts (2 per token)" if args.experts else "dense"
    print(
        f"\nrandom {kind} model, {base['params'] / 1e9:.2f}B parameters, {args.device}, {args.threads} threads in all"
    )
    print(
        "| ranks | prefill ms/token | decode ms/token | decode speed-up | comm share of decode "
        "| collectives/token | weights GB/rank |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['prefill_ms_per_token']:.2f} | {r['decode_ms_per_token']:.1f} "
            f"| {base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x | {r['comm_share']:.0%} "
            f"| {r['collectives_per_token']:.0f} | {r['weights_gb_per_rank']:.2f} |"
        )


if __name__ == "__main__":
    main()
