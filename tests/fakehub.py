"""A local HTTP server that answers the Hugging Face Hub requests huggingface_hub makes to list and
download a repository's files (point `HF_ENDPOINT` at it). Files are served from memory with the
headers the Hub sends (X-Repo-Commit, ETag, Content-Length) and honour Range requests, so resumed
downloads can be tested; `cut_after` makes the next download of a file stop after that many bytes."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "a" * 40


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.log: list[tuple[str, str, str]] = []  # (method, path, range header)
        self.cut_after: dict[str, int] = {}  # filename -> bytes to send before dropping the connection
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub.handle(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _json(self, h: BaseHTTPRequestHandler, value: object, status: int = 200) -> None:
        data = json.dumps(value).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Repo-Commit", COMMIT)
        h.end_headers()
        h.wfile.write(data)

    def _missing(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        h.send_response(404)
        h.send_header("X-Error-Code", "RepoNotFound")
        h.send_header("Content-Length", "2")
        h.end_headers()
        if body:
            h.wfile.write(b"{}")

    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.log.append((h.command, path, h.headers.get("Range", "")))
        api = re.fullmatch(r"/api/models/(.+?)/(revision|tree)/([^/]+)(/.*)?", path)
        if api:
            repo = self.repos.get(api.group(1))
            if repo is None:
                return self._missing(h, body)
            if api.group(2) == "tree":
                return self._json(
                    h,
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(repo.items())
                    ],
                )
            return self._json(
                h,
                {
                    "id": api.group(1),
                    "sha": COMMIT,
                    "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(repo)],
                },
            )
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        repo = self.repos.get(resolve.group(1)) if resolve else None
        if repo is None or resolve.group(3) not in repo:
            return self._missing(h, body)
        self._file(h, resolve.group(3), repo[resolve.group(3)], body)

    def _file(self, h: BaseHTTPRequestHandler, name: str, data: bytes, body: bool) -> None:
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
        part = data[start:]
        h.send_response(206 if ranged else 200)
        h.send_header("Content-Length", str(len(part)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        cut = self.cut_after.pop(name, None)
        if cut is not None:  # an interrupted download: part of the bytes, then the connection drops
            h.wfile.write(part[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.close()
            return
        h.wfile.write(part)
