"""Start a real `tramontane serve` process for a test module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of a healthy server; terminated on exit."""
    port = free_port()
    proc = subprocess.Popen(  # stderr to a file: an unread pipe could fill up and block the server
        [sys.executable, "-m", "tramontane", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        yield wait_healthy(base, proc, log), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> str:
    """`base` once its /health answers 200; fails the test if the process dies or 600 s pass (a loaded
    machine loads slowly)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server did not come up: {log.read_text()[-3000:]}")


def metric(base: str, name: str, headers: dict | None = None) -> float:
    """One sample's value from /metrics (first line starting with `name`)."""
    for line in httpx.get(f"{base}/metrics", headers=headers, timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
