"""Ollama's API on the same port: /api/chat, /api/generate, /api/embed (and the older /api/embeddings),
/api/tags, /api/show, /api/ps, /api/pull and /api/version, so that tools written for Ollama (its
`ollama` Python client, Open WebUI, LangChain's ChatOllama, editor plugins) work unchanged.

Requests are translated to the OpenAI-shaped ones (ollama_requests.py) and answered in Ollama's shape
(ollama_format.py); errors are `{"error": "..."}` (errors.py, for every path under /api/).

Model names: the served model answers to its name and to `NAME:latest` (Ollama names carry a tag),
as do the LoRA adapters loaded with --lora. /api/tags lists those and the models in the store
(`tramontane list`); a request for a stored model this server does not serve gets a 404 that says
how to serve it. /api/pull downloads into the store from the Hugging Face Hub, with Ollama's own
syntax for it: `hf.co/ORG/REPO:QUANT` (the repository's GGUF file of that type) or `ORG/REPO`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..engine.types import Engine
from ..errors import TemplateError, TramontaneError
from ..hub import store
from ..hub.describe import Summary, summarize
from ..hub.modelfile import ModelSettings
from ..text.tokenizer import Tokenizer
from .common import engine_for, new_id, parse_body, served_adapters, server_state
from .errors import APIError, bad_request
from .formats import ChatFormat
from .ollama_format import OllamaFormat, created_at, json_line
from .ollama_requests import (
    OLLAMA_DEFAULTS,
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaModelRequest,
    chat_messages,
    check_think,
    response_format,
    sampling,
)
from .protocol import ChatCompletionRequest, SamplingFields
from .requests import (
    MAX_REQUEST_TOKENS,
    MAX_TOP_LOGPROBS,
    check_context,
    check_ids,
    encode_chat,
    encode_fim,
    encode_inputs,
    encode_text,
    settings,
)
from .routes_generate import default_max_tokens, plan_chat, respond
from .streaming import ClientGone, EventStream, engine_error, until_disconnect

router = APIRouter(prefix="/api")

OLLAMA_VERSION = "0.13.0"  # the Ollama release whose API these routes follow
MAX_TEMPLATE_CHARS = 64 << 10  # a request's Go template
NEVER = "9999-12-31T23:59:59Z"  # /api/ps: a served model is never unloaded


# ---- names ---------------------------------------------------------------------------------------------


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def resolve(request: Request, name: str) -> tuple[Engine, str | None]:
    """The engine and the adapter (None: the base model) an Ollama model name asks for."""
    engine = engine_for(request, None)
    served = server_state(request).model_name
    for candidate in (name, name.removesuffix(":latest")):
        if candidate == served:
            return engine, None
        if candidate in engine.adapters:
            return engine, candidate
    hint = f"; this server serves {_tagged(served)!r}"
    stored = store.find(name.removesuffix(":latest"))
    if stored is not None:
        hint += f", and {name!r} is in the store: start `tramontane serve {stored.name}` to use it"
    raise APIError(404, f'model "{name[:100]}" not found, try pulling it first{hint}', param="model")


def _defaults(request: Request) -> dict[str, Any]:
    return {**OLLAMA_DEFAULTS, **server_state(request).settings.parameters}


def _logprob_count(logprobs: bool, top: int | None) -> int | None:
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
    return (top or 0) if logprobs else None


def _loaded(model: str, chat: bool, keep_alive: float | str | None) -> dict[str, Any]:
    """Ollama's answer to a request without a prompt: it loads (or, with keep_alive 0, unloads) the model."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    body: dict[str, Any] = {"model": model, "created_at": created_at()}
    body |= {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return body | {"done": True, "done_reason": reason}


# ---- generating ----------------------------------------------------------------------------------------


@router.post("/chat")
async def chat(request: Request) -> Response:
    body = await parse_body(request, OllamaChatRequest)
    _, adapter = resolve(request, body.model)
    check_think(body.think, body.model)
    if not body.messages:
        return JSONResponse(_loaded(body.model, True, body.keep_alive))
    oai = ChatCompletionRequest.model_validate(
        {
            "model": adapter,
            "messages": chat_messages(body.messages),
            "stream": body.stream,
            "tools": body.tools or None,
            "response_format": response_format(body.format),
            "logprobs": body.logprobs,
            "top_logprobs": body.top_logprobs,
            **sampling(body.options, _defaults(request)),
        }
    )
    plan = await plan_chat(request, oai)
    fmt = OllamaFormat(plan.format, body.model)
    return await respond(request, plan.engine, plan.body, [plan.ids], plan.settings, fmt)


async def _generate_prompt(request: Request, engine: Engine, body: OllamaGenerateRequest) -> list[int]:
    """The prompt's token ids: after `context` (an earlier answer's), the prompt in the chat template
    (with `system`, or the model's), as is (`raw`), or as fill-in-the-middle (`suffix`)."""
    template = body.template if body.template and not body.raw and not body.suffix else None  # "" is the model's
    tokenizer, limit = _templated(engine.tokenizer, template), engine.max_model_len
    prompt = body.prompt or ""
    context = check_ids(body.context or [], engine.config.vocab_size, "context")
    if body.suffix:
        ids = await encode_fim(tokenizer, prompt, body.suffix, body.model, limit=limit)
    elif body.raw:
        ids = await encode_text(tokenizer, prompt, "prompt", limit=limit)
    else:
        system = body.system if body.system is not None else server_state(request).settings.system
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = await encode_chat(tokenizer, messages, limit=limit)
    if context and ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]  # the context begins with its own
    return context + ids


def _templated(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    """The tokenizer formatting the prompt with a request's `template` (a Go template), if it has one."""
    if template is None:
        return tokenizer
    with_go_template = getattr(tokenizer, "with_go_template", None)
    if with_go_template is None:
        raise bad_request(f"this model formats chats with {tokenizer.chat_format}, not a Go template", "template")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise bad_request(f"template is longer than {MAX_TEMPLATE_CHARS} characters", "template")
    try:
        return with_go_template(template)
    except TemplateError as exc:
        raise bad_request(str(exc), "template") from None


@router.post("/generate")
async def generate(request: Request) -> Response:
    body = await parse_body(request, OllamaGenerateRequest)
    engine, adapter = resolve(request, body.model)
    check_think(body.think, body.model)
    if body.images:
        raise bad_request("this model reads text only: the request cannot hold images", "images")
    if not body.prompt and not body.context and not body.suffix:
        return JSONResponse(_loaded(body.model, False, body.keep_alive))
    fields = SamplingFields.model_validate(
        {
            "model": adapter,
            "stream": body.stream,
            "response_format": response_format(body.format),
            **sampling(body.options, _defaults(request)),
        }
    )
    s = settings(
        fields,
        logprobs=_logprob_count(body.logprobs, body.top_logprobs),
        tokenizer=engine.tokenizer,
        default_max_tokens=default_max_tokens(request),
    )
    ids = await _generate_prompt(request, engine, body)
    check_context(len(ids), s.max_tokens, engine.max_model_len, "prompt")
    inner = ChatFormat(new_id("gen"), body.model, 1, s.params.logprobs is not None)
    fmt = OllamaFormat(inner, body.model, generate=True, prompt_ids=ids)
    return await respond(request, engine, fields, [ids], s, fmt)


# ---- embeddings ----------------------------------------------------------------------------------------


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values, normalised again (Ollama's `dimensions`)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


async def _embed(request: Request, engine: Engine, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
    inputs = await encode_inputs(engine.tokenizer, texts, engine.config.vocab_size, "input", limit=MAX_REQUEST_TOKENS)
    limit = engine.max_model_len
    for i, ids in enumerate(inputs):
        if len(ids) > limit and not truncate:
            raise bad_request(
                f"input {i} has {len(ids)} tokens, more than the context length of {limit} (truncate: true cuts it)",
                "input",
            )
    inputs = [ids[:limit] for ids in inputs]
    try:
        vectors = await until_disconnect(request, engine.embed(inputs))
    except ClientGone:
        return [], 0
    except Exception as exc:  # the engine's refusals (draining...) and failures
        raise engine_error(exc) from exc
    return vectors, sum(len(ids) for ids in inputs)


@router.post("/embed")
async def embed(request: Request) -> Response:
    body = await parse_body(request, OllamaEmbedRequest)
    started = time.monotonic_ns()
    engine, _ = resolve(request, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.dimensions is not None and body.dimensions < 1:
        raise bad_request(f"dimensions must be at least 1, got {body.dimensions}", "dimensions")
    vectors, count = await _embed(request, engine, texts, body.truncate) if texts else ([], 0)
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": [_shorten(v, body.dimensions) for v in vectors],
            "total_duration": time.monotonic_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": count,
        }
    )


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    body = await parse_body(request, OllamaEmbeddingsRequest)
    engine, _ = resolve(request, body.model)
    if not body.prompt:
        return JSONResponse({"embedding": []})
    vectors, _ = await _embed(request, engine, [body.prompt], True)
    return JSONResponse({"embedding": vectors[0] if vectors else []})


# ---- models --------------------------------------------------------------------------------------------

_SUMMARIES: dict[tuple[str, int, float], Summary] = {}


def _summary(path: Path) -> Summary | None:
    """The model's summary, read once per file version; None when it no longer loads."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime)
        if key not in _SUMMARIES:
            _SUMMARIES[key] = summarize(path)
        return _SUMMARIES[key]
    except (OSError, TramontaneError):
        return None


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if n < 10 * scale else 0}f}{unit}"
    return str(n)


def _details(summary: Summary | None, parent: str = "") -> dict[str, Any]:
    if summary is None:
        return {"parent_model": parent, "format": "", "family": "", "families": None}
    return {
        "parent_model": parent,
        "format": summary.format,
        "family": summary.family,
        "families": [summary.family],
        "parameter_size": _human_count(summary.parameters),
        "quantization_level": summary.quantization,
    }


def _entry(name: str, summary: Summary | None, parent: str = "") -> dict[str, Any]:
    size = summary.size if summary else 0
    modified = datetime.fromtimestamp(summary.modified if summary else 0, UTC)
    digest = hashlib.sha256(f"{name}:{size}:{modified.timestamp()}".encode()).hexdigest()
    return {
        "name": _tagged(name),
        "model": _tagged(name),
        "modified_at": modified.isoformat().replace("+00:00", "Z"),
        "size": size,
        "digest": digest,
        "details": _details(summary, parent),
    }


def _served(request: Request) -> list[dict[str, Any]]:
    """The served model and its adapters."""
    state = server_state(request)
    engine = engine_for(request, None)
    summary = _summary(state.model_path) if state.model_path else None
    base = _entry(state.model_name, summary)
    return [base] + [_entry(a, summary, parent=base["name"]) for a in served_adapters(state, engine)]


@router.get("/tags")
async def tags(request: Request) -> JSONResponse:
    served = await asyncio.to_thread(_served, request)
    names = {m["name"] for m in served}
    stored = [
        _entry(m.name, await asyncio.to_thread(_summary, m.path))
        for m in await asyncio.to_thread(store.list_models)
        if _tagged(m.name) not in names
    ]
    return JSONResponse({"models": served + stored})


@router.get("/ps")
async def ps(request: Request) -> JSONResponse:
    engine = engine_for(request, None)
    running = await asyncio.to_thread(_served, request)
    for m in running:
        m |= {"expires_at": NEVER, "size_vram": 0, "context_length": engine.max_model_len}
    return JSONResponse({"models": running})


def _model_info(summary: Summary | None, engine: Engine) -> dict[str, Any]:
    info: dict[str, Any] = {"general.architecture": "llama", "llama.context_length": engine.max_model_len}
    if summary is None:
        return info
    c = summary.config
    return info | {
        "general.architecture": summary.family,
        "general.parameter_count": summary.parameters,
        f"{summary.family}.context_length": engine.max_model_len,
        f"{summary.family}.embedding_length": c.dim,
        f"{summary.family}.block_count": c.n_layers,
        f"{summary.family}.feed_forward_length": c.hidden_dim,
        f"{summary.family}.attention.head_count": c.n_heads,
        f"{summary.family}.attention.head_count_kv": c.n_kv_heads,
        f"{summary.family}.rope.freq_base": c.rope_theta,
        f"{summary.family}.vocab_size": c.vocab_size,
    }


def _capabilities(engine: Engine) -> list[str]:
    found = ["completion"]
    if hasattr(engine.tokenizer, "guidance_tokenizer"):
        found.append("tools")
    if getattr(engine.tokenizer, "supports_fim", False):
        found.append("insert")
    return found


def _modelfile(source: str, adapter: str | None, settings: ModelSettings) -> str:
    """The served model as a Modelfile, as `ollama show --modelfile` prints one."""
    lines = [f"FROM {source}"] + ([f"ADAPTER {adapter}"] if adapter else [])
    for key, value in settings.parameters.items():
        lines += [f"PARAMETER {key} {json.dumps(v)}" for v in value] if key == "stop" else [f"PARAMETER {key} {value}"]
    for key in ("template", "system", "license"):
        if getattr(settings, key) is not None:
            lines.append(f'{key.upper()} """{getattr(settings, key)}"""')
    lines += [f"MESSAGE {m['role']} {json.dumps(m['content'])}" for m in settings.messages]
    return "\n".join(lines) + "\n"


@router.post("/show")
async def show(request: Request) -> JSONResponse:
    body = await parse_body(request, OllamaModelRequest)
    name = body.model_name()
    engine, adapter = resolve(request, name)
    state = server_state(request)
    summary = await asyncio.to_thread(_summary, state.model_path) if state.model_path else None
    settings = state.settings
    template = settings.template or getattr(engine.tokenizer, "chat_template", None) or ""
    modified = datetime.fromtimestamp(summary.modified if summary else state.created, UTC)
    parameters = _modelfile("", None, ModelSettings(parameters=settings.parameters)).splitlines()[1:]
    return JSONResponse(
        {
            "modelfile": f"# Modelfile of {_tagged(name)}, served by tramontane\n"
            + _modelfile(str(state.model_path or state.model_name), adapter, settings),
            "parameters": "\n".join(line.removeprefix("PARAMETER ") for line in parameters),
            "template": template,
            "system": settings.system or "",
            "license": settings.license or "",
            "details": _details(summary, _tagged(state.model_name) if adapter else ""),
            "model_info": _model_info(summary, engine),
            "capabilities": _capabilities(engine),
            "modified_at": modified.isoformat().replace("+00:00", "Z"),
        }
    )


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_VERSION})


# ---- pull ----------------------------------------------------------------------------------------------


def _hub_name(name: str) -> tuple[str, str]:
    """(repository, quant tag or "") of `hf.co/ORG/REPO[:QUANT]` (or huggingface.co/...) or `ORG/REPO`."""
    bare = name
    for prefix in ("https://", "hf.co/", "huggingface.co/"):
        bare = bare.removeprefix(prefix)
    repo, _, tag = bare.partition(":")
    if repo.count("/") != 1 or not all(store.NAME.fullmatch(part) for part in repo.split("/")):
        raise bad_request(
            f"{name[:100]!r} is not a Hugging Face repository: tramontane pulls from the Hugging Face Hub, "
            "named as hf.co/ORG/REPO:QUANT (the repository's GGUF file of that type) or ORG/REPO",
            "model",
        )
    return repo, "" if tag == "latest" else tag


def _pull(repo: str, tag: str) -> store.StoredModel:
    if tag:
        return store.pull_hub(repo, gguf_tag=tag, name=f"{repo.rsplit('/', 1)[1]}-{tag}")
    return store.pull_hub(repo)


@router.post("/pull")
async def pull(request: Request) -> Response:
    """Runs to its end even when the client goes away (a pull resumes, and the next one finds it done)."""
    body = await parse_body(request, OllamaModelRequest)
    repo, tag = _hub_name(body.model_name())
    work = asyncio.ensure_future(asyncio.to_thread(_pull, repo, tag))

    async def lines() -> AsyncIterator[str]:
        yield json_line({"status": "pulling manifest"})
        try:
            stored = await asyncio.shield(work)
        except TramontaneError as exc:
            yield json_line({"error": str(exc)})
            return
        yield json_line({"status": f"stored as {stored.name}"})
        yield json_line({"status": "success"})

    if body.stream:
        return EventStream(lines(), media_type="application/x-ndjson")
    try:
        await work
    except TramontaneError as exc:
        raise APIError(500, str(exc), param="model") from None
    return JSONResponse({"status": "success"})
