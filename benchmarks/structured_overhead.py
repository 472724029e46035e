"""Decode speed with and without a JSON schema on the same prompts (constrained decoding's cost).

    python benchmarks/structured_overhead.py [--model FILE] [--threads 2] [--rounds 5]

Greedy and sampled (temperature 1) generation, batch 1 and batch 8, 128 new tokens per sequence; the
schema runs every token through llguidance's mask. Prints tokens/s side by side and the slowdown (medians of
--rounds alternated runs: this host's speed drifts by +-10% between runs)."""

from __future__ import annotations

import argparse
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "skills": {"type": "array", "items": {"type": "string"}},
        "home": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "skills", "home"],
}
ASK = [{"role": "user", "content": "Invent a person and describe them as JSON."}]
TOKENS = 128


def speed(llm, grammar: str | None, batch: int, temperature: float) -> float:
    """Decoded tokens per second over all rows, from the first generated token on (prefill excluded:
    guided answers end earlier, and the prompt's cost must not weigh on fewer tokens)."""
    import tramontane

    prompt = llm.tokenizer.encode_chat(ASK)
    params = [
        tramontane.SamplingParams(
            temperature=temperature, seed=i, max_tokens=TOKENS, grammar=grammar, ignore_eos=grammar is None
        )
        for i in range(batch)
    ]
    llm.generate([prompt] * batch, params)  # warm-up (and the grammar's tokenizer)
    first, count, end = None, 0, 0.0
    for delta in llm.generate([prompt] * batch, params, stream=True):
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            count += len(delta.token_ids)
        end = now
    return (count - (batch - 1)) / (end - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternated runs per cell; medians are printed")
    args = ap.parse_args()
    import torch

    import tramontane
    from tramontane.decoding.structured import FINISH_WITHIN
    from tramontane.text.grammar import json_grammar

    torch.set_num_threads(args.threads)
    llm = tramontane.load(args.model)
    grammar = json_grammar(SCHEMA)
    print(
        f"\n{args.model or 'default model (SmolLM2-135M-Instruct Q4_1)'}, {args.threads} threads, up to {TOKENS} "
        f"tokens per answer (guided answers end when the JSON is complete; steered closed {FINISH_WITHIN} "
        "tokens before the limit)"
    )
    print("| batch | temperature | free text tok/s | JSON schema tok/s | schema / free |")
    print("|---|---|---|---|---|")
    for batch in (1, 8):
        for temperature in (0.0, 1.0):
            runs = [
                (speed(llm, None, batch, temperature), speed(llm, grammar, batch, temperature))
                for _ in range(args.rounds)
            ]  # alternated, so that host noise hits both alike
            free, guided = (statistics.median(r[k] for r in runs) for k in (0, 1))
            print(f"| {batch} | {temperature:g} | {free:.1f} | {guided:.1f} | {guided / free:.2f}x |")


if __name__ == "__main__":
    main()
