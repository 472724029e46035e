"""What every route needs: the server state, body parsing, the engine (or a 503/404), response helpers."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from ..decoding.sequence import TokenLogprob
from ..engine.types import Engine
from ..hub.files import FileStore
from ..hub.jobs import JobStore
from ..hub.modelfile import ModelSettings
from .errors import APIError, bad_request, validation_error
from .protocol import ChatLogprobs, CompletionLogprobs, PromptTokensDetails, TokenLogprobOut, TopLogprob, Usage

M = TypeVar("M", bound=BaseModel)
LOGPROB_FLOOR = -9999.0  # -inf is not JSON: reported as this, like other OpenAI-compatible servers


@dataclass(frozen=True)
class FileLimits:
    """--max-file-bytes, --max-files and --fine-tuning-workers: the local La Plateforme's limits."""

    max_file_bytes: int = 512 << 20  # Mistral's own limit per file
    max_files: int = 1000
    fine_tuning_workers: int = 1  # fine-tuning jobs running at once (finetune_runner.py)


@dataclass
class ServerState:
    """Shared by the routes through `app.state.tramontane`. `engine` is None while the model loads."""

    model_name: str
    engine: Engine | None = None
    draining: bool = False
    allow_request_templates: bool = False  # --allow-request-chat-template
    default_max_tokens: int = 4096  # --default-max-tokens: a request without max_tokens (0: to the context's end)
    created: int = field(default_factory=lambda: int(time.time()))
    model_path: Path | None = None  # the served model's file or folder (Ollama's /api/tags and /api/show)
    settings: ModelSettings = field(default_factory=ModelSettings)  # a created model's Modelfile settings
    default_adapter: str | None = None  # the adapter requests for the served model get (a Modelfile's ADAPTER)
    files: FileStore = field(default_factory=FileStore)  # /v1/files, under $TRAMONTANE_HOME/platform
    file_limits: FileLimits = field(default_factory=FileLimits)
    jobs: JobStore = field(default_factory=JobStore)  # /v1/batch/jobs' records, next to the files
    batches: Any = None  # the BatchRunner (batch_runner.py), once started
    fine_tuning: Any = None  # the FineTuneRunner (finetune_runner.py), once started
    fine_tuned: dict[str, str] = field(default_factory=dict)  # ft:... model -> the engine's adapter name
    archived: set[str] = field(default_factory=set)  # ft:... models archived (not served until unarchived)
    api_key: str | None = None  # what the batch runner's in-process requests carry


def server_state(request: Request) -> ServerState:
    return request.app.state.tramontane


def engine_for(request: Request, model: str | None, *, adapters: bool = False) -> Engine:
    """The engine, for a request naming `model` (None or "" = the served model; with `adapters`, also
    the name of a LoRA adapter loaded with --lora)."""
    state = server_state(request)
    if state.engine is None:
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
    if state.draining:
        raise APIError(503, "the server is shutting down and takes no new requests", code="draining")
    known = (
        set(listed_adapters(state, state.engine)) | {state.default_adapter} | set(state.fine_tuned)
        if adapters
        else set()
    )
    if model in state.archived:
        raise APIError(
            404,
            f"the model {model[:100]!r} is archived: unarchive it (DELETE /v1/fine_tuning/models/"
            f"{model[:100]}/archive) to use it",
            param="model",
            code="model_not_found",
        )
    if model and model != state.model_name and model not in known:
        served = ", ".join(repr(n) for n in [state.model_name, *served_adapters(state, state.engine)])
        raise APIError(
            404,
            f"the model {model[:100]!r} does not exist; this server serves {served}",
            param="model",
            code="model_not_found",
        )
    return state.engine


def adapter_names(engine: Engine) -> set[str]:
    return set(engine.adapters)


def listed_adapters(state: ServerState, engine: Engine) -> list[str]:
    """The --lora adapters model lists show by their names: not the served model's own (a Modelfile's
    ADAPTER), nor those of fine-tuning jobs (listed as their ft:... models)."""
    return sorted(adapter_names(engine) - {state.default_adapter} - set(state.fine_tuned.values()))


def served_adapters(state: ServerState, engine: Engine) -> list[str]:
    """What requests may name besides the served model: --lora adapters, then fine-tuned models."""
    return listed_adapters(state, engine) + sorted(set(state.fine_tuned) - state.archived)


def adapter_for(request: Request, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names, or for the served model itself its own (None: none)."""
    state = server_state(request)
    if not model or model == state.model_name:
        return state.default_adapter
    return state.fine_tuned.get(model, model)


MAX_INT = 10**40  # no field takes more than 64 bits: larger integers are refused before any arithmetic
MAX_PROMPT_IDS = 1 << 20  # token ids in a prompt or input field; no context is longer


def _check_sizes(data: dict[str, Any]) -> None:
    """400 for an absurd integer field (a 4000-digit max_tokens would reach arithmetic and messages
    that cannot print it), and for a prompt or input of more token ids than any context holds, counted
    before each id is validated (which takes seconds for millions)."""
    for name, value in data.items():
        if isinstance(value, int) and not -MAX_INT < value < MAX_INT:
            raise bad_request(f"{name} is out of range: an integer of {len(str(abs(value)))} digits", name)
    for name in ("prompt", "input"):
        value = data.get(name)
        if isinstance(value, list) and value:
            count = len(value) + (
                sum(len(v) for v in value if isinstance(v, list)) if isinstance(value[0], list) else 0
            )
            if count > MAX_PROMPT_IDS:
                raise APIError(
                    400,
                    f"{name} holds {count} items, more than any context ({MAX_PROMPT_IDS})",
                    param=name,
                    code="context_length_exceeded",
                )


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`: 415 unless it is sent as JSON (a web page can send text/plain or form
    bodies to any server without asking), 400 for a body that is not JSON, 422 for one of the wrong shape."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise APIError(
            415,
            f"the request body must be sent as JSON (Content-Type: application/json), not {content_type[:100]!r}",
            code="unsupported_media_type",
        )
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone before its body arrived: nobody reads the answer, nothing to log
        raise APIError(
            400, "the client disconnected before sending its whole body", code="client_disconnected"
        ) from None
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, over-long integers, nesting
        raise bad_request(f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if _LONE_SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(data):
        raise bad_request(
            "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
            "pair), which is not Unicode text",
            code="invalid_json",
        )
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_type")
    _check_sizes(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_input=False)) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None


# json.loads turns an unpaired "\ud800" escape into a str that no tokenizer can encode.
_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int = 0, cached_tokens: int | None = None) -> Usage:
    details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens is not None else None
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=details,
    )


def finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.token,
                logprob=finite(lp.logprob),
                bytes=list(lp.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=finite(v), bytes=list(t.encode())) for _, t, v in lp.top],
            )
            for lp in items
        ]
    )


def completion_logprobs(items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs; `offset` is where the first token's text starts in the answer."""
    out = CompletionLogprobs()
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(finite(lp.logprob))
        out.top_logprobs.append({t: finite(v) for _, t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out
