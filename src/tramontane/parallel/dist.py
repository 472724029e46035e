"""torch.distributed set-up and the few collectives the sharded model uses.

Launched with `torchrun`, every process (rank) holds a slice of the model and runs the same steps;
backend gloo on CPU, nccl on CUDA. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and
every helper is the identity, so the same code runs single-process."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

# Time spent inside the model's collectives (all-reduce, all-gather) in this process: benchmarks read it
# to report the communication share of a step.
COMM = {"seconds": 0.0, "calls": 0}


def is_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_parallel() else (0, 1)


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...): nccl when the model
    runs on CUDA devices (one per local rank), gloo on CPU. False when the process runs alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return True


def shutdown(barrier: bool = True) -> None:
    """Leave the process group. After a normal end every rank waits for the others first (an abrupt
    teardown aborts peers still talking); after an error it does not wait (torchrun stops the rest)."""
    if dist.is_available() and dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()  # nobody tears the group down while a peer still talks to it
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (partial sums of row-parallel matmuls, experts, embedding slices)."""
    if is_parallel():
        start = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        COMM["seconds"] += time.perf_counter() - start
        COMM["calls"] += 1
    return t


def all_gather_last(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate each rank's slice along the last dim; rank r holds sizes[r] columns (uneven allowed)."""
    if not is_parallel():
        return t
    start = time.perf_counter()
    width = max(sizes)
    padded = torch.nn.functional.pad(t, (0, width - t.shape[-1])).contiguous()  # [..., width]
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)  # [..., sum(sizes)]
    COMM["seconds"] += time.perf_counter() - start
    COMM["calls"] += 1
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's value on every rank (small Python objects: a prompt line, a seed, a step's layout)."""
    if not is_parallel():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
