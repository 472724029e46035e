// The chat page of `tramontane serve`: streams answers from the server's OpenAI-compatible API.
//
// Routes used, relative to the page: GET v1/models, POST v1/chat/completions with stream: true
// (server-sent events `data: {chunk}` ending with `data: [DONE]`). Answers are shown as markdown by
// render.js (sanitised; see there); everything else the model or a saved file sends is set with
// textContent. Conversations and settings live in localStorage (this browser keeps them); the API key
// in sessionStorage (gone when the tab is closed).
"use strict";

(() => {
  const KEYS = {
    conversations: "tramontane.conversations.v1",
    settings: "tramontane.settings.v2",
    theme: "tramontane.theme",
    apiKey: "tramontane.apiKey",
  };
  // Sampling fields: element id -> [request field, parse]. Empty fields are left to the server.
  const SAMPLING = {
    "top-p": ["top_p", Number.parseFloat],
    "top-k": ["top_k", (v) => Number.parseInt(v, 10)],
    "min-p": ["min_p", Number.parseFloat],
    "presence-penalty": ["presence_penalty", Number.parseFloat],
    "frequency-penalty": ["frequency_penalty", Number.parseFloat],
    "repetition-penalty": ["repetition_penalty", Number.parseFloat],
    seed: ["seed", (v) => Number.parseInt(v, 10)],
  };
  const SETTINGS = ["temperature", "max-tokens", "system", ...Object.keys(SAMPLING)];

  const $ = (id) => document.getElementById(id);
  const ui = {
    log: $("log"), empty: $("empty"), error: $("error"), form: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), newChat: $("new-chat"), model: $("model"), settings: $("settings"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"), theme: $("theme"),
    list: $("conversation-list"), exportJson: $("export-json"), exportMd: $("export-md"),
  };

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }

  // ---- storage -------------------------------------------------------------------------------

  function load(key, fallback, storage = localStorage) {
    try {
      const value = JSON.parse(storage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  }

  function store(key, value, storage = localStorage) {
    try {
      storage.setItem(key, JSON.stringify(value));
    } catch {
      // Storage full or disabled: the chat still works, it just won't survive a reload.
    }
  }

  const isText = (v) => typeof v === "string";

  // A saved message is trusted only as far as its shape: a role, string contents, plain meta numbers.
  function cleanMessage(m) {
    if (!m || (m.role !== "user" && m.role !== "assistant") || !isText(m.content)) return null;
    const out = { role: m.role, content: m.content };
    if (m.role === "assistant") {
      if (isText(m.reasoning) && m.reasoning) out.reasoning = m.reasoning;
      if (Array.isArray(m.toolCalls)) {
        out.toolCalls = m.toolCalls.filter((c) => c && isText(c.name) && isText(c.arguments))
          .map(({ name, arguments: args }) => ({ name, arguments: args }));
      }
      const meta = m.meta && typeof m.meta === "object" ? m.meta : {};
      out.meta = {};
      for (const k of ["tokens", "tps", "ttft"]) if (Number.isFinite(meta[k])) out.meta[k] = meta[k];
      // An answer that was streaming when the page went away is kept as far as it got.
      out.meta.state = meta.state === "streaming" ? "interrupted"
        : ["done", "stopped", "interrupted", "error", "length"].includes(meta.state) ? meta.state : "done";
    }
    return out;
  }

  function cleanConversation(c) {
    if (!c || !isText(c.id) || !Array.isArray(c.messages)) return null;
    const messages = c.messages.map(cleanMessage).filter(Boolean);
    // Keep turns alternating (chat templates require it): drop an unanswered tail.
    while (messages.length && (messages.at(-1).role === "user" || (messages.at(-1).content === ""
      && !messages.at(-1).toolCalls?.length))) messages.pop();
    const now = Date.now();
    return {
      id: c.id, title: isText(c.title) ? c.title.slice(0, 200) : "", messages,
      created: Number.isFinite(c.created) ? c.created : now, updated: Number.isFinite(c.updated) ? c.updated : now,
    };
  }

  const newId = () => `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  const saved = load(KEYS.conversations, {});
  let conversations = (Array.isArray(saved.list) ? saved.list : []).map(cleanConversation).filter(Boolean);
  let current = conversations.find((c) => c.id === saved.current) ?? null;
  let messages = current ? current.messages : [];
  let controller = null; // AbortController of the answer in flight, if any

  function titleOf(conversation) {
    if (conversation.title) return conversation.title;
    const first = conversation.messages.find((m) => m.role === "user")?.content ?? "";
    return first.replace(/\s+/g, " ").trim().slice(0, 60) || "New conversation";
  }

  function saveConversations() {
    if (current) current.messages = messages;
    // An empty conversation is not worth a row.
    conversations = conversations.filter((c) => c.messages.length || c === current);
    store(KEYS.conversations, {
      current: current?.id ?? null,
      list: conversations.filter((c) => c.messages.length),
    });
  }

  // The conversation new messages go to, made when the first one is sent.
  function ensureConversation() {
    if (!current) {
      current = { id: newId(), title: "", messages, created: Date.now(), updated: Date.now() };
      conversations.unshift(current);
    }
  }

  // ---- rendering -----------------------------------------------------------------------------

  function button(label, onClick, className = "secondary small") {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }

  function renderMessage(msg) {
    const article = document.createElement("article");
    article.className = `msg ${msg.role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = msg.role === "user" ? "You" : "Assistant";
    const text = document.createElement("div");
    text.className = msg.role === "user" ? "text" : "text markdown";
    article.append(who);
    if (msg.role === "assistant") {
      const reasoning = document.createElement("details");
      reasoning.className = "reasoning";
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      const body = document.createElement("div");
      body.className = "reasoning-text";
      reasoning.append(summary, body);
      const calls = document.createElement("div");
      calls.className = "tool-calls";
      const meta = document.createElement("div");
      meta.className = "meta";
      article.append(reasoning, text, calls, meta);
    } else {
      article.append(text);
    }
    const actions = document.createElement("div");
    actions.className = "msg-actions";
    article.append(actions);
    article.message = msg;
    paint(article);
    const stick = nearBottom();
    ui.log.append(article);
    ui.empty.hidden = true;
    if (stick) scrollToBottom();
    return article;
  }

  // The message's text, reasoning, tool calls and meta into its article.
  function paint(article) {
    const msg = article.message;
    const text = article.querySelector(".text");
    if (msg.role === "user") {
      text.textContent = msg.content;
      return;
    }
    const { reasoning, answer } = splitThinking(msg);
    const box = article.querySelector(".reasoning");
    box.hidden = !reasoning;
    box.querySelector(".reasoning-text").textContent = reasoning;
    window.markdown.render(text, answer);
    const calls = article.querySelector(".tool-calls");
    calls.replaceChildren(...(msg.toolCalls ?? []).map((call) => {
      const d = document.createElement("details");
      d.className = "tool-call";
      const s = document.createElement("summary");
      s.textContent = `Tool call: ${call.name}`;
      const pre = document.createElement("pre");
      pre.textContent = prettyJson(call.arguments);
      d.append(s, pre);
      return d;
    }));
    renderMeta(article, msg.meta);
  }

  // Reasoning comes as its own field (reasoning_content) or at the start of the text, in <think> tags.
  function splitThinking(msg) {
    let reasoning = msg.reasoning ?? "";
    let answer = msg.content;
    const m = /^\s*<think>([\s\S]*?)(?:<\/think>\s*|$)/.exec(answer);
    if (m) {
      reasoning = [reasoning, m[1].trim()].filter(Boolean).join("\n\n");
      answer = answer.slice(m[0].length);
    }
    return { reasoning, answer };
  }

  function prettyJson(text) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
  }

  // Repaints are at most one per frame while an answer streams.
  const pending = new Set();
  function schedulePaint(article) {
    if (!pending.size) requestAnimationFrame(() => { for (const a of pending) paint(a); pending.clear(); });
    pending.add(article);
  }

  function renderMeta(article, meta = {}) {
    const state = meta.state ?? "done";
    article.dataset.state = state;
    const parts = [];
    if (meta.tokens) parts.push(`${meta.tokens} ${meta.tokens === 1 ? "token" : "tokens"}`);
    if (meta.tps != null) parts.push(`${meta.tps.toFixed(1)} tokens/s`);
    if (meta.ttft != null) parts.push(`first token ${meta.ttft.toFixed(2)} s`);
    if (state === "stopped") parts.push("stopped");
    if (state === "length") parts.push("stopped at the token limit");
    if (state === "interrupted") parts.push("interrupted");
    if (state === "error") parts.push("failed");
    article.querySelector(".meta").textContent = parts.join(" · ");
  }

  // Edit on questions; copy on answers; regenerate and continue on the last answer.
  function refreshActions() {
    const articles = [...ui.log.querySelectorAll(".msg")];
    articles.forEach((article, i) => {
      const msg = article.message;
      const row = article.querySelector(".msg-actions");
      const last = i === articles.length - 1;
      const items = [];
      if (msg.role === "user") items.push(button("Edit", () => startEdit(article)));
      if (msg.role === "assistant") {
        items.push(button("Copy", (e) => copyAnswer(msg, e.currentTarget)));
        if (last) {
          items.push(button("Regenerate", () => regenerate()));
          items.push(button("Continue", () => continueAnswer()));
        }
      }
      for (const b of items) b.disabled = Boolean(controller);
      row.replaceChildren(...items);
    });
  }

  function renderAll() {
    for (const node of ui.log.querySelectorAll(".msg")) node.remove();
    ui.empty.hidden = messages.length > 0;
    for (const msg of messages) renderMessage(msg);
    refreshActions();
    renderList();
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
    refreshActions();
  }

  // ---- the conversation list -----------------------------------------------------------------

  function renderList() {
    const items = conversations.filter((c) => c.messages.length)
      .sort((a, b) => b.updated - a.updated)
      .map((c) => {
        const li = document.createElement("li");
        li.className = c === current ? "current" : "";
        li.dataset.id = c.id;
        const open = button(titleOf(c), () => openConversation(c), "link title");
        if (c === current) open.setAttribute("aria-current", "true");
        li.append(open, button("Rename", () => startRename(li, c)), button("Delete", () => deleteConversation(c)));
        return li;
      });
    ui.list.replaceChildren(...items);
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "none";
      li.textContent = "No saved conversations yet.";
      ui.list.append(li);
    }
  }

  function openConversation(c) {
    controller?.abort();
    saveConversations();
    current = c;
    messages = c.messages;
    hideError();
    saveConversations();
    renderAll();
  }

  function startRename(li, c) {
    const input = document.createElement("input");
    input.type = "text";
    input.value = titleOf(c);
    input.setAttribute("aria-label", "Conversation name");
    const done = (keep) => {
      if (keep && input.value.trim()) c.title = input.value.trim().slice(0, 200);
      saveConversations();
      renderList();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { e.preventDefault(); done(true); }
      if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); done(false); }
    });
    input.addEventListener("blur", () => done(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  function deleteConversation(c) {
    if (!window.confirm(`Delete "${titleOf(c)}"?`)) return;
    if (c === current) {
      controller?.abort();
      current = null;
      messages = [];
    }
    conversations = conversations.filter((x) => x !== c);
    saveConversations();
    renderAll();
  }

  // ---- export --------------------------------------------------------------------------------

  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  const fileName = (c, ext) => `${titleOf(c).replace(/[^\w.-]+/g, "-").replace(/^-|-$/g, "").slice(0, 60) || "chat"}.${ext}`;

  function exportJson() {
    if (!current?.messages.length) return showError("Nothing to export: this conversation is empty.");
    const system = $("system").value;
    const out = {
      title: titleOf(current), model: ui.model.value, created: new Date(current.created).toISOString(),
      messages: [...(system.trim() ? [{ role: "system", content: system }] : []),
        ...current.messages.map(({ role, content, reasoning, toolCalls }) => ({ role, content, reasoning, toolCalls }))],
    };
    download(fileName(current, "json"), "application/json", `${JSON.stringify(out, null, 2)}\n`);
  }

  function exportMarkdown() {
    if (!current?.messages.length) return showError("Nothing to export: this conversation is empty.");
    const lines = [`# ${titleOf(current)}`, ""];
    if (ui.model.value) lines.push(`Model: ${ui.model.value}`, "");
    const system = $("system").value.trim();
    if (system) lines.push("## System", "", system, "");
    for (const m of current.messages) lines.push(m.role === "user" ? "## You" : "## Assistant", "", m.content, "");
    download(fileName(current, "md"), "text/markdown", lines.join("\n"));
  }

  // ---- settings ------------------------------------------------------------------------------

  function loadSettings() {
    const s = load(KEYS.settings, {});
    for (const id of SETTINGS) if (isText(s[id])) $(id).value = s[id];
    ui.apiKey.value = load(KEYS.apiKey, "", sessionStorage);
  }

  function saveSettings() {
    const s = { model: ui.model.value };
    for (const id of SETTINGS) s[id] = $(id).value;
    store(KEYS.settings, s);
  }

  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function requestBody(history, continuing) {
    const system = $("system").value;
    const body = {
      messages: [
        ...(system.trim() ? [{ role: "system", content: system }] : []),
        ...history.map(({ role, content }) => ({ role, content })),
      ],
      stream: true,
      stream_options: { include_usage: true },
    };
    if (continuing) body.messages.at(-1).prefix = true;
    if (ui.model.value) body.model = ui.model.value;
    const temperature = Number.parseFloat(ui.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = Math.min(2, Math.max(0, temperature));
    const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    for (const [id, [field, parse]] of Object.entries(SAMPLING)) {
      const value = parse($(id).value);
      if ($(id).value.trim() !== "" && Number.isFinite(value)) body[field] = value;
    }
    return body;
  }

  // ---- theme ---------------------------------------------------------------------------------

  const THEMES = ["auto", "light", "dark"];
  function applyTheme(theme) {
    if (theme === "auto") delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = theme;
    ui.theme.textContent = `Theme: ${theme}`;
  }

  // ---- talking to the server -----------------------------------------------------------------

  // The message of an error response: the API's {"error": {"message"}}, FastAPI's {"detail"}, or text.
  async function errorMessage(resp) {
    let text = "";
    try { text = await resp.text(); } catch { /* body unreadable: status line only */ }
    let message = "";
    try {
      const body = JSON.parse(text);
      if (isText(body?.error?.message)) message = body.error.message;
      else if (isText(body?.error)) message = body.error;
      else if (isText(body?.detail)) message = body.detail;
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
      const ids = (Array.isArray(body?.data) ? body.data : []).map((m) => m?.id).filter(isText);
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

  // One choice's delta (or whole message) into the reply: content, reasoning, tool-call pieces.
  function absorb(reply, part, finish) {
    if (isText(part?.content) && part.content) reply.content += part.content;
    const thought = part?.reasoning_content ?? part?.reasoning;
    if (isText(thought) && thought) reply.reasoning = (reply.reasoning ?? "") + thought;
    for (const call of Array.isArray(part?.tool_calls) ? part.tool_calls : []) {
      reply.toolCalls ??= [];
      const index = Number.isInteger(call?.index) ? call.index : reply.toolCalls.length;
      const slot = (reply.toolCalls[index] ??= { name: "", arguments: "" });
      if (isText(call?.function?.name)) slot.name += call.function.name;
      if (isText(call?.function?.arguments)) slot.arguments += call.function.arguments;
    }
    if (finish === "length") reply.finish = "length";
  }

  // Reads a streamed answer into `reply`, calling onDelta() after each chunk. Returns the usage's
  // completion_tokens when the server sent it (stream_options.include_usage), else null.
  async function readAnswer(resp, reply, onDelta) {
    let usage = null;
    if (!(resp.headers.get("content-type") ?? "").includes("text/event-stream")) {
      // A server that answered in one piece despite stream: true.
      const body = await resp.json();
      absorb(reply, body?.choices?.[0]?.message, body?.choices?.[0]?.finish_reason);
      onDelta();
      return body?.usage?.completion_tokens ?? null;
    }
    let done = false;
    const parser = sseParser((data) => {
      if (done) return;
      if (data === "[DONE]") { done = true; return; }
      let chunk;
      try { chunk = JSON.parse(data); } catch { throw new ApiError(`Unreadable event from the server: ${data.slice(0, 200)}`); }
      if (chunk?.error) throw new ApiError(chunk.error.message ?? JSON.stringify(chunk.error));
      const choice = chunk?.choices?.[0];
      if (choice) {
        absorb(reply, choice.delta, choice.finish_reason);
        if (choice.delta?.content || choice.delta?.reasoning_content || choice.delta?.tool_calls) onDelta();
      }
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
    ensureConversation();
    const user = { role: "user", content: text };
    messages.push(user);
    const userArticle = renderMessage(user);
    const ok = await generate(null);
    if (!ok && messages.at(-1) === user) {
      // Nothing came back: take the question back into the box so it can be sent again.
      messages.pop();
      userArticle.remove();
      ui.empty.hidden = messages.length > 0;
      if (!ui.prompt.value) ui.prompt.value = text;
      autoGrow();
      saveConversations();
      refreshActions();
      renderList();
    }
  }

  // Streams an answer to `messages`: a new reply, or more of `continued` (the last answer, sent back
  // with prefix: true so the model goes on with it). False when nothing came back.
  async function generate(continued) {
    const body = requestBody(messages, Boolean(continued));
    const reply = continued ?? { role: "assistant", content: "", meta: { state: "streaming" } };
    const before = { content: reply.content, reasoning: reply.reasoning, toolCalls: reply.toolCalls };
    if (!continued) messages.push(reply);
    current.updated = Date.now(); // the list shows the conversations last talked in first
    reply.meta = { ...(continued ? {} : reply.meta), state: "streaming" };
    delete reply.finish;
    saveConversations();
    renderList();
    const article = continued ? [...ui.log.querySelectorAll(".msg")].find((a) => a.message === reply) : renderMessage(reply);
    article.setAttribute("aria-busy", "true");
    paint(article);

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
      timing.usage = await readAnswer(resp, reply, () => {
        const now = performance.now();
        timing.first ??= now;
        timing.last = now;
        timing.chunks += 1;
        const stick = nearBottom();
        reply.meta = { ...answerStats(timing), state: "streaming" };
        schedulePaint(article);
        if (stick) requestAnimationFrame(scrollToBottom);
        saveConversations();
      });
      reply.meta = { ...answerStats(timing), state: reply.finish === "length" ? "length" : "done" };
    } catch (err) {
      if (err.name === "AbortError") reply.meta = { ...answerStats(timing), state: "stopped" };
      else failure = err;
    } finally {
      controller = null;
      article.removeAttribute("aria-busy");
    }
    if (!messages.includes(reply)) { setBusy(false); return true; } // another conversation meanwhile
    if (failure) {
      reply.meta = { ...answerStats(timing), state: "error" };
      showError(failure instanceof ApiError ? failure.message : `Could not reach the server: ${failure.message}`);
      if (failure.status === 401) openApiKey();
    }
    const nothing = reply.content === before.content && reply.reasoning === before.reasoning
      && (reply.toolCalls?.length ?? 0) === (before.toolCalls?.length ?? 0);
    if (nothing && !continued) {
      messages.splice(messages.indexOf(reply), 1);
      article.remove();
    } else {
      if (nothing) reply.meta = { ...reply.meta, state: failure ? "error" : "done" };
      paint(article);
    }
    saveConversations();
    setBusy(false);
    if (!failure || failure.status !== 401) ui.prompt.focus();
    return !nothing;
  }

  function regenerate() {
    if (controller || messages.at(-1)?.role !== "assistant") return;
    hideError();
    messages.pop();
    ui.log.querySelector(".msg:last-of-type")?.remove();
    generate(null);
  }

  function continueAnswer() {
    if (controller || messages.at(-1)?.role !== "assistant") return;
    hideError();
    generate(messages.at(-1));
  }

  // A question edited in place: what followed it goes, and the new text is asked.
  function startEdit(article) {
    if (controller) return;
    const msg = article.message;
    const text = article.querySelector(".text");
    const area = document.createElement("textarea");
    area.className = "edit";
    area.value = msg.content;
    area.rows = Math.min(12, msg.content.split("\n").length + 1);
    area.setAttribute("aria-label", "Edit the message");
    const row = article.querySelector(".msg-actions");
    const save = button("Send", () => {
      const value = area.value;
      if (!value.trim() || controller) return; // an answer streams meanwhile: wait for it, or stop it
      const index = messages.indexOf(msg);
      messages.splice(index);
      const articles = [...ui.log.querySelectorAll(".msg")];
      for (const a of articles.slice(articles.indexOf(article))) a.remove();
      ask(value);
    }, "small");
    const cancel = button("Cancel", () => { area.replaceWith(text); refreshActions(); });
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save.click(); }
      if (e.key === "Escape") { e.preventDefault(); cancel.click(); }
    });
    text.replaceWith(area);
    row.replaceChildren(save, cancel);
    area.focus();
  }

  function copyAnswer(msg, b) {
    const done = (label) => { b.textContent = label; setTimeout(() => { b.textContent = "Copy"; }, 1500); };
    window.markdown.copyText(msg.content).then(() => done("Copied"), () => done("Copy failed"));
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
    saveConversations();
    current = null;
    messages = [];
    saveConversations();
    hideError();
    renderAll();
    ui.prompt.focus();
  });

  ui.exportJson.addEventListener("click", exportJson);
  ui.exportMd.addEventListener("click", exportMarkdown);
  ui.theme.addEventListener("click", () => {
    const next = THEMES[(THEMES.indexOf(load(KEYS.theme, "auto")) + 1) % THEMES.length];
    store(KEYS.theme, next);
    applyTheme(next);
  });

  for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
  ui.model.addEventListener("change", () => {
    saveSettings();
    document.title = `${ui.model.value} · tramontane`;
  });
  ui.apiKey.addEventListener("change", () => {
    store(KEYS.apiKey, ui.apiKey.value.trim(), sessionStorage);
    hideError();
    loadModels();
  });

  applyTheme(THEMES.includes(load(KEYS.theme, "auto")) ? load(KEYS.theme, "auto") : "auto");
  loadSettings();
  renderAll();
  loadModels();
})();
