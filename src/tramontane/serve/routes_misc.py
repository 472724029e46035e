"""The other routes: models, embeddings, tokenize / detokenize, health and metrics."""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .common import engine_for, listed_adapters, new_id, parse_body, server_state, usage
from .errors import APIError, bad_request
from .protocol import (
    AdapterCard,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCapabilities,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .requests import (
    MAX_REQUEST_TOKENS,
    chat_messages,
    check_ids,
    check_total_tokens,
    encode_chat,
    encode_inputs,
    encode_text,
)
from .routes_fine_tuning import fine_tuned_cards
from .streaming import ClientGone, engine_error, until_disconnect

router = APIRouter()

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _cards(request: Request) -> list[ModelCard | AdapterCard]:
    """The served model, then each LoRA adapter loaded on it, then its fine-tuned models (archived too)."""
    state = server_state(request)
    engine = engine_for(request, None)
    fim = bool(getattr(engine.tokenizer, "supports_fim", False))
    tools = hasattr(engine.tokenizer, "guidance_tokenizer")  # calls are constrained through llguidance
    base = ModelCard(
        id=state.model_name,
        created=state.created,
        max_context_length=engine.max_model_len,
        capabilities=ModelCapabilities(completion_fim=fim, function_calling=tools),
    )
    return (
        [base]
        + [
            AdapterCard(
                id=name,
                created=state.created,
                root=base.id,
                parent=base.id,
                max_context_length=base.max_context_length,
                capabilities=base.capabilities,
            )
            for name in listed_adapters(state, engine)
        ]
        + [
            AdapterCard(
                id=card["id"],
                created=card["created"],
                root=base.id,
                parent=base.id,
                job=card["job"],
                archived=card["archived"],
                name=card["name"],
                description=card["description"],
                max_context_length=base.max_context_length,
                capabilities=base.capabilities,
            )
            for card in fine_tuned_cards(request)
        ]
    )


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    cards = await asyncio.to_thread(_cards, request)
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONResponse:
    cards = await asyncio.to_thread(_cards, request)
    for card in cards:
        if card.id == model_id:
            return JSONResponse(card.model_dump(mode="json"))
    served = ", ".join(repr(c.id) for c in cards)
    raise APIError(
        404,
        f"the model {model_id[:100]!r} does not exist; this server serves {served}",
        param="model",
        code="model_not_found",
    )


def _encode_vector(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI's API sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    """Mean-pooled final hidden states, L2-normalised."""
    body = await parse_body(request, EmbeddingRequest)
    engine = engine_for(request, body.model)
    fmt = body.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise bad_request(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    for name in ("dimensions", "output_dimension"):
        value = getattr(body, name)
        if value is not None and value != engine.config.dim:
            raise bad_request(f"{name} can only be {engine.config.dim} (the model's width), got {value}", name)
    inputs = await encode_inputs(
        engine.tokenizer, body.input, engine.config.vocab_size, "input", limit=engine.max_model_len
    )
    for i, ids in enumerate(inputs):
        if len(ids) > engine.max_model_len:
            raise APIError(
                400,
                f"input {i} has {len(ids)} tokens, more than the model's maximum context length "
                f"of {engine.max_model_len}",
                param="input",
                code="context_length_exceeded",
            )
    check_total_tokens(inputs, "input")
    try:
        vectors = await until_disconnect(request, engine.embed(inputs))
    except ClientGone:
        return Response(status_code=499)
    except Exception as exc:  # the engine's refusals (draining...) and failures
        raise engine_error(exc) from exc
    n_tokens = sum(len(ids) for ids in inputs)
    data = [EmbeddingData(index=i, embedding=_encode_vector(v, fmt)) for i, v in enumerate(vectors)]
    return JSONResponse(
        EmbeddingResponse(
            id=new_id("embd"), model=server_state(request).model_name, data=data, usage=usage(n_tokens)
        ).model_dump(mode="json")
    )


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> JSONResponse:
    """vLLM's tokenizer description (lm-eval-harness' remote tokenizer reads it); /tokenize and
    /detokenize answer at the root as well as under /v1."""
    engine = engine_for(request, None)
    tok = engine.tokenizer

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.decode([token_id], skip_special=False)

    return JSONResponse(
        {
            "eos_token": text(tok.eos_id),
            "bos_token": text(tok.bos_id),
            "pad_token": None,
            "model_max_length": engine.max_model_len,
            "vocab_size": tok.vocab_size,
            "chat_format": tok.chat_format,
        }
    )


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    """Token ids of a prompt (with the tokenizer's BOS when add_special_tokens) or of a chat."""
    body = await parse_body(request, TokenizeRequest)
    engine = engine_for(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        ids = await encode_chat(engine.tokenizer, chat_messages(body.messages, False), limit=MAX_REQUEST_TOKENS)
    else:
        add_bos = engine.tokenizer.default_add_bos and body.add_special_tokens
        ids = await encode_text(
            engine.tokenizer, body.prompt or "", "prompt", limit=MAX_REQUEST_TOKENS, add_bos=add_bos
        )
    return JSONResponse(
        TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len).model_dump(mode="json")
    )


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    body = await parse_body(request, DetokenizeRequest)
    engine = engine_for(request, body.model)
    ids = check_ids(body.tokens, engine.config.vocab_size, "tokens")
    text = await asyncio.to_thread(engine.tokenizer.decode, ids)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 {"status": "ok"} when requests can be served; 503 with the reason otherwise."""
    state = server_state(request)
    if state.engine is None:
        status = "loading"
    elif state.draining:
        status = "draining"
    elif not state.engine.is_healthy():
        status = "unhealthy"
    else:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format of the engine's counters, gauges and histograms."""
    engine = server_state(request).engine
    if engine is None:
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
    return PlainTextResponse(engine.metrics.render(), media_type=PROMETHEUS_TEXT)
