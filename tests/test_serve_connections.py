"""Connection hygiene (serve/connections.py): idle and trickling connections cannot take the server down.

The table's rules by hand, then a real uvicorn server (configured as `tramontane serve` configures it)
in front of the fake engine, flooded over raw sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fake_engine import FakeEngine
from serving import free_port

from tramontane.serve import create_app
from tramontane.serve.connections import ConnectionLimits, ConnectionTable
from tramontane.serve.server import ServeOptions, uvicorn_config


@dataclass(eq=False)
class Conn:
    phase: str
    since: float
    client: tuple[str, int] | None = ("10.0.0.1", 1)


def test_a_cap_closes_the_longest_waiting_connection_not_a_busy_one():
    table = ConnectionTable(ConnectionLimits(max_connections=3, max_per_client=2))
    busy, idle_old, idle_new = Conn("busy", 0.0), Conn("idle", 1.0), Conn("head", 2.0)
    assert table.admit(busy) == [] and table.admit(idle_old) == []
    assert table.admit(idle_new) == [idle_old]  # the address's cap (2): its longest waiting non-busy goes
    other = Conn("idle", 0.5, ("10.0.0.2", 1))
    assert table.admit(other) == []  # 3 open: busy, idle_new, other
    late = Conn("idle", 3.0, ("10.0.0.3", 1))
    assert table.admit(late) == [other]  # the overall cap (3): the oldest waiting of all
    assert list(table.open) == [busy, idle_new, late]


def test_a_new_connection_is_refused_when_every_other_is_busy():
    table = ConnectionTable(ConnectionLimits(max_connections=2, max_per_client=2))
    first, second, third = Conn("busy", 0.0), Conn("busy", 1.0), Conn("idle", 2.0)
    table.admit(first)
    table.admit(second)
    assert table.admit(third) == [third]
    assert set(table.open) == {first, second} and len(table.by_client["10.0.0.1"]) == 2


def test_deadlines_by_phase():
    table = ConnectionTable(ConnectionLimits(head_timeout=10, body_timeout=30, idle_timeout=5))
    idle, head, body, busy = Conn("idle", 100.0), Conn("head", 100.0), Conn("body", 100.0), Conn("busy", 0.0)
    for c in (idle, head, body, busy):
        table.admit(c)
    assert table.expired(104.9) == []
    assert table.expired(105.0) == [idle]
    assert table.expired(110.0) == [idle, head]
    assert table.expired(1e9) == [idle, head, body]  # a busy connection (a request running) never times out


@contextlib.contextmanager
def server(limits: ConnectionLimits, api_key: str | None = None):
    """(port, the protocol's connection table) of a uvicorn server configured as `tramontane serve`."""
    engine = FakeEngine()
    opts = ServeOptions(
        model=None, name="fake-model", host="127.0.0.1", port=free_port(), api_key=api_key, kv_cache_memory=1,
        max_queued=8, max_running=8, max_body_bytes=1 << 20, block_size=16, max_num_batched_tokens=64,
        dtype="float32", quant=None, drain_timeout=1.0, allow_origins=[], log_level="error", limits=limits,
    )  # fmt: skip
    config = uvicorn_config(create_app(engine, api_key=api_key), opts)
    config.lifespan = "off"
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield opts.port, config.http.guard  # type: ignore[union-attr]
    finally:
        srv.should_exit = True
        thread.join(10)


def connect(port: int, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def closed_by_server(sock: socket.socket, deadline: float = 30.0) -> bytes:
    """What the server sent before closing (b"" if nothing); fails if it stays open past the deadline."""
    sock.settimeout(deadline)
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_two_thousand_idle_and_trickling_connections_leave_the_api_answering():
    """Half idle, half with a request head half sent, all from the test's address (as a request from
    the same machine): /health and an authenticated request still answer at once."""
    limits = ConnectionLimits(head_timeout=120, body_timeout=120, idle_timeout=120)  # only the caps act
    with server(limits, api_key="KEY") as (port, table):
        flood = [
            connect(port, b"" if i % 2 else b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n") for i in range(2000)
        ]
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                assert client.get("/health").status_code == 200
                r = client.post(
                    "/v1/chat/completions",
                    headers={"Authorization": "Bearer KEY"},
                    json={"messages": [{"role": "user", "content": "Hi"}]},
                )
                assert r.status_code == 200, r.text
            assert len(table.open) <= limits.max_per_client
            assert table.counts["evicted"] >= 2000 - limits.max_per_client
        finally:
            for sock in flood:
                sock.close()


def test_timeouts_close_half_sent_heads_trickling_bodies_and_idle_connections():
    limits = ConnectionLimits(head_timeout=1.0, body_timeout=1.0, idle_timeout=1.0)
    with server(limits) as (port, table):
        head = connect(port, b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        body = connect(port, b'POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"in')
        idle = connect(port)
        kept_alive = connect(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_server(head).startswith(b"HTTP/1.1 408")
        assert closed_by_server(body).startswith(b"HTTP/1.1 408")
        assert closed_by_server(idle) == b""
        answer = closed_by_server(kept_alive)  # answered, then closed once idle
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
        assert table.counts["timed_out"] >= 3
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/health").status_code == 200


@pytest.mark.parametrize("flag,value", [("--timeout-head", "0"), ("--timeout-body", "nan"), ("--max-connections", "0")])
def test_connection_flags_refuse_nonsense(flag, value, capsys):
    from tramontane.cli.main import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", flag, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"argument {flag}" in err
    assert err.startswith("tramontane: error: ") and err.count("\n") == 1  # one line, no usage dump


def test_chunked_with_a_content_length_is_refused():
    """Both framings at once: what a proxy and the server could read differently (request smuggling)."""
    with server(ConnectionLimits()) as (port, _):
        sock = connect(
            port,
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        assert closed_by_server(sock).startswith(b"HTTP/1.1 400")


def test_the_loaded_server_freezes_its_start_up_objects(smollm2_path):
    """A full garbage collection scanned everything start-up made (torch, transformers, the model: 210,000
    objects, 190-200 ms with the GIL held), stalling every stream once in a while; the server now
    freezes them once loaded, and a full collection is then short."""
    import gc

    from tramontane.serve.server import _load_engine

    opts = ServeOptions(
        model=str(smollm2_path), name="smol", host="127.0.0.1", port=0, api_key=None, kv_cache_memory=16 << 20,
        max_queued=8, max_running=8, max_body_bytes=1 << 20, block_size=16, max_num_batched_tokens=64,
        dtype="auto", quant=None, drain_timeout=1.0, allow_origins=[], log_level="error",
    )  # fmt: skip
    try:
        engine = _load_engine(opts)
        assert gc.get_freeze_count() > 50_000
        began = time.perf_counter()
        gc.collect()
        assert gc.get_freeze_count() > 50_000 and engine.pool.num_blocks > 0
        print(f"full collection after the freeze: {1000 * (time.perf_counter() - began):.1f} ms")
    finally:
        gc.unfreeze()  # the other tests' process: as it was
