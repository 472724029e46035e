"""The integer activations (q16, the default, and q8) against the exact float32 path, per file.

    python benchmarks/fidelity.py [--model FILE.gguf ...] [--tokens 128] [--activations q16,q8] [--system]

For each model: perplexity on a fixed text (sliding windows of 128 tokens, stride 64) and the greedy
answers to 10 chat prompts (--tokens new tokens each, end of sequence honoured) under each setting, each
setting in a fresh process (the loader interleaves rows only under the integer ones). Prints the
perplexity change and how many answers are identical, token for token (issue 18's bound: within 0.5%, at
least 9 of 10). --system puts the fixed text first as a system message, so that every chat prompt is
long enough (64+ tokens) to take the bfloat16 tiles where the CPU has AMX-BF16 (kernels.tiles_from)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TEXT = (
    "The mistral is a strong, cold wind that blows from the north into the Gulf of Lion. It brings clear "
    "skies and sunshine to Provence, but it can last for days and is said to make people restless. Farmers "
    "plant rows of cypress trees to shelter their fields, and the old houses of the region turn their backs "
    "to the north, with few windows on that side. Sailors know it well: the sea rises quickly, and small "
    "boats stay in harbour until it drops. Its cousin, the tramontane, blows across Languedoc and Roussillon "
    "from the mountains. "
) * 4
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain what a prime number is to a child.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your steps.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def worker(model: str, tokens: int, system: bool) -> dict:
    import tramontane
    from tramontane.evaluate import perplexity

    llm = tramontane.load(model)
    ppl = perplexity(llm, llm.tokenizer.encode(TEXT), 128, 64).perplexity
    first = [{"role": "system", "content": TEXT[: len(TEXT) // 4]}] if system else []
    chats = [[*first, {"role": "user", "content": p}] for p in PROMPTS]
    answers = [llm.chat(chat, temperature=0, max_tokens=tokens).token_ids for chat in chats]
    return {"perplexity": ppl, "answers": answers}


def run(model: str, activations: str, tokens: int, threads: int, system: bool) -> dict:
    env = {**os.environ, "TRAMONTANE_ACTIVATIONS": activations, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--tokens", str(tokens), *(["--system"] * system)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{model} ({activations}): failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=None, help="GGUF files (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--activations", default="q16,q8", help="the settings compared with the exact f32 path")
    ap.add_argument("--system", action="store_true", help="a long system message first (prompts of 64+ tokens)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.model[0], args.tokens, args.system)))
        return
    if not args.model:
        from tramontane.hub.resolve import default_model_path

        args.model = [str(default_model_path())]
    print("| model | activations | perplexity exact | perplexity fast | change | greedy answers identical |")
    print("|---|---|---|---|---|---|")
    for model in args.model:
        exact = run(model, "f32", args.tokens, args.threads, args.system)
        for setting in args.activations.split(","):
            fast = run(model, setting, args.tokens, args.threads, args.system)
            same = sum(a == b for a, b in zip(exact["answers"], fast["answers"]))
            change = fast["perplexity"] / exact["perplexity"] - 1
            print(
                f"| {os.path.basename(model)} | {setting} | {exact['perplexity']:.4f} | {fast['perplexity']:.4f} "
                f"| {change:+.3%} | {same} of {len(PROMPTS)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
