"""benchmarks/serve_load.py's own client: the streamed events as a server sends them, whatever the
chunking, and the tokens it bans so that a client sees one text delta per generated token."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
EVENTS = [b'{"choices": [{"delta": {"content": "Hel"}}]}', b'{"choices": [{"delta": {"content": "lo"}}]}', b"[DONE]"]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("serve_load", module)
    spec.loader.exec_module(module)
    return module


SERVE_LOAD = _load()


def body_pieces(chunked: bool) -> list[bytes]:
    """The events as a server writes them, cut at awkward places (inside a line, inside a chunk size)."""
    stream = b"".join(b"data: " + e + b"\r\n\r\n" for e in EVENTS)
    cuts = [stream[:7], stream[7:50], stream[50:51], stream[51:]]
    if not chunked:
        return cuts
    coded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in cuts) + b"0\r\n\r\n"
    return [coded[:3], coded[3:40], coded[40:]]


async def fetch(chunked: bool) -> list[bytes]:

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        await reader.readexactly(int(head.split("content-length:")[1].split("\r\n")[0]))  # the request's body
        status = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        writer.write(status + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n"))
        for piece in body_pieces(chunked):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return [data async for data in SERVE_LOAD.sse_data(port, {"stream": True})]


def test_sse_events_arrive_whole_however_the_body_is_cut() -> None:
    assert asyncio.run(fetch(chunked=True)) == EVENTS
    assert asyncio.run(fetch(chunked=False)) == EVENTS


class Tokenizer:
    vocab_size = 6

    def decode(self, ids: list[int]) -> str:
        return {0: "", 1: "", 2: "a", 3: " b", 4: "", 5: "\ufffd"}[ids[0]]


def test_the_tokens_that_print_nothing_are_banned() -> None:
    # 5 is half a character: it prints once its other half comes, so it stays allowed
    assert SERVE_LOAD.silent_tokens(Tokenizer()) == {"0": -100.0, "1": -100.0, "4": -100.0}
