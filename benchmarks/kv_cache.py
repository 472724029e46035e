"""KV cache types side by side: memory, decode speed at long contexts, prefill, perplexity; same run.

    python benchmarks/kv_cache.py [--model FILE.gguf] [--kv f32,q8_0,bf16,f16] [--contexts 512,4096]
                                  [--rounds 2] [--tokens 64] [--threads 2] [--perplexity]

Each measurement is a fresh process (2 threads) that loads the model with `kv_dtype=` the type, runs a
prompt of the context's length (less the new tokens where they would pass the model's context: 32,760
+ 8 at 32k) through the offline API (the compiled step, prompt chunks of 512),
then decodes --tokens greedy tokens (end of sequence ignored); the types alternate within a round,
their order reversed every other round. Decode tok/s counts from the first new token to the last;
prefill tok/s is the prompt's tokens over the time to the first token. Printed per context: the median
of each type, its ratio to f32's, and the decode roofline (bandwidth measured in the same run / the
bytes a token reads: the weights once plus every cached key and value of the context, at the type's
bytes). With --perplexity, each type's perplexity of a fixed text (windows of 512, stride 256)
through its cache (Generator.score stores every key before it is read, as generation does).
With --filled, the cache is not made by a prompt: it holds random keys and values (rounded to the
type) at every position of the context, and the decode steps run straight on it (the compiled step,
one token at a time, sampling excluded): decode speed at contexts whose prompt would take hours to
run on a small machine (issue 21's 32k tokens on Mistral-7B shapes: `--model` a random GGUF written by
`decode_speed.py`'s write_random_gguf("mistral-7b-v0.2", "q4_0", PATH)); peak RSS is reported too.
Issue 21's target 3: q8_0's KV memory <= 0.55x bf16's, perplexity within 0.5% of f32's, decode at 4k
context >= 1.0x f32's. Target 4: Mistral-7B shapes, Q4_0, q8_0 KV: peak RSS < 10 GiB at 32k, decode
at 32k >= 0.5x decode at 512."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def prompt_ids(llm, n: int) -> list[int]:
    """n tokens of running text (a paragraph repeated with its copies numbered, so that it never loops)."""
    from speculative import PARAGRAPH

    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += llm.tokenizer.encode(f" ({i}) {PARAGRAPH}")
        i += 1
    return ids[:n]


def filled_decode(llm, context: int, tokens: int) -> dict:
    """Decode steps on a cache holding random keys at positions 0..context-1 (see the docstring)."""
    import resource

    import torch

    from tramontane.model import KVCache

    config, kind = llm.config, llm.kv
    cache = KVCache(config, 1, context + tokens, kind)
    gen = torch.Generator().manual_seed(0)
    span = min(1024, context)
    for t in cache.k + cache.v:  # one random span of keys per layer, repeated over the context
        block = kind.encode(torch.randn(1, config.n_kv_heads, span, config.head_dim, generator=gen))
        for s0 in range(0, context, span):
            n = min(span, context - s0)
            t[:, :, s0 : s0 + n] = block[:, :, :n]
    cache.pos[0, :context] = torch.arange(context)
    token, seconds = torch.tensor([[1]]), []
    with torch.inference_mode():
        for i in range(tokens):
            start = time.perf_counter()
            h = llm.backend.decode(token, torch.tensor([[context + i]]), cache)
            token = llm.model.logits(h)[:, -1].argmax(-1, keepdim=True)
            seconds.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    warm = seconds[2:] if len(seconds) > 4 else seconds  # the first steps touch fresh pages
    return {"prefill": 0.0, "decode": len(warm) / sum(warm), "tokens": [], "rss": rss, "backend": llm.backend.name}


def worker(model: str, kv: str, context: int, tokens: int, threads: int, ppl: bool, filled: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    import tramontane

    llm = tramontane.load(model, kv_dtype=kv)
    if filled:
        print(json.dumps(filled_decode(llm, context, tokens)))
        return
    if ppl:
        from speculative import PARAGRAPH

        from tramontane.evaluate import perplexity

        ids = llm.tokenizer.encode(" ".join([PARAGRAPH] * 12))
        print(json.dumps({"perplexity": perplexity(llm, ids, 512, 256).perplexity, "tokens": len(ids)}))
        return
    ids = prompt_ids(llm, min(context, llm.config.max_seq_len - tokens))  # 32k in all: the answer's tokens too
    import resource

    llm.generate(ids[:16], temperature=0, max_tokens=4)  # warm-up
    start = time.perf_counter()
    first, out = None, []
    for delta in llm.generate(ids, temperature=0, max_tokens=tokens, ignore_eos=True, stream=True):
        first = first or time.perf_counter()
        out += delta.token_ids
    end = time.perf_counter()
    result = {"prefill": len(ids) / (first - start), "decode": (len(out) - 1) / (end - first), "tokens": out}
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def measure(args: argparse.Namespace, kv: str, context: int, ppl: bool = False) -> dict:
    command = [sys.executable, __file__, "--worker", kv, "--model", args.model, "--contexts", str(context)]
    command += ["--tokens", str(args.tokens), "--threads", str(args.threads)] + (["--perplexity"] if ppl else [])
    command += ["--filled"] if args.filled else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def kv_bytes_per_token(model: str, kv: str) -> int:
    """Bytes one token's keys and values take in every layer."""
    from tramontane.config import ModelConfig
    from tramontane.model import kv_type
    from tramontane.weights.gguf import open_gguf

    with open_gguf(model) as f:
        config = ModelConfig.from_gguf_metadata(f.metadata)
    return 2 * config.n_layers * config.n_kv_heads * kv_type(kv).row_bytes(config.head_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--kv", default="f32,q8_0,bf16,f16")
    parser.add_argument("--contexts", default="512,4096")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--perplexity", action="store_true")
    parser.add_argument("--filled", action="store_true", help="decode on a cache of random keys (no prompt)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from speculative import smollm2

    args.model = args.model or smollm2()
    if args.worker:
        return worker(
            args.model, args.worker, int(args.contexts), args.tokens, args.threads, args.perplexity, args.filled
        )
    kvs, contexts = args.kv.split(","), [int(c) for c in args.contexts.split(",")]
    import torch
    from decode_speed import active_bytes_of_file, memory_bandwidth

    torch.set_num_threads(args.threads)
    bandwidth, weights = memory_bandwidth(), active_bytes_of_file(args.model)
    per_token = {kv: kv_bytes_per_token(args.model, kv) for kv in kvs}
    print(f"\n{os.path.basename(args.model)}, {args.rounds} rounds, {args.threads} threads, {args.tokens} new tokens;")
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s, weights read per token {weights / 2**20:.0f} MiB\n")
    print("| type | KV bytes per token | vs f32 | vs bf16 |")
    print("|---|---|---|---|")
    for kv in kvs:
        print(
            f"| {kv} | {per_token[kv]} | {per_token[kv] / per_token[kvs[0]]:.3f}x | {per_token[kv] * 2 / per_token[kvs[0]]:.3f}x |"
        )
    if args.perplexity:
        print("\n| type | perplexity | vs f32 |\n|---|---|---|")
        ppl = {kv: measure(args, kv, 0, ppl=True)["perplexity"] for kv in kvs}
        for kv in kvs:
            print(f"| {kv} | {ppl[kv]:.4f} | {ppl[kv] / ppl[kvs[0]] - 1:+.3%} |")
    first = kvs[0]
    print(
        f"\n| context | type | prefill tok/s | decode tok/s | vs {first} | vs context {contexts[0]} | roofline tok/s "
        f"| peak RSS GiB | same tokens as {first} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    decode: dict[tuple[int, str], float] = {}
    for context in contexts:  # contexts in turn; the types alternate within each
        runs: dict[str, list[dict]] = {kv: [] for kv in kvs}
        for r in range(args.rounds):
            for kv in kvs if r % 2 == 0 else kvs[::-1]:
                runs[kv].append(measure(args, kv, context))
                print(f"{context} {kv}: {runs[kv][-1]['decode']:.2f} tok/s", file=sys.stderr)
        for kv in kvs:
            pre, dec = (statistics.median(x[k] for x in runs[kv]) for k in ("prefill", "decode"))
            decode[context, kv] = dec
            roof = bandwidth / (weights + per_token[kv] * context)
            rss = max(x["rss"] for x in runs[kv]) / 2**30
            same = runs[kv][0]["tokens"] == runs[first][0]["tokens"]
            print(
                f"| {context} | {kv} | {pre:.1f} | {dec:.2f} | {dec / decode[context, first]:.2f}x "
                f"| {dec / decode[contexts[0], kv]:.2f}x | {roof:.1f} | {rss:.2f} | {same} |"
            )


if __name__ == "__main__":
    main()
