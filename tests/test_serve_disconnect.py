"""A client that goes away has its engine requests aborted, streaming or not (a real uvicorn server in a
thread, in front of the fake engine, driven over raw sockets)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from fake_engine import FakeEngine

from tramontane.serve import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(delay=0.02)  # one "engine step" = 20 ms
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield engine, port
    server.should_exit = True
    thread.join(5)


def open_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


def wait_for(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def running_ids(engine: FakeEngine, before: int) -> list[str]:
    return [r.request_id for r in engine.requests[before:]]


@pytest.mark.parametrize("stream,n", [(True, 1), (False, 1), (True, 3), (False, 2)])
def test_disconnect_aborts_within_a_step(served, stream, n):
    engine, port = served
    before = len(engine.requests)
    sock = open_request(
        port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": stream, "n": n}
    )
    assert wait_for(lambda: len(engine.requests) - before == n and engine.running >= n)
    if stream:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
    time.sleep(0.1)
    ids = running_ids(engine, before)
    at_close = {i: engine.produced.get(i, 0) for i in ids}
    sock.close()
    assert wait_for(lambda: set(ids) <= set(engine.aborted), timeout=60.0), (ids, engine.aborted[-5:])
    # Counted in engine steps, not seconds (a loaded machine slows both alike): a few steps after the
    # close, not the 200 the answer would take.
    late = {i: engine.produced.get(i, 0) - at_close[i] for i in ids}
    assert max(late.values()) <= 20, late
    assert not set(ids) & set(engine.finished)


def test_a_complete_answer_is_not_aborted(served):
    engine, port = served
    before = len(engine.requests)
    sock = open_request(port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    data = b""
    while b'"finish_reason"' not in data:
        data += sock.recv(65536)
    sock.close()
    ids = running_ids(engine, before)
    assert set(ids) <= set(engine.finished) and not set(ids) & set(engine.aborted)
