"""The web chat page of `tramontane serve`, driven in Debian's Chromium through Playwright.

The page is served by the real `tramontane.serve.web.router`; the API behind it is a fake written
here (a model list and a slow, streaming chat completion), so the test needs no model and no other
part of the server. Chromium comes from Debian (`make test` installs it); Playwright's own browser
download is never used.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from playwright.sync_api import expect, sync_playwright

from tramontane.serve import web

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (Debian package `chromium`; `make test` installs it)"
)

MODEL_ID = "fake-mistral-7b"
# The answer arrives in these pieces; the markup must show up as text, never as elements.
PIECES = ["Hello", "! This", " is <b>bold</b>", " and", "\na second", " line."]
PIECE_DELAY_S = 0.12
AWKWARD_PIECES = ["Caf\u00e9 ", "\u2615 and ", "\U0001f35e", "\r\n", "done."]
SLOW_PIECES = [f" word{i}" for i in range(40)]
SLOW_DELAY_S = 0.15


# ---- the fake API --------------------------------------------------------------------------------


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def fake_api(log: dict) -> FastAPI:
    """The page's router plus a fake OpenAI-compatible API that records what it was sent."""
    app = FastAPI()
    app.include_router(web.router)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        log["requests"].append({"body": body, "auth": request.headers.get("authorization")})
        question = body["messages"][-1]["content"]
        if "fail" in question:
            error = {"message": "the fake model refuses to answer", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=400)
        if "framing" in question:
            return StreamingResponse(awkward_events(), media_type="text/event-stream")
        pieces, delay = (SLOW_PIECES, SLOW_DELAY_S) if "slow" in question else (PIECES, PIECE_DELAY_S)

        async def events():
            sent = 0
            try:
                yield _sse(_chunk({"role": "assistant", "content": ""}))
                for piece in pieces:
                    await asyncio.sleep(delay)
                    yield _sse(_chunk({"content": piece}))
                    sent += 1
                yield _sse(_chunk({}, finish="stop"))
                usage = {"prompt_tokens": 9, "completion_tokens": len(pieces), "total_tokens": 9 + len(pieces)}
                yield _sse({**_chunk({}), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
            finally:
                log["streams"].append({"question": question, "sent": sent, "of": len(pieces)})

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def awkward_events():
    """Legal but awkward SSE: CRLF line ends, comments, a multi-line data field, no space after the
    colon, and bytes cut at arbitrary places (inside JSON, inside a UTF-8 character, inside CRLF)."""
    text = ": keep-alive\r\n\r\n"
    for piece in AWKWARD_PIECES:
        data = json.dumps(_chunk({"content": piece}), ensure_ascii=False)
        cut = data.index(",") + 1  # between two JSON tokens
        text += "data:" + data[:cut] + "\r\ndata: " + data[cut:] + "\r\n\r\n"
    text += "data: [DONE]\r\n\r\n"
    raw = text.encode()
    for start in range(0, len(raw), 5):
        yield raw[start : start + 5]
        await asyncio.sleep(0.002)


@pytest.fixture(scope="module")
def server():
    """(base URL, log) of the fake API running in a thread on a free port."""
    log: dict = {"requests": [], "streams": []}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(fake_api(log), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/", log
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab (fresh sessionStorage) on the chat page; the server's log emptied."""
    base, log = server
    log["requests"].clear()
    log["streams"].clear()
    context = browser.new_context(viewport={"width": 900, "height": 720})
    tab = context.new_page()
    tab.set_default_timeout(20000)  # generous: CI shares 2 cores with the other tests
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(base)
    wait_for_model(tab)
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# ---- helpers -------------------------------------------------------------------------------------


def wait_for_model(tab) -> None:
    expect(tab.locator("#model")).to_have_value(MODEL_ID)


def answers(tab):
    return tab.locator("#log .msg.assistant")


def wait_answer_state(tab, state: str) -> None:
    expect(answers(tab).last).to_have_attribute("data-state", state)


def watch_answer(tab, timeout_s: float = 30) -> list[str]:
    """Every distinct text of the last answer, polled until it is done."""
    seen: list[str] = []
    last = answers(tab).last
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = last.locator(".text").text_content()
        if not seen or seen[-1] != text:
            seen.append(text)
        if last.get_attribute("data-state") == "done":
            final = last.locator(".text").text_content()  # the text may have grown since it was read
            return seen if seen[-1] == final else [*seen, final]
        time.sleep(0.03)
    raise AssertionError(f"the answer did not finish in {timeout_s} s; saw {seen!r}")


def record_answer_texts(tab) -> None:
    """Records in window.__texts every text the last answer shows, as the page sets it: a
    MutationObserver sees each streamed piece, which arrives in a task of its own, where polling (a real
    server's 24 tokens take 0.1 s here) may see only the empty answer and the whole one."""
    tab.evaluate(
        """() => {
          window.__texts = [];
          new MutationObserver(() => {
            const all = document.querySelectorAll("#log .msg.assistant .text");
            const text = all.length ? all[all.length - 1].textContent : null;
            if (text !== null && window.__texts[window.__texts.length - 1] !== text) window.__texts.push(text);
          }).observe(document.querySelector("#log"), {childList: true, subtree: true, characterData: true});
        }"""
    )


def conversation(tab) -> list[tuple[str, str]]:
    return [
        ("user" if "user" in (m.get_attribute("class") or "") else "assistant", m.locator(".text").text_content())
        for m in tab.locator("#log .msg").all()
    ]


# ---- tests ---------------------------------------------------------------------------------------


def test_chat_streams_shows_speed_and_survives_reload(page, server):
    _, log = server
    page.click("#settings summary")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "64")

    prompt = page.locator("#prompt")
    prompt.click()
    prompt.type("Hello")
    prompt.press("Shift+Enter")  # a new line, not a send
    prompt.type("there")
    assert prompt.input_value() == "Hello\nthere"
    assert page.locator("#log .msg").count() == 0
    prompt.press("Enter")

    seen = watch_answer(page)
    full = "".join(PIECES)
    assert seen[-1] == full
    growing = [t for t in seen if t]
    assert len(growing) >= 3, f"the answer did not stream: {seen!r}"
    assert all(full.startswith(t) for t in growing)
    assert prompt.input_value() == ""

    # Model output is text: the <b> arrived as characters, not as an element.
    assert answers(page).last.locator(".text b").count() == 0
    meta = answers(page).last.locator(".meta").text_content()
    assert re.search(r"\b6 tokens\b.*\b\d+\.\d tokens/s", meta), meta

    sent = log["requests"][0]["body"]
    assert sent["stream"] is True and sent["model"] == MODEL_ID
    assert sent["temperature"] == 0.3 and sent["max_tokens"] == 64
    assert sent["messages"] == [{"role": "user", "content": "Hello\nthere"}]
    assert log["requests"][0]["auth"] is None

    prompt.fill("And then?")
    prompt.press("Enter")
    watch_answer(page)
    history = log["requests"][1]["body"]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == full

    before = conversation(page)
    assert len(before) == 4
    page.reload()
    wait_for_model(page)
    assert conversation(page) == before
    assert "tokens/s" in answers(page).first.locator(".meta").text_content()
    assert page.input_value("#temperature") == "0.3"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat.png"))

    page.click("#new-chat")
    assert conversation(page) == []
    page.reload()
    wait_for_model(page)
    assert conversation(page) == []
    assert page.locator("#empty").is_visible()


def test_stop_aborts_a_slow_answer(page, server):
    _, log = server
    page.fill("#prompt", "Tell me a slow story")
    page.press("#prompt", "Enter")
    expect(answers(page).last.locator(".text")).to_have_text(re.compile(r"\S"))
    assert page.locator("#send").is_disabled()
    page.click("#stop")
    wait_answer_state(page, "stopped")
    kept = answers(page).last.locator(".text").text_content()
    assert kept and len(kept) < len("".join(SLOW_PIECES))
    assert "stopped" in answers(page).last.locator(".meta").text_content()
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()

    # The server sees the disconnect and stops generating; the page shows nothing more.
    deadline = time.monotonic() + 3
    while not log["streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log["streams"] and log["streams"][0]["sent"] < len(SLOW_PIECES), log["streams"]
    time.sleep(3 * SLOW_DELAY_S)
    assert answers(page).last.locator(".text").text_content() == kept

    # A stopped answer stays in the conversation.
    page.reload()
    wait_for_model(page)
    assert conversation(page) == [("user", "Tell me a slow story"), ("assistant", kept)]


def test_api_errors_and_key_on_a_narrow_screen(page, server):
    _, log = server
    page.set_viewport_size({"width": 360, "height": 640})
    page.click("#settings summary")
    page.fill("#api-key", "sekret")
    page.press("#api-key", "Tab")  # "change" stores the key and lists the models again
    wait_for_model(page)

    page.fill("#prompt", "please fail")
    page.press("#prompt", "Enter")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "Error 400: the fake model refuses to answer" in error.text_content()
    # A question that got no answer goes back into the box, and out of the conversation.
    assert page.input_value("#prompt") == "please fail"
    assert conversation(page) == []
    assert log["requests"][0]["auth"] == "Bearer sekret"

    no_sideways_scroll = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    assert page.evaluate(no_sideways_scroll)

    page.reload()
    wait_for_model(page)
    assert page.input_value("#api-key") == "sekret"
    assert page.locator("#error").is_hidden()


def test_awkward_but_legal_event_streams(page):
    page.fill("#prompt", "show me odd framing")
    page.press("#prompt", "Enter")
    wait_answer_state(page, "done")
    # A "data" field split over two lines is one event whose data has a "\n" where the lines met,
    # which here falls inside the JSON text, between two tokens: still valid JSON.
    assert answers(page).last.locator(".text").text_content() == "".join(AWKWARD_PIECES)
    assert page.locator("#error").is_hidden()


def test_real_server_streams_an_answer(browser, smollm2_path, tmp_path):
    """The page served by a real `tramontane serve` with SmolLM2, behind --api-key: the browser answers
    the page's Basic-auth challenge with the key and the page streams a real answer."""
    from serving import running_server

    with running_server(tmp_path / "log.txt", "--kv-cache-memory", "64M", "--api-key", "k3y") as (base, _):
        context = browser.new_context(
            viewport={"width": 900, "height": 720}, http_credentials={"username": "me", "password": "k3y"}
        )
        tab = context.new_page()
        tab.set_default_timeout(60000)
        tab.goto(base)
        expect(tab.locator("#model")).to_have_value("SmolLM2-135M-Instruct.Q4_1")
        tab.click("#settings summary")
        tab.fill("#temperature", "0")
        tab.fill("#max-tokens", "24")
        tab.fill("#prompt", "What is the capital of France?")
        record_answer_texts(tab)
        tab.press("#prompt", "Enter")
        seen = watch_answer(tab, timeout_s=60)
        shown = [t for t in tab.evaluate("() => window.__texts") if t]
        assert len(shown) > 2 and shown[-1] == seen[-1], shown  # the answer grew in several steps
        assert "Paris" in seen[-1]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "web_chat_smollm2.png"))
        context.close()
