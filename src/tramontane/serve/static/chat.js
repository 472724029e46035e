// The chat page of `tramontane serve`: streams answers from the server's OpenAI-compatible API.
//
// Routes used, relative to the page: GET v1/models, POST v1/chat/completions with stream: true
// (server-sent events `data: {chunk}` ending with `data: [DONE]`). Model output is only ever set
// with textContent, never parsed as HTML. The conversation, settings and API key live in
// sessionStorage: they survive a reload of this tab and are gone when the tab is closed.
"use strict";

(() => {
  const KEYS = {
    chat: "tramontane.chat.v1",
    settings: "tramontane.settings.v1",
    apiKey: "tramontane.apiKey",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    log: $("log"), empty: $("empty"), error: $("error"), form: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newChat: $("new-chat"), model: $("model"), settings: $("settings"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  };

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }

  // ---- storage -------------------------------------------------------------------------------

  function load(key, fallback) {
    try {
      const value = JSON.parse(sessionStorage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  }

  function store(key, value) {
    try {
      sessionStorage.setItem(key, JSON.stringify(value));
    } catch {
      // Storage full or disabled: the chat still works, it just won't survive a reload.
    }
  }

  // A saved conversation is trusted only as far as its shape: roles and string contents.
  function loadMessages() {
    const saved = load(KEYS.chat, []);
    if (!Array.isArray(saved)) return [];
    const ok = saved.filter((m) => m && (m.role === "user" || m.role === "assistant")
      && typeof m.content === "string");
    // An answer that was streaming when the tab reloaded is kept as far as it got.
    for (const m of ok) if (m.meta?.state === "streaming") m.meta.state = "interrupted";
    // Keep user/assistant turns alternating (chat templates require it): drop an unanswered tail.
    while (ok.length && (ok.at(-1).role === "user" || ok.at(-1).content === "")) ok.pop();
    return ok;
  }

  let messages = loadMessages();
  let controller = null; // AbortController of the answer in flight, if any
  const saveMessages = () => store(KEYS.chat, messages);

  // ---- rendering -----------------------------------------------------------------------------

  function renderMessage(msg) {
    const article = document.createElement("article");
    article.className = `msg ${msg.role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = msg.role === "user" ? "You" : "Assistant";
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = msg.content;
    article.append(who, text);
    if (msg.role === "assistant") {
      const meta = document.createElement("div");
      meta.className = "meta";
      article.append(meta);
      renderMeta(article, msg.meta);
    }
    const stick = nearBottom();
    ui.log.append(article);
    ui.empty.hidden = true;
    if (stick) scrollToBottom();
    return article;
  }

  function renderMeta(article, meta = {}) {
    const state = meta.state ?? "done";
    article.dataset.state = state;
    const parts = [];
    if (meta.tokens) parts.push(`${meta.tokens} ${meta.tokens === 1 ? "token" : "tokens"}`);
    if (meta.tps != null) parts.push(`${meta.tps.toFixed(1)} tokens/s`);
    if (meta.ttft != null) parts.push(`first token ${meta.ttft.toFixed(2)} s`);
    if (state === "stopped") parts.push("stopped");
    if (state === "interrupted") parts.push("interrupted");
    if (state === "error") parts.push("failed");
    article.querySelector(".meta").textContent = parts.join(" · ");
  }

  function renderAll() {
    for (const node of ui.log.querySelectorAll(".msg")) node.remove();
    ui.empty.hidden = messages.length > 0;
    for (const msg of messages) renderMessage(msg);
    scrollToBottom();
  }

  const nearBottom = () => ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 48;
  const scrollToBottom = () => { ui.log.scrollTop = ui.log.scrollHeight; };

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.form.setAttribute("aria-busy", String(busy));
  }

  // ---- settings ------------------------------------------------------------------------------

  function loadSettings() {
    const s = load(KEYS.settings, {});
    if (typeof s.temperature === "string") ui.temperature.value = s.temperature;
    if (typeof s.maxTokens === "string") ui.maxTokens.value = s.maxTokens;
    ui.apiKey.value = load(KEYS.apiKey, "");
  }

  function saveSettings() {
    store(KEYS.settings, {
      temperature: ui.temperature.value, maxTokens: ui.maxTokens.value, model: ui.model.value,
    });
  }

  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function requestBody(history) {
    const body = {
      messages: history.map(({ role, content }) => ({ role, content })),
      stream: true,
      stream_options: { include_usage: true },
    };
    if (ui.model.value) body.model = ui.model.value;
    const temperature = Number.parseFloat(ui.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = Math.min(2, Math.max(0, temperature));
    const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  // ---- talking to the server -----------------------------------------------------------------

  // The message of an error response: the API's {"error": {"message"}}, FastAPI's {"detail"}, or text.
  async function errorMessage(resp) {
    let text = "";
    try { text = await resp.text(); } catch { /* body unreadable: status line only */ }
    let message = "";
    try {
      const body = JSON.parse(text);
      if (typeof body?.error?.message === "string") message = body.error.message;
      else if (typeof body?.error === "string") message = body.error;
      else if (typeof body?.detail === "string") message = body.detail;
      else if (Array.isArray(body?.detail)) message = body.detail.map((d) => d?.msg ?? JSON.stringify(d)).join("; ");
    } catch {
      message = text.trim().slice(0, 500);
    }
    return `Error ${resp.status}${message ? `: ${message}` : ` ${resp.statusText}`}`;
  }

  async function loadModels() {
    const wanted = load(KEYS.settings, {}).model;
    try {
      const resp = await fetch("v1/models", { headers: authHeaders() });
      if (!resp.ok) throw new ApiError(await errorMessage(resp), resp.status);
      const body = await resp.json();
      const ids = (Array.isArray(body?.data) ? body.data : []).map((m) => m?.id).filter((id) => typeof id === "string");
      ui.model.replaceChildren(...(ids.length ? ids : [""]).map((id) => new Option(id || "no model", id)));
      if (ids.includes(wanted)) ui.model.value = wanted;
      document.title = ids.length ? `${ui.model.value} · tramontane` : "tramontane chat";
    } catch (err) {
      ui.model.replaceChildren(new Option("unavailable", ""));
      showError(`Could not list the models. ${err.message}`);
      if (err.status === 401) openApiKey();
    }
  }

  function openApiKey() {
    ui.settings.open = true;
    ui.apiKey.focus();
  }

  // Server-sent events: lines "field: value"; a blank line ends an event; ":" starts a comment.
  function sseParser(onData) {
    let buffer = "";
    let data = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) onData(data.join("\n"));
        data = [];
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
    };
    return {
      push(text) {
        buffer += text;
        // A trailing "\r" may be half of "\r\n": keep it until the next piece arrives.
        const lines = buffer.split(/\r\n|\r(?!$)|\n/);
        buffer = lines.pop();
        lines.forEach(line);
      },
      end() {
        if (buffer) line(buffer.replace(/\r$/, ""));
        line("");
        buffer = "";
      },
    };
  }

  // Reads a streamed answer, calling onDelta(text) per content chunk. Returns the usage's
  // completion_tokens when the server sent it (stream_options.include_usage), else null.
  async function readAnswer(resp, onDelta) {
    let usage = null;
    if (!(resp.headers.get("content-type") ?? "").includes("text/event-stream")) {
      // A server that answered in one piece despite stream: true.
      const body = await resp.json();
      const content = body?.choices?.[0]?.message?.content;
      if (typeof content === "string" && content) onDelta(content);
      return body?.usage?.completion_tokens ?? null;
    }
    let done = false;
    const parser = sseParser((data) => {
      if (done) return;
      if (data === "[DONE]") { done = true; return; }
      let chunk;
      try { chunk = JSON.parse(data); } catch { throw new ApiError(`Unreadable event from the server: ${data.slice(0, 200)}`); }
      if (chunk?.error) throw new ApiError(chunk.error.message ?? JSON.stringify(chunk.error));
      const content = chunk?.choices?.[0]?.delta?.content;
      if (typeof content === "string" && content) onDelta(content);
      if (Number.isInteger(chunk?.usage?.completion_tokens)) usage = chunk.usage.completion_tokens;
    });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) { parser.end(); break; }
      parser.push(value);
    }
    if (done) reader.cancel().catch(() => {});
    return usage;
  }

  // Speed: the first token's delay includes reading the prompt, so the rate counts the tokens after
  // the first over the time since the first arrived. Chunks stand in for tokens until the usage comes.
  function answerStats(t) {
    const meta = {};
    const tokens = t.usage ?? t.chunks;
    if (tokens) meta.tokens = tokens;
    if (t.first != null) meta.ttft = (t.first - t.start) / 1000;
    const span = ((t.last ?? 0) - (t.first ?? 0)) / 1000;
    if (tokens > 1 && span > 0) meta.tps = (tokens - 1) / span;
    return meta;
  }

  async function ask(text) {
    hideError();
    const user = { role: "user", content: text };
    messages.push(user);
    const body = requestBody(messages);
    const reply = { role: "assistant", content: "", meta: { state: "streaming" } };
    messages.push(reply);
    saveMessages();
    const userArticle = renderMessage(user);
    const article = renderMessage(reply);
    const textNode = article.querySelector(".text");
    article.setAttribute("aria-busy", "true");

    controller = new AbortController();
    setBusy(true);
    const timing = { start: performance.now(), first: null, last: null, chunks: 0, usage: null };
    let failure = null;
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw new ApiError(await errorMessage(resp), resp.status);
      timing.usage = await readAnswer(resp, (delta) => {
        const now = performance.now();
        timing.first ??= now;
        timing.last = now;
        timing.chunks += 1;
        const stick = nearBottom();
        reply.content += delta;
        textNode.textContent = reply.content;
        reply.meta = { ...answerStats(timing), state: "streaming" };
        renderMeta(article, reply.meta);
        if (stick) scrollToBottom();
        saveMessages();
      });
      reply.meta = { ...answerStats(timing), state: "done" };
    } catch (err) {
      if (err.name === "AbortError") reply.meta = { ...answerStats(timing), state: "stopped" };
      else failure = err;
    } finally {
      controller = null;
      setBusy(false);
      article.removeAttribute("aria-busy");
    }
    if (!messages.includes(reply)) return; // "New chat" was pressed meanwhile
    if (failure) {
      reply.meta = { ...answerStats(timing), state: "error" };
      showError(failure instanceof ApiError ? failure.message : `Could not reach the server: ${failure.message}`);
      if (failure.status === 401) openApiKey();
    }
    if (reply.content === "") {
      // Nothing came back: take the question back into the box so it can be sent again.
      messages.splice(messages.indexOf(user), 2);
      userArticle.remove();
      article.remove();
      ui.empty.hidden = messages.length > 0;
      if (!ui.prompt.value) ui.prompt.value = text;
      autoGrow();
    } else {
      renderMeta(article, reply.meta);
    }
    saveMessages();
    if (!failure || failure.status !== 401) ui.prompt.focus();
  }

  // ---- events --------------------------------------------------------------------------------

  function autoGrow() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight + 2, 192)}px`;
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (controller) return;
    const text = ui.prompt.value;
    if (!text.trim()) return;
    ui.prompt.value = "";
    autoGrow();
    ask(text);
  });

  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.prompt.addEventListener("input", autoGrow);

  ui.stop.addEventListener("click", () => controller?.abort());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && controller) controller.abort();
  });

  ui.newChat.addEventListener("click", () => {
    controller?.abort();
    messages = [];
    saveMessages();
    hideError();
    renderAll();
    ui.prompt.focus();
  });

  for (const input of [ui.temperature, ui.maxTokens]) input.addEventListener("change", saveSettings);
  ui.model.addEventListener("change", () => {
    saveSettings();
    document.title = `${ui.model.value} · tramontane`;
  });
  ui.apiKey.addEventListener("change", () => {
    store(KEYS.apiKey, ui.apiKey.value.trim());
    hideError();
    loadModels();
  });

  loadSettings();
  renderAll();
  loadModels();
})();
