"""The generating routes: POST /v1/chat/completions, /v1/completions and /v1/fim/completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..engine.types import Engine, EngineRequest
from ..hub.modelfile import sampling_fields
from .common import adapter_for, engine_for, new_id, parse_body, server_state
from .echo import EchoCompletionFormat, echoes
from .errors import bad_request
from .formats import ChatFormat, CompletionFormat, Format, check_errors
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, FIMCompletionRequest, SamplingFields
from .requests import (
    Settings,
    chat_logprobs,
    chat_messages,
    check_choices,
    check_context,
    check_total_tokens,
    completion_logprobs,
    encode_chat,
    encode_fim,
    encode_inputs,
    request_template,
    settings,
    tool_use,
)
from .streaming import Choice, ClientGone, EventStream, Run, engine_error, until_disconnect
from .tool_format import ToolChatFormat

router = APIRouter()
S = TypeVar("S", bound=SamplingFields)

CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it, the metrics count it


async def respond(
    request: Request, engine: Engine, body: SamplingFields, prompts: list[list[int]], s: Settings, fmt: Format
) -> Response:
    """Submit n choices per prompt, then answer whole or as an event stream (with the LoRA adapter the
    request's `model` names, if any)."""
    adapter = adapter_for(request, body.model)
    check_choices(len(prompts), s.n)
    requests, choices = [], []
    for p, ids in enumerate(prompts):
        for i in range(s.n):
            k = p * s.n + i
            requests.append(
                EngineRequest(
                    f"{fmt.id}-{k}",
                    ids,
                    s.for_choice(i, engine.max_model_len - len(ids)),
                    s.min_tokens,
                    adapter,
                    cache_salt=body.cache_salt,
                    speculate=body.speculation,
                )
            )
            choices.append(Choice(index=k, prompt_tokens=len(ids)))
    run = Run(engine, requests)
    try:
        await until_disconnect(request, run.start())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(fmt.events(run, choices, include_usage), on_close=run.aclose, media_type=fmt.media_type)
        await until_disconnect(request, run.collect(choices))
    except ClientGone:
        await run.aclose()
        return Response(status_code=CLIENT_CLOSED)
    check_errors(choices)
    return JSONResponse(fmt.response(choices))


def default_max_tokens(request: Request) -> int:
    return server_state(request).default_max_tokens


def answering(request: Request, model: str | None) -> str:
    """The model id a response names: the adapter's name when the request chose one."""
    served = server_state(request).model_name
    return model if model and model != served else served


@dataclass
class ChatPlan:
    """A chat request ready for the engine: its prompt, settings and OpenAI-shaped answer format."""

    body: ChatCompletionRequest  # with the model's Modelfile settings
    engine: Engine
    ids: list[int]
    settings: Settings
    format: ChatFormat  # a ToolChatFormat when the request offers tools


def with_model_settings(request: Request, body: S) -> S:
    """A created model's Modelfile settings (hub/modelfile.py) under the request's: its PARAMETERs for
    the sampling fields the request leaves out; for chats, its SYSTEM when the request brings no system
    message, then its MESSAGEs before the request's (after the request's system message), as Ollama."""
    settings = server_state(request).settings
    update: dict[str, Any] = {
        k: v for k, v in sampling_fields(settings.parameters).items() if getattr(body, k, None) is None
    }
    if isinstance(body, ChatCompletionRequest) and (settings.system or settings.messages):
        messages = list(body.messages)
        first = [messages.pop(0)] if messages and messages[0].role in ("system", "developer") else []
        if not first and settings.system:
            first = [ChatMessage(role="system", content=settings.system)]
        opening = [ChatMessage.model_validate(m) for m in settings.messages]
        update["messages"] = first + opening + messages
    return body.model_copy(update=update) if update else body


async def plan_chat(request: Request, body: ChatCompletionRequest) -> ChatPlan:
    """The checks, chat formatting and settings of a chat completion (Ollama's /api/chat shares them)."""
    body = with_model_settings(request, body)
    engine = engine_for(request, body.model, adapters=True)
    tokenizer = request_template(engine.tokenizer, body.chat_template, server_state(request).allow_request_templates)
    use = tool_use(body, tokenizer)
    s = settings(
        body,
        logprobs=chat_logprobs(body),
        tokenizer=tokenizer,
        tools=use,
        default_max_tokens=default_max_tokens(request),
    )
    ids = await encode_chat(tokenizer, chat_messages(body.messages, body.safe_prompt), use, limit=engine.max_model_len)
    check_context(len(ids), s.max_tokens, engine.max_model_len, "messages")
    args = (new_id("chatcmpl"), answering(request, body.model), s.n, s.params.logprobs is not None)
    fmt = ChatFormat(*args) if use is None or use.mode == "none" else ToolChatFormat(*args, use, tokenizer)
    return ChatPlan(body, engine, ids, s, fmt)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    plan = await plan_chat(request, body)
    return await respond(request, plan.engine, plan.body, [plan.ids], plan.settings, plan.format)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    body = with_model_settings(request, await parse_body(request, CompletionRequest))
    engine = engine_for(request, body.model, adapters=True)
    score_only = body.echo and 0 in (body.max_tokens, body.max_completion_tokens)  # lm-eval's log-likelihoods
    if score_only:
        body = body.model_copy(update={"max_tokens": 1, "max_completion_tokens": None})
    s = settings(
        body,
        logprobs=completion_logprobs(body),
        tokenizer=engine.tokenizer,
        default_max_tokens=default_max_tokens(request),
    )
    if body.suffix is not None:
        if not isinstance(body.prompt, str) or body.echo:
            raise bad_request("with a suffix, the prompt must be one string, without echo", "prompt")
        prompts = [
            await encode_fim(
                engine.tokenizer, body.prompt, body.suffix, answering(request, body.model), limit=engine.max_model_len
            )
        ]
    else:
        prompts = await encode_inputs(
            engine.tokenizer, body.prompt, engine.config.vocab_size, "prompt", limit=engine.max_model_len
        )
    for ids in prompts:
        check_context(len(ids), 0 if score_only else s.max_tokens, engine.max_model_len, "prompt")
    args = (new_id("cmpl"), answering(request, body.model), s.n, s.params.logprobs is not None)
    if not body.echo:
        return await respond(request, engine, body, prompts, s, CompletionFormat(*args))
    check_choices(len(prompts), 1 if score_only else s.n)
    scored = None
    if s.params.logprobs is not None:
        check_total_tokens(prompts, "prompt")
        work = engine.prompt_logprobs(prompts, s.params.logprobs, adapter_for(request, body.model))
        try:
            scored = await until_disconnect(request, work)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001 - the engine's refusal or failure, as an HTTP error
            raise engine_error(exc) from None
    fmt = EchoCompletionFormat(*args, echoes(engine.tokenizer, prompts, scored))
    if score_only:
        return JSONResponse(fmt.scored_only(prompts))
    return await respond(request, engine, body, prompts, s, fmt)


@router.post("/v1/fim/completions")
async def fim_completions(request: Request) -> Response:
    """Mistral's fill-in-the-middle: the model writes what goes between `prompt` and `suffix`."""
    body = with_model_settings(request, await parse_body(request, FIMCompletionRequest))
    engine = engine_for(request, body.model, adapters=True)
    s = settings(body, tokenizer=engine.tokenizer, default_max_tokens=default_max_tokens(request))
    name = answering(request, body.model)
    ids = await encode_fim(engine.tokenizer, body.prompt, body.suffix or "", name, limit=engine.max_model_len)
    check_context(len(ids), s.max_tokens, engine.max_model_len, "prompt")
    return await respond(request, engine, body, [ids], s, ChatFormat(new_id("fim"), name, s.n, False))
