"""Pure ASGI middleware (no buffering, so streaming and disconnects pass through untouched):
status counting for the metrics, the Host and Origin checks, the API key check, and the request body
size limit."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Collection, Container
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, BodyTooLarge


class RecordStatus:
    """Counts every HTTP response by status through `record(status)` (the engine's metrics)."""

    def __init__(self, app: ASGIApp, record: Callable[[int], None]) -> None:
        self.app, self.record = app, record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.record(int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(value: str) -> str:
    """The name in a Host header or an origin's netloc, without port or IPv6 brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class CheckHost:
    """421 for a Host header not in `allowed` (a server bound to loopback answers only to loopback
    names, so a page whose DNS name is rebound to 127.0.0.1 cannot reach it), and 403 for a browser
    request whose Origin is neither the server itself nor in `origins` (CORS's allow list, "*": any):
    a web page cannot POST to a key-less local server behind its user's back."""

    def __init__(self, app: ASGIApp, allowed: Collection[str] | None, origins: Collection[str]) -> None:
        self.app, self.allowed, self.origins = app, allowed, origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            names = ", ".join(sorted(self.allowed))
            return await APIError(
                421, f"this server answers to the host names {names} (add one with --allowed-host)", code="bad_host"
            ).response(scope["path"])(scope, receive, send)
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not self._origin_allowed(origin, host):
            return await APIError(
                403,
                f"requests from the web origin {origin[:200]!r} are refused; start the server with "
                "--allow-origin ORIGIN to allow them",
                code="origin_not_allowed",
            ).response(scope["path"])(scope, receive, send)
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str, host: str) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        return urlsplit(origin).netloc.lower() == host.strip().lower()  # the server's own page


class RequireKey:
    """401 unless the request carries the key, compared in constant time: `Authorization: Bearer KEY`
    (the SDKs) or HTTP Basic with KEY as the password (a browser asks for it natively). Paths in
    `public` (the health probe) need no key; a 401 on a `browser` path (the chat page) asks for Basic."""

    def __init__(self, app: ASGIApp, key: str, public: Container[str], browser: Container[str] = ()) -> None:
        self.app, self.key, self.public, self.browser = app, key.encode(), public, browser

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(given.strip(), self.key)
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(given.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        if self._authorized(header):
            return await self.app(scope, receive, send)
        problem = "missing API key" if not header else "invalid API key"
        response = APIError(401, f"{problem}: send it as 'Authorization: Bearer KEY'", code="invalid_api_key").response(
            scope["path"]
        )
        if scope["path"] in self.browser:
            response.headers["WWW-Authenticate"] = 'Basic realm="tramontane (any user name, the API key as password)"'
        await response(scope, receive, send)


MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024


class LimitBody:
    """413 for a body over `limit` bytes (a path in `paths` has its own: file uploads): at once when
    Content-Length says so, else as soon as the bytes received (a chunked body has no Content-Length)
    pass the limit. 431 for more than MAX_HEADERS headers or MAX_HEADER_BYTES of them."""

    def __init__(self, app: ASGIApp, limit: int, paths: dict[str, int] | None = None) -> None:
        self.app, self.default, self.paths = app, limit, paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope["path"], self.default)
        size = sum(len(k) + len(v) for k, v in scope["headers"])
        if len(scope["headers"]) > MAX_HEADERS or size > MAX_HEADER_BYTES:  # (h11 also caps a head still arriving)
            return await APIError(
                431,
                f"the request has {len(scope['headers'])} headers of {size} bytes; the limits "
                f"are {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes",
                code="request_header_fields_too_large",
            ).response(scope["path"])(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and b"transfer-encoding" in dict(scope["headers"]):  # a smuggling attempt
            return await APIError(
                400, "a request cannot have both Content-Length and Transfer-Encoding", code="bad_framing"
            ).response(scope["path"])(scope, receive, send)
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                return await APIError(400, "invalid Content-Length header").response(scope["path"])(
                    scope, receive, send
                )
            if too_large:
                return await BodyTooLarge(limit).response(scope["path"])(scope, receive, send)
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:  # raised where the route did not turn it into a response itself
            if started:
                raise
            await exc.response(scope["path"])(scope, receive, watching_send)
