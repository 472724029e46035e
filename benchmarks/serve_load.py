"""Serving load: N concurrent streaming clients against `tramontane serve` and llama.cpp's own C++
`llama-server` on the same GGUF, alternating (never both running), next to the offline engine.

    python benchmarks/serve_load.py [--model M.gguf] [--llama-server BIN] [--clients 1,4,16]
        [--max-tokens 128] [--rounds 2] [--duration 20] [--context 8192] [--shared-prefix 2000]

Each client sends a streaming greedy chat request (ignore_eos, so every answer is max_tokens long),
reads it to the end and sends the next, for `--duration` seconds. Per server and client count:
aggregate generated tokens/s, time to first token and inter-token latency (p50 / p99), and the
server's peak RSS. Both servers get 2 threads and the same total KV capacity in tokens (`--context`:
llama-server's -c, split over its 16 slots; tramontane's --kv-cache-memory sized to hold as many),
stored as the same type (`--kv-dtype`: f16 by default, llama-server's own default; its -ctk/-ctv).
Every tramontane answer is compared with the offline engine's greedy answer to the same prompt
(`tramontane.load(...).chat`, one at a time): a difference stops the run. Every request (served on both
servers, and offline) bans the tokens that print nothing alone (the chat's control tokens, such as
SmolLM2's <|im_end|> and <|im_start|>) with logit_bias -100: under ignore_eos the model writes them past
its answer's end, and a client, which sees only text, would count the step after each as one doubled
inter-token gap (2.7% of SmolLM2's tokens here; its p99). llama-server's ignore_eos bans the
end-of-generation ones itself. `--shared-prefix N` adds a
run where 16 clients share an N-token system prompt: the first request's TTFT against the others'
(prefix-cache hits). Build llama-server from the llama.cpp sources vendored in llama-cpp-python's
source distribution (cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF, target llama-server): a benchmark tool,
never a dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

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
THREADS = 2
# seconds for one streamed answer (16 clients sharing a 2,000-token prefix wait ~80 s on llama-server)
REQUEST_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    from tramontane.hub.resolve import resolve_model

    return str(resolve_model(None))


def tramontane_cmd(model: str, port: int, context: int, kv_per_token: int, kv_dtype: str) -> list[str]:
    kv = str(kv_per_token * context)
    return [sys.executable, "-m", "tramontane", "serve", model, "--port", str(port), "--kv-cache-memory", kv,
            "--kv-dtype", kv_dtype]  # fmt: skip


def llama_cmd(binary: str, model: str, port: int, context: int, kv_dtype: str) -> list[str]:
    """llama-server with `context` tokens of KV split over its 16 slots, its default. Not --kv-unified (one
    pool for all slots, as tramontane's block pool): on SmolLM2 Q4_1 at 16 clients that ran 120-125 tok/s
    with a TTFT p50 of 1.3-2.3 s, against 172-180 tok/s and 0.16-0.18 s split (measured here, 15 s each)."""
    return [binary, "-m", model, "--port", str(port), "--parallel", "16", "-t", str(THREADS), "-tb", str(THREADS),
            "-c", str(context), "-ctk", kv_dtype, "-ctv", kv_dtype, "--log-disable"]  # fmt: skip


def start(cmd: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not become healthy in 300 s")


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def messages(question: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


async def sse_data(port: int, body: dict) -> AsyncIterator[bytes]:
    """POST body to /v1/chat/completions on a fresh connection (closed after it): each `data: ` line's
    payload as it arrives. Plain asyncio streams rather than an HTTP client library: the client shares the
    server's 2 cores here, and httpx spent 0.6 ms of CPU per streamed token (9% of a core at one client)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        status = (await reader.readline()).split(b" ", 2)
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if len(status) < 2 or status[1] != b"200":
            raise SystemExit(f"server answered {b' '.join(status[1:]).strip()!r}: {(await reader.read(500))!r}")
        buffer = b""
        async for piece in _body(reader, headers.get("transfer-encoding") == "chunked"):
            buffer += piece
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield line[6:].rstrip(b"\r")
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The response body's bytes as they arrive (chunked transfer coding undone)."""
    if not chunked:  # delimited by the server closing the connection
        while piece := await reader.read(65536):
            yield piece
        return
    while size := int((await reader.readline()).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]  # the chunk, less its CRLF


async def one_request(port: int, question: str, args, stats: dict, system: str | None) -> None:
    body = {
        "model": stats["model"],
        "messages": messages(question, system),
        "temperature": 0,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": args.silent,
    }
    start = last = time.perf_counter()
    first, text, chunks, usage = True, "", 0, None
    async with asyncio.timeout(REQUEST_TIMEOUT):  # a server that stops answering stops the run
        async for data in sse_data(port, body):
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            (stats["ttft"] if first else stats["itl"]).append(now - (start if first else last))
            first, last, chunks = False, now, chunks + 1
            text += chunk["choices"][0]["delta"]["content"]
    stats["tokens"] += usage if usage is not None else chunks
    stats["answers"].setdefault(question, set()).add(text)  # more than one: the batch changed an answer


def model_id(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()["data"][0]["id"]


async def load(port: int, clients: int, args, name: str, system: str | None = None) -> dict:
    stats: dict = {"tokens": 0, "ttft": [], "itl": [], "answers": {}, "name": name, "model": model_id(port)}
    stop = time.perf_counter() + args.duration

    async def worker(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            await one_request(port, QUESTIONS[k % len(QUESTIONS)], args, stats, system)
            k += clients

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    stats["elapsed"] = time.perf_counter() - start
    return stats


async def shared_prefix(port: int, args, name: str, system: str) -> dict:
    """16 clients at once, one shared system prompt: TTFT of the first to finish prefill vs the rest."""
    stats: dict = {"tokens": 0, "ttft": [], "itl": [], "answers": {}, "name": name, "model": model_id(port)}
    start = time.perf_counter()
    await one_request(port, QUESTIONS[0], args, stats, system)  # the first fills the cache
    await asyncio.gather(*(one_request(port, q, args, stats, system) for q in QUESTIONS[1:16]))
    stats["elapsed"] = time.perf_counter() - start
    return stats


def silent_tokens(tokenizer) -> dict[str, float]:
    """logit_bias banning the tokens that decode to no text alone (at most the server's 1,024 entries)."""
    from tramontane.decoding.sampling import MAX_LOGIT_BIAS

    silent = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == ""]
    return {str(i): -100.0 for i in silent[:MAX_LOGIT_BIAS]}


def offline_engine(model: str, args):
    """The offline engine (its KV cache stored as --kv-dtype) and its KV bytes per token (every layer's keys
    and values). Sets args.silent, every request's logit_bias."""
    import tramontane
    from tramontane.engine.blocks import bytes_per_block

    llm = tramontane.load(model, kv_dtype=args.kv_dtype)
    args.silent = silent_tokens(llm.tokenizer)
    return llm, bytes_per_block(llm.config, 1, args.kv_dtype)


def offline_pass(llm, args) -> tuple[dict[str, str], float]:
    """The offline engine's greedy answers to the questions, one prompt at a time, and its tokens/s over
    them (prefill included, as a served request's). Timed again next to every tramontane server run:
    measured once at the start, the host's drift between it and a served run moved their ratio by 10%."""
    bias = {int(i): b for i, b in args.silent.items()}
    answers, tokens, elapsed = {}, 0, 0.0
    for question in QUESTIONS:
        start = time.perf_counter()
        out = llm.chat(
            messages(question, None), temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logit_bias=bias
        )
        elapsed += time.perf_counter() - start
        answers[question], tokens = out.text, tokens + len(out.token_ids)
    return answers, tokens / elapsed


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{1000 * values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def row(name: str, s: dict, rss: int) -> str:
    if any(len(texts) > 1 for texts in s["answers"].values()):
        name += " (answers varied)"
    return (
        f"| {name:<30} | {s['tokens'] / s['elapsed']:>9.1f} | {pct(s['ttft'], 0.5):>8} | {pct(s['ttft'], 0.99):>8} "
        f"| {pct(s['itl'], 0.5):>7} | {pct(s['itl'], 0.99):>7} | {rss / 2**30:>7.2f} |"
    )


def check(stats: dict, expected: dict[str, str]) -> None:
    for question, texts in stats["answers"].items():
        for text in texts - {expected[question]}:
            raise SystemExit(f"served answer differs from the offline greedy answer to {question!r}:\n"
                             f"served:  {text!r}\noffline: {expected[question]!r}")  # fmt: skip


def step_times(port: int) -> tuple[float, float]:
    """tramontane's engine counters (step wall time, its forward part) in seconds; zeros elsewhere."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = dict(line.split()[:2] for line in text.splitlines() if line.startswith("tramontane_") and " " in line)
    return float(values.get("tramontane_step_seconds_total", 0)), float(
        values.get("tramontane_forward_seconds_total", 0)
    )


def run_server(
    name: str, cmd: list[str], port: int, args, expected: dict[str, str] | None, system: str | None, offline: float
) -> list[str]:
    """Rows of the client counts' runs against one server; `offline`: the offline engine's tokens/s just
    before (0: not measured), the 1-client row's reference."""
    proc = start(cmd, port)
    rows = []
    try:
        for n in (int(c) for c in args.clients.split(",") if c):
            before = step_times(port) if name == "tramontane" else (0.0, 0.0)
            try:
                stats = asyncio.run(load(port, n, args, name))
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                raise SystemExit(
                    f"{name} with {n} clients: {type(e).__name__}: {e}; server stderr: "
                    f"{proc.stderr.read1(4000).decode(errors='replace') if proc.poll() is not None else 'running'}"
                ) from e
            if expected is not None:
                check(stats, expected)
            label = f"{name}, {n} client{'s' if n > 1 else ''}"
            if name == "tramontane":  # the engine's per-step overhead: schedule, layout, sampling, detokenizing
                step, forward = (b - a for a, b in zip(before, step_times(port)))
                label += f" ({1 - forward / step:.0%} ovh)" if step else ""
                if n == 1 and offline:
                    label += f" {stats['tokens'] / stats['elapsed'] / offline:.2f}x offline"
            rows.append(row(label, stats, peak_rss(proc.pid)))
            print(rows[-1], file=sys.stderr, flush=True)
        if system is not None:
            stats = asyncio.run(shared_prefix(port, args, name, system))
            first, rest = stats["ttft"][0], sorted(stats["ttft"][1:])
            rows.append(
                f"| {name}, shared {args.shared_prefix}-token prefix: TTFT first {1000 * first:.0f} ms, others p50 "
                f"{1000 * rest[len(rest) // 2]:.0f} ms ({rest[len(rest) // 2] / first:.0%}), max {1000 * rest[-1]:.0f} ms |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the shipped SmolLM2 Q4_1)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (the anchor)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per client count")
    ap.add_argument("--clients", default="1,4,16", help='client counts ("" with --shared-prefix: that run only)')
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both servers")
    ap.add_argument("--context", type=int, default=8192, help="KV capacity in tokens, for each server")
    ap.add_argument("--kv-dtype", default="f16", choices=("f32", "bf16", "f16", "q8_0"), help="both servers' KV type")
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens of a shared system prompt (0: skip)")
    ap.add_argument("--no-check", action="store_true", help="skip the offline greedy answers' comparison")
    args = ap.parse_args()
    model = args.model or default_model()
    system = None
    if args.shared_prefix:  # a filler of about that many tokens (SmolLM2's tokenizer: 3 per word)
        system = "You are a helpful assistant. " + " ".join(f"word{i % 97}" for i in range(args.shared_prefix // 3))
    llm, kv_per_token = offline_engine(model, args)
    expected = offline_pass(llm, args)[0] if not args.no_check else {}  # (its first pass warms it up)
    servers = [("tramontane", lambda port: tramontane_cmd(model, port, args.context, kv_per_token, args.kv_dtype))]
    # llama-server keeps each slot's copy of a shared prefix: the shared-prefix run gives it room for 16 of them
    llama_context = max(args.context, 16 * (args.shared_prefix + args.max_tokens + 64)) if system else args.context
    if args.llama_server:
        llama = lambda port: llama_cmd(args.llama_server, model, port, llama_context, args.kv_dtype)  # noqa: E731
        servers.append(("llama-server", llama))
    rows: list[str] = []
    offline: list[float] = []
    for r in range(args.rounds):
        for name, command in servers if r % 2 == 0 else servers[::-1]:
            check_with = expected if name == "tramontane" and expected else None
            if check_with:  # the offline engine's speed next to this run (its answers unchanged)
                answers, speed = offline_pass(llm, args)
                if answers != expected:
                    raise SystemExit("the offline engine's greedy answers changed between two passes")
                offline.append(speed)
                print(f"offline engine, one prompt at a time: {speed:.1f} tok/s", file=sys.stderr, flush=True)
            port = free_port()  # a fresh port per start: nothing of the previous server's connections
            rows += run_server(name, command(port), port, args, check_with, system, offline[-1] if check_with else 0.0)
    print(
        f"\nmodel: {model}, {os.cpu_count()} CPUs, {THREADS} threads per server, greedy, ignore_eos, "
        f"max_tokens {args.max_tokens}, {len(args.silent)} silent tokens banned, {args.duration:g} s per row, "
        f"KV capacity {args.context} tokens each "
        f"stored as {args.kv_dtype} (tramontane: {kv_per_token * args.context / 2**20:.0f} MiB)"
        + (
            f"; llama-server {llama_context} tokens (16 copies of the shared prefix)"
            if llama_context > args.context
            else ""
        )
    )
    if expected:
        print(
            f"offline engine, one prompt at a time, next to each tramontane run: "
            f"{', '.join(f'{v:.1f}' for v in offline)} tok/s; every served answer equal to its"
        )
    print(f"| {'run':<30} | tokens/s  | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | RSS GiB |")
    print(f"|{'-' * 32}|-----------|----------|----------|---------|---------|---------|")
    print("\n".join(rows))
    print("(latencies in ms; RSS: the server's peak resident memory so far)")


if __name__ == "__main__":
    main()
