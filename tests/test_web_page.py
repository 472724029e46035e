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

import httpx
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
CODE = 'def greet(name):\n    return f"hello {name}"  # a comment'
MARKDOWN = [
    "## A heading\n\nSome **bold** text, inline math $e^{i\\pi} + 1 = 0$ and a list:\n\n- one\n- two\n\n",
    f"```python\n{CODE}\n```\n\n",
    "$$\\int_0^1 x\\,dx = \\frac{1}{2}$$\n\n| a | b |\n|---|---|\n| 1 | 2 |\n",
]
# Every way an answer could try to run script or load something; `TRACKER` must never be requested.
TRACKER = "tracker.png"
HOSTILE = [
    '<img src=x onerror="window.__pwned = 1">',
    " <script>window.__pwned = 2</script>",
    " [click me](javascript:window.__pwned=3)",
    f" ![pic](/{TRACKER})",
    f' <iframe src="/{TRACKER}"></iframe>',
    ' <a href="#" onclick="window.__pwned = 4">link</a>',
    f' <svg onload="window.__pwned = 5"><image href="/{TRACKER}"/></svg>',
    f' <div style="background:url(/{TRACKER})">styled</div>',
    " $\\href{javascript:window.__pwned=6}{x}$",
]
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

    @app.get(f"/{TRACKER}")
    def tracker() -> dict:
        log["tracker"] = log.get("tracker", 0) + 1
        return {}

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
        scripted = scripted_deltas(body, log)
        if scripted is not None:
            return StreamingResponse(delta_events(scripted), media_type="text/event-stream")
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


def scripted_deltas(body: dict, log: dict) -> list[dict] | None:
    """The deltas of the answers the feature tests ask for, by a word of the question (None: others)."""
    last = body["messages"][-1]
    if last.get("prefix"):  # Continue: the model goes on with the last answer
        return [{"content": " continued"}, {"content": "."}]
    question = last["content"]
    if "markdown" in question:
        return [{"content": piece} for piece in MARKDOWN]
    if "hostile" in question:
        return [{"content": piece} for piece in HOSTILE]
    if "count" in question:
        log["count"] = log.get("count", 0) + 1
        return [{"content": "answer "}, {"content": str(log["count"])}]
    if "think" in question:
        return [{"reasoning_content": "The user greets; "}, {"reasoning_content": "greet back."}, {"content": "Hello!"}]
    if "tag" in question:
        return [{"content": "<think>Tags hold "}, {"content": "this.</think>"}, {"content": "Tagged answer."}]
    if "tool" in question:
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        return [
            {"tool_calls": [call]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        ]
    return None


async def delta_events(deltas: list[dict]):
    yield _sse(_chunk({"role": "assistant", "content": ""}))
    for delta in deltas:
        await asyncio.sleep(0.02)
        yield _sse(_chunk(delta))
    yield _sse(_chunk({}, finish="stop"))
    yield "data: [DONE]\n\n"


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
    # The answer is kept as sent; shown as markdown, where "\r\n" ends a line as "\n" does.
    assert answers(page).last.locator(".text").text_content() == "".join(AWKWARD_PIECES).replace("\r\n", "\n")
    saved = page.evaluate("() => JSON.parse(localStorage.getItem('tramontane.conversations.v1')).list[0]")
    assert saved["messages"][-1]["content"] == "".join(AWKWARD_PIECES)
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
        assert shown and shown[-1] == seen[-1], shown
        assert "Paris" in seen[-1]
        # The same request streams in pieces, an event a token: the page may still read several in one go
        # where the browser is slow to read (the suite's workers busy) and show them at once, so the pieces
        # are counted here; that the page shows each as it arrives is test_chat_streams_shows_speed_and_
        # survives_reload's to check, against a server that paces them
        body = {"model": "SmolLM2-135M-Instruct.Q4_1", "stream": True, "temperature": 0, "max_tokens": 24}
        body["messages"] = [{"role": "user", "content": "What is the capital of France?"}]
        key = {"Authorization": "Bearer k3y"}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=key, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: {")]
        pieces = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events)
        assert len(events) > 2 and pieces == seen[-1], events
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "web_chat_smollm2.png"))
        context.close()


def ask(tab, question: str) -> None:
    tab.fill("#prompt", question)
    tab.press("#prompt", "Enter")
    wait_answer_state(tab, "done")


def test_markdown_code_math_and_a_working_copy_button(page, browser):
    """Markdown with a code block renders as a highlighted block whose Copy button puts the code on
    the clipboard; math becomes MathML; in light and dark."""
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    ask(page, "show me markdown")
    answer = answers(page).last.locator(".text")
    expect(answer.locator("h2")).to_have_text("A heading")
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer.locator("li")).to_have_count(2)
    code = answer.locator(".code pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b.*language-python|language-python.*\bhljs\b"))
    assert code.text_content() == CODE + "\n"  # a code block's text ends its last line
    assert code.locator(".hljs-keyword").first.text_content() == "def"
    assert code.locator(".hljs-string").count() >= 1 and code.locator(".hljs-comment").count() == 1
    assert answer.locator(".code-bar").text_content().startswith("python")
    assert answer.locator("math").count() == 2  # inline and display, as MathML
    assert answer.locator(".math math[display=block]").count() == 1
    assert "π" in answer.locator("p math").first.text_content()
    expect(answer.locator("table td")).to_have_count(2)
    answer.locator(".code button.copy").click()
    expect(answer.locator(".code button.copy")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == CODE
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_markdown_light.png"))
    page.click("#theme")  # auto -> light
    page.click("#theme")  # light -> dark
    assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 23, 28)", background
    page.screenshot(path=str(ARTIFACTS / "web_markdown_dark.png"))
    page.reload()
    wait_for_model(page)
    assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"  # remembered


def test_a_hostile_answer_runs_nothing_and_loads_nothing(page, server):
    """Model output is untrusted: raw HTML shows as text, javascript: links and event handlers are
    gone, and nothing is fetched (no image, frame or style URL), before or after a click."""
    _, log = server
    log.pop("tracker", None)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    ask(page, "a hostile answer")
    answer = answers(page).last.locator(".text")
    for tag in ("img", "script", "iframe", "svg", "image", "style"):
        assert answer.locator(tag).count() == 0, tag
    assert "<img src=x onerror" in answer.text_content() and "<script>" in answer.text_content()
    assert answer.locator("[onerror], [onclick], [onload], [style]").count() == 0
    hrefs = answer.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert not any(h and h.strip().lower().startswith("javascript") for h in hrefs), hrefs
    for link in answer.locator("a").all():
        if (link.get_attribute("href") or "").startswith("/"):
            continue  # a same-site link would open a tab; nothing to run
        link.click(modifiers=["Alt"])  # no navigation: a click of what is left
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__pwned") is None
    assert "tracker" not in log and not any(TRACKER in url for url in requested), requested


def test_regenerate_edit_and_continue(page, server):
    _, log = server
    log["count"] = 0
    ask(page, "count once")
    assert conversation(page) == [("user", "count once"), ("assistant", "answer 1")]
    answers(page).last.get_by_role("button", name="Regenerate").click()
    expect(answers(page).last.locator(".text")).to_have_text("answer 2")
    wait_answer_state(page, "done")
    assert conversation(page) == [("user", "count once"), ("assistant", "answer 2")]
    assert [m["role"] for m in log["requests"][-1]["body"]["messages"]] == ["user"]

    page.locator("#log .msg.user").first.get_by_role("button", name="Edit").click()
    editor = page.locator("#log .msg.user textarea.edit")
    editor.fill("count again")
    editor.press("Enter")
    expect(answers(page).last.locator(".text")).to_have_text("answer 3")
    wait_answer_state(page, "done")
    assert conversation(page) == [("user", "count again"), ("assistant", "answer 3")]

    answers(page).last.get_by_role("button", name="Continue").click()
    expect(answers(page).last.locator(".text")).to_have_text("answer 3 continued.")
    wait_answer_state(page, "done")
    sent = log["requests"][-1]["body"]["messages"]
    assert sent[-1] == {"role": "assistant", "content": "answer 3", "prefix": True}
    assert conversation(page) == [("user", "count again"), ("assistant", "answer 3 continued.")]
    page.reload()
    wait_for_model(page)
    assert conversation(page) == [("user", "count again"), ("assistant", "answer 3 continued.")]


def test_system_prompt_and_sampling_panel(page, server):
    _, log = server
    page.click("#settings summary")
    page.fill("#system", "You are terse.")
    for field, value in (("top-p", "0.9"), ("top-k", "40"), ("min-p", "0.05"), ("presence-penalty", "0.5"),
                         ("frequency-penalty", "0.25"), ("repetition-penalty", "1.1"), ("seed", "7")):  # fmt: skip
        page.fill(f"#{field}", value)
        page.press(f"#{field}", "Tab")
    ask(page, "count with settings")
    body = log["requests"][-1]["body"]
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert {k: body[k] for k in ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty")} == {
        "top_p": 0.9, "top_k": 40, "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": 0.25,
    }  # fmt: skip
    assert body["repetition_penalty"] == 1.1 and body["seed"] == 7
    page.fill("#seed", "")
    page.press("#seed", "Tab")
    page.reload()
    wait_for_model(page)
    assert page.input_value("#system") == "You are terse." and page.input_value("#top-k") == "40"
    ask(page, "count without a seed")
    assert "seed" not in log["requests"][-1]["body"]  # empty: the server's default


def test_reasoning_and_tool_calls_are_shown(page):
    ask(page, "think first")
    last = answers(page).last
    expect(last.locator(".reasoning")).to_be_visible()
    assert last.locator(".reasoning-text").text_content() == "The user greets; greet back."
    assert last.locator(".text").text_content() == "Hello!"
    ask(page, "tag it")
    last = answers(page).last
    assert last.locator(".reasoning-text").text_content() == "Tags hold this."
    assert last.locator(".text").text_content() == "Tagged answer."
    ask(page, "call a tool")
    call = answers(page).last.locator(".tool-call")
    assert call.locator("summary").text_content() == "Tool call: get_weather"
    call.locator("summary").click()
    assert json.loads(call.locator("pre").text_content()) == {"city": "Paris"}


def test_conversations_are_saved_renamed_deleted_and_exported(page):
    ask(page, "count for the first chat")
    page.click("#new-chat")
    ask(page, "count for the second chat")
    page.reload()
    wait_for_model(page)
    page.click("#conversations summary")
    rows = page.locator("#conversation-list li")
    expect(rows).to_have_count(2)
    assert rows.first.locator(".title").text_content() == "count for the second chat"  # most recent first
    rows.nth(1).locator(".title").click()
    assert conversation(page)[0] == ("user", "count for the first chat")

    assert rows.first.locator(".title").text_content() == "count for the second chat"  # opening is no change
    page.locator("#conversation-list li.current").get_by_role("button", name="Rename").click()
    page.fill("#conversation-list input", "Renamed chat")
    page.press("#conversation-list input", "Enter")
    expect(page.locator("#conversation-list li.current .title")).to_have_text("Renamed chat")

    with page.expect_download() as json_file:
        page.click("#export-json")
    data = json.loads(Path(json_file.value.path()).read_text())
    assert data["title"] == "Renamed chat" and data["model"] == MODEL_ID
    assert [(m["role"], m["content"]) for m in data["messages"]][0] == ("user", "count for the first chat")
    assert json_file.value.suggested_filename == "Renamed-chat.json"
    with page.expect_download() as md_file:
        page.click("#export-md")
    markdown = Path(md_file.value.path()).read_text()
    assert markdown.startswith("# Renamed chat\n") and "## You\n\ncount for the first chat\n" in markdown

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#conversation-list li.current").get_by_role("button", name="Delete").click()
    expect(rows).to_have_count(1)
    assert conversation(page) == []
    page.reload()
    wait_for_model(page)
    page.click("#conversations summary")
    expect(page.locator("#conversation-list li")).to_have_count(1)


def test_at_390_px_nothing_scrolls_sideways(page):
    """A phone: long code lines and tables scroll inside their boxes, never the page."""
    page.set_viewport_size({"width": 390, "height": 800})
    ask(page, "markdown on a phone")
    page.fill("#prompt", "x" * 300)
    ask(page, "count " + "y" * 200)
    no_sideways_scroll = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    assert page.evaluate(no_sideways_scroll)
    page.click("#settings summary")
    page.click("#conversations summary")
    assert page.evaluate(no_sideways_scroll)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_390px.png"), full_page=True)
