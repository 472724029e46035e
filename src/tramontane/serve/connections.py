"""Connection hygiene: no idle or trickling client can hold the server.

uvicorn closes a keep-alive connection only after it has answered a request on it, has no timeout for a
request head or body still arriving, and its one connection cap answers 503 to everyone once idle
sockets fill it. So the server runs uvicorn's h11 protocol with these rules added (a subclass, since
uvicorn has no hooks for them):

- every connection is in one phase: `idle` (no request in progress), `head` (a request head is
  arriving), `body` (its body is arriving, nothing answered yet) or `busy` (the application has it);
- each phase but `busy` has a deadline (`ConnectionLimits`); past it the connection is closed, with a
  408 when a request had begun;
- at most `max_connections` connections in all and `max_per_client` from one address: a new one over
  a cap closes the connection of that group that has waited longest in a phase other than `busy` (so
  a real request always gets in while attackers only churn their own sockets); when every one of them
  is busy, the new connection is refused.

    limits = ConnectionLimits(head_timeout=10, max_connections=1024)
    config = uvicorn.Config(app, http=guarded_h11(limits), ...)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tramontane.serve")
Phase = Literal["idle", "head", "body", "busy"]
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
SWEEP_SECONDS = 0.25


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout: float = 10.0  # seconds for a whole request head, from its first byte
    body_timeout: float = 30.0  # seconds for a whole request body, from the end of its head
    idle_timeout: float = 5.0  # seconds a connection may wait without a request (keep-alive)
    max_connections: int = 1024
    max_per_client: int = 256

    def deadline(self, phase: Phase, since: float) -> float | None:
        timeout = {"idle": self.idle_timeout, "head": self.head_timeout, "body": self.body_timeout}.get(phase)
        return None if timeout is None else since + timeout


class Tracked(Protocol):
    """What the table reads of a connection."""

    phase: Phase
    since: float  # when the connection entered its phase (time.monotonic)
    client: tuple[str, int] | None


class ConnectionTable:
    """Open connections in arrival order, by client address; pure bookkeeping, no I/O."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: dict[Tracked, None] = {}  # insertion-ordered set
        self.by_client: dict[str, dict[Tracked, None]] = {}
        self.counts = {"timed_out": 0, "evicted": 0, "refused": 0}

    def admit(self, conn: Tracked) -> list[Tracked]:
        """Register `conn`; the connections to close to make room (it may be `conn` itself)."""
        group = self.by_client.setdefault(_address(conn), {})
        self.open[conn] = None
        group[conn] = None
        closing: list[Tracked] = []
        for members, cap in ((group, self.limits.max_per_client), (self.open, self.limits.max_connections)):
            while len(members) > cap:
                victim = self._longest_waiting(members, exclude=conn) or conn
                self.remove(victim)
                closing.append(victim)
                if victim is conn:
                    return closing
        return closing

    def remove(self, conn: Tracked) -> None:
        self.open.pop(conn, None)
        group = self.by_client.get(_address(conn))
        if group is not None:
            group.pop(conn, None)
            if not group:
                del self.by_client[_address(conn)]

    def expired(self, now: float) -> list[Tracked]:
        """Connections past their phase's deadline."""
        return [c for c in self.open if (d := self.limits.deadline(c.phase, c.since)) is not None and d <= now]

    @staticmethod
    def _longest_waiting(members: dict[Tracked, None], exclude: Tracked) -> Tracked | None:
        waiting = [c for c in members if c is not exclude and c.phase != "busy"]
        return min(waiting, key=lambda c: c.since, default=None)


def _address(conn: Tracked) -> str:
    return conn.client[0] if conn.client else ""


def guarded_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the phases, deadlines and caps of `limits` (one table per
    server: call once per uvicorn.Config)."""
    table = ConnectionTable(limits)
    sweeper: list[asyncio.TimerHandle] = []

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn in table.expired(now):
            assert isinstance(conn, GuardedH11Protocol)
            table.counts["timed_out"] += 1
            conn.drop(f"{conn.phase} timeout")
        sweeper[:] = [loop.call_later(SWEEP_SECONDS, sweep, loop)] if table.open else []

    class GuardedH11Protocol(H11Protocol):
        guard = table  # the server's connection table (tests read its counts)
        phase: Phase = "idle"
        since: float = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._enter("idle")
            for conn in table.admit(self):
                assert isinstance(conn, GuardedH11Protocol)
                table.counts["refused" if conn is self else "evicted"] += 1
                conn.drop("connection limit")
            if not sweeper and table.open:
                sweeper.append(self.loop.call_later(SWEEP_SECONDS, sweep, self.loop))

        def connection_lost(self, exc: Exception | None) -> None:
            table.remove(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.phase == "idle":
                self._enter("head")
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def _follow(self) -> None:
            """Move to the phase the h11 connection and the request cycle are in now."""
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                self._enter("body" if cycle.more_body and not cycle.response_started else "busy")
            elif self.conn.trailing_data[0] or self.conn.their_state is not h11.IDLE:
                self._enter("head")
            else:
                self._enter("idle")

        def _enter(self, phase: Phase) -> None:
            if phase != self.phase or not self.since:
                self.phase, self.since = phase, time.monotonic()

        def drop(self, why: str) -> None:
            """Close the connection: a 408 first when a request had begun and nothing was answered."""
            table.remove(self)
            if self.transport.is_closing():
                return
            answered = self.cycle is not None and self.cycle.response_started
            if self.phase in ("head", "body") and not answered:
                self.transport.write(TIMEOUT_RESPONSE)
            log.debug("closing a connection from %s (%s, %s)", self.client, why, self.phase)
            self.transport.close()

    return GuardedH11Protocol


def raise_open_file_limit(wanted: int, warn: Callable[[str], Any] = log.warning) -> int:
    """Lift the soft limit on open files towards `wanted` (+ a margin for the model's own files);
    returns how many connections fit under the limit in force."""
    import resource

    margin = 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    goal = wanted + margin if hard == resource.RLIM_INFINITY else min(hard, wanted + margin)
    if soft != resource.RLIM_INFINITY and soft < goal:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (goal, hard))
            soft = goal
        except (ValueError, OSError):
            pass
    fits = wanted if soft == resource.RLIM_INFINITY else min(wanted, soft - margin)
    if fits < wanted:
        warn(f"the open-file limit ({soft}) allows {fits} connections, not {wanted}")
    return max(1, fits)
