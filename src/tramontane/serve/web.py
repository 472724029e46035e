"""The web chat page of `tramontane serve`: one static HTML page with its stylesheet and script.

`GET /` returns the page; `GET /web/{name}` returns the files next to it (`chat.css`, `chat.js`) and
the browser libraries it renders answers with (`vendor/`: marked for markdown, DOMPurify to sanitise
what marked makes, highlight.js for code, KaTeX for math; copied from their npm packages, licenses and
versions in `vendor/LICENSES.md`). Everything is plain files under `serve/static/`: no build step, and
nothing is fetched from outside the server (the Content-Security-Policy header forbids it). The page talks to the server's own
OpenAI-compatible routes, with URLs relative to the page (`v1/models`, `v1/chat/completions`), so it
also works behind a reverse proxy that mounts the server under a path prefix.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter()

# The files the router serves, by name, and their media types. A fixed table: no path from a
# request ever reaches the file system.
_CSS, _JS = "text/css; charset=utf-8", "text/javascript; charset=utf-8"
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "chat.css": _CSS,
    "chat.js": _JS,
    "render.js": _JS,
    **{f"vendor/{name}": _JS for name in ("marked.umd.js", "purify.min.js", "highlight.min.js", "katex.min.js")},
    "vendor/LICENSES.md": "text/markdown; charset=utf-8",
}

# The page and its files. Behind --api-key they answer 401 with a Basic-auth challenge, so a browser
# asks for the key itself (any user name, the key as password) and sends it with the page's API calls.
PAGE_PATHS = frozenset({"/"} | {f"/web/{name}" for name in _FILES if name != "index.html"})

# Same-origin only: the page loads its own scripts and stylesheets and calls its own API, nothing else;
# no inline script or style (KaTeX writes MathML, which needs no style attribute).
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("tramontane.serve").joinpath("static", name).read_bytes()


def _file_response(name: str) -> Response:
    return Response(content=_read(name), media_type=_FILES[name], headers=_HEADERS)


@router.get("/", include_in_schema=False)
def chat_page() -> Response:
    """The chat page."""
    return _file_response("index.html")


@router.get("/web/{name:path}", include_in_schema=False)
def chat_asset(name: str) -> Response:
    """The page's stylesheets and scripts (a fixed table of names)."""
    if name not in _FILES or name == "index.html":
        raise HTTPException(status_code=404, detail=f"no such file: {name}")
    return _file_response(name)
