"""Streaming chats next to a large embeddings or scoring request, and a client that leaves one.

    python benchmarks/serve_background.py [--model PATH] [--duration 20] [--chats 8]

Starts `tramontane serve`, then measures the inter-token latency of N streaming greedy chat clients
(a) alone, (b) while an embeddings request at the request cap (2048 inputs of ~64 tokens) runs and
(c) while a scoring request (echo + logprobs, max_tokens 0) of 32 prompts of ~1000 tokens runs; then
sends the large embeddings request alone, leaves after 3 s, and reports how many step tokens ran after
the client left and how long until the engine was idle. The issue's target: ITL within 3x of alone."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx
from serve_load import QUESTIONS, free_port, one_request, start_server


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


WORDS = (
    "the wind blows over a sea and the boat sails to an old town where people walk in warm light "
    "while birds sing of rain on green hills under blue sky with white clouds near the river bank"
).split()


def text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + k * 3) % len(WORDS)] for k in range(words))


def embeddings_body() -> dict:
    return {"input": [text(i, 60) for i in range(2048)]}  # ~61 tokens each: just under the request cap


def scoring_body() -> dict:
    return {"prompt": [text(i, 1000) for i in range(32)], "max_tokens": 0, "echo": True, "logprobs": 1}


async def chats(base: str, n: int, duration: float, background: tuple[str, dict] | None) -> dict:
    stats: dict = {"tokens": 0, "ttft": [], "itl": [], "background": None}
    stop = time.perf_counter() + duration
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        stats["model"] = (await client.get("/v1/models")).json()["data"][0]["id"]
        job = asyncio.ensure_future(client.post(background[0], json=background[1])) if background else None
        await asyncio.sleep(1.0 if job else 0.0)  # the background work is running when the chats start

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                await one_request(client, QUESTIONS[k % len(QUESTIONS)], 64, stats)
                k += n

        await asyncio.gather(*(worker(i) for i in range(n)))
        if job is not None:
            stats["background"] = "still running" if not job.done() else job.result().status_code
            job.cancel()
    return stats


async def leave(base: str) -> tuple[float, float]:
    """(step tokens run after the client left, seconds until the engine was idle)."""
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        job = asyncio.ensure_future(client.post("/v1/embeddings", json=embeddings_body()))
        await asyncio.sleep(3.0)
        job.cancel()
    left, at_leave = time.perf_counter(), metric(base, "tramontane_step_tokens_sum")
    last, last_change = at_leave, time.perf_counter()
    while time.perf_counter() - last_change < 2.0:
        await asyncio.sleep(0.05)
        now = metric(base, "tramontane_step_tokens_sum")
        if now != last:
            last, last_change = now, time.perf_counter()
    return last - at_leave, last_change - left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--chats", type=int, default=8)
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port)
    try:
        runs = {
            "alone": asyncio.run(chats(base, args.chats, args.duration, None)),
            "beside embeddings": asyncio.run(
                chats(base, args.chats, args.duration, ("/v1/embeddings", embeddings_body()))
            ),
            "beside scoring": asyncio.run(chats(base, args.chats, args.duration, ("/v1/completions", scoring_body()))),
        }
        after, idle = asyncio.run(leave(base))
    finally:
        proc.terminate()
        proc.wait(60)
    alone = statistics.mean(runs["alone"]["itl"])
    print(f"\nmodel: {args.model or 'default (SmolLM2-135M-Instruct Q4_1)'}, {os.cpu_count()} CPUs, {args.chats} chats")
    print("| run               | chat tok/s | ITL mean ms | ITL p50 ms | ITL p99 ms | ITL / alone | background |")
    print("|-------------------|------------|-------------|------------|------------|-------------|------------|")
    for name, s in runs.items():
        itl = sorted(s["itl"])
        mean = statistics.mean(itl)
        print(
            f"| {name:<17} | {s['tokens'] / args.duration:>10.1f} | {1000 * mean:>11.1f} | {1000 * itl[len(itl) // 2]:>10.1f} "
            f"| {1000 * itl[int(0.99 * (len(itl) - 1))]:>10.1f} | {mean / alone:>11.2f} | {s['background'] or '-':>10} |"
        )
    print(
        f"client left a 2048-input embeddings request: {after:.0f} step tokens ran after, engine idle {idle:.2f} s later"
    )


if __name__ == "__main__":
    main()
