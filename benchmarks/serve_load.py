"""Load test: N concurrent streaming clients against `tramontane serve`, next to sequential offline runs.

    python benchmarks/serve_load.py [--model PATH] [--duration 20] [--clients 1,4,16] [--max-tokens 64]

Starts a server on a free local port, drives it with N clients (each sends a streaming greedy chat
request, waits for the answer, sends the next) for a fixed time, and prints aggregate generated tokens/s,
time to first token and inter-token latency (p50 / p99). The last row runs the same prompts one after
another through `tramontane.load(...).chat(..., stream=True)` in this process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Give a short tip for learning to cook.",
    "What does a compiler do?",
    "Describe a cat in one sentence.",
    "How many days are in a leap year?",
    "What is photosynthesis?",
    "Suggest a name for a sailing boat.",
    "Translate 'good morning' into French.",
    "What is the boiling point of water?",
    "Who wrote Hamlet?",
    "What is a prime number?",
    "Explain gravity to a child.",
    "What is the largest ocean?",
    "Write a haiku about wind.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tramontane",
        "serve",
        *([model] if model else []),
        "--port",
        str(port),
        "--kv-cache-memory",
        "1G",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy in 120 s")


async def one_request(client: httpx.AsyncClient, question: str, max_tokens: int, stats: dict) -> None:
    body = {
        "model": stats["model"],
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    first = True
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"server answered {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            (stats["ttft"] if first else stats["itl"]).append(now - (start if first else last))
            first, last = False, now


async def load(port: int, clients: int, duration: float, max_tokens: int) -> dict:
    stats: dict = {"tokens": 0, "ttft": [], "itl": []}
    stop = time.perf_counter() + duration
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        stats["model"] = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                await one_request(client, QUESTIONS[k % len(QUESTIONS)], max_tokens, stats)
                k += clients

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        stats["elapsed"] = time.perf_counter() - start
    return stats


def offline(model: str | None, max_tokens: int, count: int) -> dict:
    import tramontane

    llm = tramontane.load(model)
    stats: dict = {"tokens": 0, "ttft": [], "itl": []}
    start = time.perf_counter()
    for question in QUESTIONS[:count]:
        t0 = last = time.perf_counter()
        first = True
        for delta in llm.generate(
            llm.tokenizer.encode_chat([{"role": "user", "content": question}]),
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
        ):
            stats["tokens"] += len(delta.token_ids)
            now = time.perf_counter()
            (stats["ttft"] if first else stats["itl"]).append(now - (t0 if first else last))
            first, last = False, now
    stats["elapsed"] = time.perf_counter() - start
    return stats


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{1000 * values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def row(name: str, s: dict) -> str:
    return (
        f"| {name:<22} | {s['tokens'] / s['elapsed']:>9.1f} | {pct(s['ttft'], 0.5):>8} | {pct(s['ttft'], 0.99):>8} "
        f"| {pct(s['itl'], 0.5):>7} | {pct(s['itl'], 0.99):>7} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    port = free_port()
    proc = start_server(args.model, port)
    rows = []
    try:
        for n in (int(c) for c in args.clients.split(",")):
            rows.append(
                row(
                    f"serve, {n} client{'s' if n > 1 else ''}",
                    asyncio.run(load(port, n, args.duration, args.max_tokens)),
                )
            )
    finally:
        proc.terminate()
        proc.wait(60)
    rows.append(row("offline, sequential", offline(args.model, args.max_tokens, len(QUESTIONS))))
    print(
        f"\nmodel: {args.model or 'default (SmolLM2-135M-Instruct Q4_1)'}, {os.cpu_count()} CPUs, "
        f"greedy, max_tokens {args.max_tokens}, {args.duration:g} s per row"
    )
    print("| run                    | tokens/s  | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("|------------------------|-----------|----------|----------|---------|---------|")
    print("\n".join(rows))
    print("(latencies in ms)")


if __name__ == "__main__":
    main()
