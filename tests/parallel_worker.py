"""Run by tests/test_parallel.py under torchrun: every (model, mode) case on this rank; rank 0 saves.

    torchrun --nproc-per-node 2 tests/parallel_worker.py OUT.pt CASES.json
CASES.json: [[folder or GGUF file, mode], ...]; mode "single" runs the unsharded model (a reference run)."""

from __future__ import annotations

import json
import os
import sys

import torch
from chartok import CharTokenizer  # this script's folder is on sys.path

from tramontane.build import load_model, select_backend
from tramontane.decoding.offline import Generator
from tramontane.decoding.sampling import SamplingParams
from tramontane.model.cache import KVCache
from tramontane.parallel.dist import init_from_env, rank_and_world, shutdown

TOKENS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def run(folder: str, mode: str) -> dict:
    rank, world = rank_and_world()
    shard = None if mode == "single" else (mode, rank, world)
    model = load_model(folder, shard=shard, packed=folder.endswith(".gguf")).model  # a GGUF: packed experts
    with torch.no_grad():
        prefill = model(TOKENS)  # [2,12,V]
        cache = KVCache(model.config, 2, 32)  # window 8 < 32: a rolling buffer for Mistral
        steps = torch.stack(
            [model(TOKENS[:, t : t + 1], torch.full((2, 1), t), cache)[:, -1] for t in range(TOKENS.shape[1])], 1
        )  # [2,12,V]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    backend = select_backend(model, KVCache, torch.float32)  # the module path for a sharded model
    outs = list(
        Generator(model, CharTokenizer(), backend).run([[5, 9, 14, 3, 7, 22, 31, 40, 8, 11], [17, 4, 60]], [params] * 2)
    )
    greedy = [[t for d in outs if d.index == i for t in d.token_ids] for i in (0, 1)]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # packed blocks too
    packed_experts = sum(type(m).__name__ == "PackedExperts" for m in model.modules())
    kinds = [type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Packed")]
    return {
        "prefill": prefill,
        "steps": steps,
        "greedy": greedy,
        "weight_bytes": weight_bytes,
        "packed_experts": packed_experts,
        "packed_modules": {k: kinds.count(k) for k in sorted(set(kinds))},
    }


def main() -> None:
    out, cases = sys.argv[1], json.loads(open(sys.argv[2]).read())
    init_from_env()
    results = {f"{folder}|{mode}": run(folder, mode) for folder, mode in cases}
    if rank_and_world()[0] == 0:
        torch.save(results, out)
    shutdown()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort a finishing process (std::terminate)


if __name__ == "__main__":
    main()
