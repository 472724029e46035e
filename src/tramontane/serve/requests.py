"""HTTP request bodies to engine inputs: sampling settings, chat messages and prompts as token ids.

Every value rule lives here and answers with a 400 that names the field (`param`), in the words of
the OpenAI API where it has them (`context_length_exceeded`)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from ..decoding.sampling import SamplingParams
from ..errors import RequestError, TemplateError, TokenizerError
from ..text.grammar import check_grammar, response_format_grammar
from ..text.tokenizer import Tokenizer
from ..tools.request import ToolError, ToolUse, call_grammar, call_reserve, prepare_messages, read_tools
from .errors import APIError, bad_request
from .prompt_size import count_past, message_texts
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

# Mistral's guardrail system prompt, prepended when a request sets `safe_prompt`.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
    "and positivity."
)
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request
MAX_REQUEST_TOKENS = 1 << 17  # prompt tokens of one embeddings or scoring request, all inputs together
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 2048  # messages in one conversation
MAX_TEMPLATE_CHARS = 64 * 1024  # a request's own chat template (--allow-request-chat-template)


@dataclass
class Settings:
    """What a generating request asks of the engine, per choice."""

    params: SamplingParams
    min_tokens: int
    n: int
    max_tokens: int | None  # as the request gave it
    default_max_tokens: int = 0  # without max_tokens: at most this many (0: to the end of the context)

    def for_choice(self, i: int, room: int) -> SamplingParams:
        """Choice i of n of a prompt that leaves `room` tokens of context: seed + i when a seed is given,
        so that choices differ but repeat; the default max_tokens when the request gave none and the
        default ends before the context does."""
        params = self.params
        if params.max_tokens is None and 0 < self.default_max_tokens < room:
            params = replace(params, max_tokens=self.default_max_tokens)
        if params.seed is None or i == 0:
            return params
        seed = params.seed + i
        seed = seed if seed < 1 << 64 else seed - (1 << 64)
        return replace(params, seed=seed)


def _grammar(req: SamplingFields, tokenizer: Tokenizer) -> str | None:
    """The grammar of the request's response_format, compiled for this tokenizer (400 when it cannot be)."""
    try:
        grammar = response_format_grammar(req.response_format)
        if grammar is not None and tokenizer is not None:
            check_grammar(grammar, tokenizer)
    except RequestError as exc:
        raise bad_request(str(exc), "response_format") from None
    return grammar


def request_template(tokenizer: Tokenizer, template: str | None, allowed: bool) -> Tokenizer:
    """The tokenizer to format this chat with: the model's, or (when the server allows it) one with the
    request's own Jinja template, which renders in the same sandbox and budget as the model's."""
    if template is None:
        return tokenizer
    if not allowed:
        raise APIError(
            400,
            "this server does not accept chat templates in requests (start it with "
            "--allow-request-chat-template to allow them)",
            param="chat_template",
            code="chat_template_not_allowed",
        )
    if not hasattr(tokenizer, "with_template"):
        raise bad_request(
            f"this model's chat format ({tokenizer.chat_format}) does not use a Jinja template", "chat_template"
        )
    if len(template) > MAX_TEMPLATE_CHARS:
        raise bad_request(
            f"chat_template holds {len(template)} characters, more than {MAX_TEMPLATE_CHARS}", "chat_template"
        )
    return tokenizer.with_template(template)


def tool_use(req: SamplingFields, tokenizer: Tokenizer) -> ToolUse | None:
    """The request's tools and tool_choice, checked (a 400 naming the field), schemas compiled."""
    try:
        return read_tools(req.tools, req.tool_choice, req.parallel_tool_calls, tokenizer)
    except ToolError as exc:
        raise bad_request(str(exc), exc.field) from None


def _no_tools(req: SamplingFields) -> None:
    """Tools belong to chat completions."""
    if req.tools:
        raise bad_request("tools are only available with chat completions", "tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is only available with chat completions", "tool_choice")


def _seed(req: SamplingFields) -> tuple[int | None, str]:
    if req.seed is not None and req.random_seed is not None and req.seed != req.random_seed:
        raise bad_request("seed and random_seed differ; give one of them", "random_seed")
    if req.seed is not None:
        return req.seed, "seed"
    return req.random_seed, "random_seed"


def _max_tokens(req: SamplingFields) -> tuple[int | None, str]:
    if req.max_tokens is not None:
        return req.max_tokens, "max_tokens"
    return req.max_completion_tokens, "max_completion_tokens"


def _logit_bias(req: SamplingFields, tokenizer: Tokenizer | None) -> dict[int, float]:
    """logit_bias with its keys as token ids, checked against the vocabulary."""
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        if not re.fullmatch(r"\d{1,12}", key) or (tokenizer is not None and int(key) >= tokenizer.vocab_size):
            size = f" (vocabulary size {tokenizer.vocab_size})" if tokenizer is not None else ""
            raise bad_request(f"logit_bias keys must be token ids{size}, got {key[:40]!r}", "logit_bias")
        bias[int(key)] = value  # "5" and "05" name one token: the later one holds
    return bias


def settings(
    req: SamplingFields,
    *,
    logprobs: int | None = None,
    tokenizer: Tokenizer | None = None,
    tools: ToolUse | None = None,
    default_max_tokens: int = 0,
) -> Settings:
    """Sampling settings of a request; a bad value is a 400 naming its field. With the tokenizer, a
    response_format's schema is compiled here, before anything is scheduled; a required tool call
    (`tools`, chat only) brings its own grammar. A request without max_tokens gets
    `default_max_tokens` (0: up to the end of the context; applied per prompt, see `Settings`)."""
    if tools is None:
        _no_tools(req)
    grammar = _grammar(req, tokenizer)
    calls = call_grammar(tools, tokenizer) if tools is not None else None
    reserve = 0
    if calls is not None and tools is not None:
        if grammar is not None:
            raise bad_request("a required tool call cannot be combined with a response_format", "tool_choice")
        grammar, reserve = calls, call_reserve(tools, tokenizer)
    seed, seed_name = _seed(req)
    max_tokens, max_name = _max_tokens(req)
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be in 1..{MAX_N}, got {n}", "n")
    min_tokens = 0 if req.min_tokens is None else req.min_tokens
    cap = max_tokens if max_tokens is not None else default_max_tokens or None
    if min_tokens < 0 or (cap is not None and cap >= 1 and min_tokens > cap):
        raise bad_request(f"min_tokens must be >= 0 and at most max_tokens ({cap}), got {min_tokens}", "min_tokens")
    names = {"seed": seed_name, "max_tokens": max_name}
    _check_api_ranges(req)
    try:
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
            frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
            seed=seed,
            max_tokens=max_tokens,
            stop=() if req.stop is None else req.stop,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            grammar=grammar,
            grammar_reserve=reserve,
            logit_bias=tuple(_logit_bias(req, tokenizer).items()),
        )
    except RequestError as exc:
        found = re.search(r"sampling parameter '(\w+)'", str(exc))
        field = found.group(1) if found else None
        raise bad_request(str(exc), names.get(field or "", field)) from exc
    return Settings(params, min_tokens, n, max_tokens, default_max_tokens)


# The APIs' ranges where they are narrower than the sampler's own (OpenAI's and Mistral's temperature
# stops at 2; offline, `tramontane run --temperature 5` is the user's choice).
MAX_TEMPERATURE = 2.0
MAX_CACHE_SALT = 256


def _check_api_ranges(req: SamplingFields) -> None:
    """400 for a value the official APIs refuse, worded as OpenAI words it."""
    t = req.temperature
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > MAX_TEMPERATURE:
        raise bad_request(
            f"Invalid 'temperature': decimal above maximum value. Expected a value <= {MAX_TEMPERATURE:g}, "
            f"but got {t:g} instead.",
            "temperature",
            "decimal_above_max_value",
        )
    salt = req.cache_salt
    if salt is not None and not 0 < len(salt) <= MAX_CACHE_SALT:
        raise bad_request(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters", "cache_salt")


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {req.top_logprobs}", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def completion_logprobs(req: CompletionRequest) -> int | None:
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {req.logprobs}", "logprobs")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="not_supported")
    return req.logprobs


# ---- messages and prompts ----------------------------------------------------------------------------


def _content(message: ChatMessage, where: str) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"only text content parts are supported, got type {part.type!r}", f"{where}.content[{j}]")
        texts.append(part.text)
    return "\n".join(texts)


def chat_messages(messages: list[ChatMessage], safe_prompt: bool) -> list[dict[str, Any]]:
    """Request messages as the plain dicts the tokenizer's chat formatting takes."""
    if not messages:
        raise bad_request("messages must hold at least one message", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"messages holds {len(messages)} messages, more than the limit of {MAX_MESSAGES}", "messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content = _content(m, f"messages[{i}]")
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise bad_request(f"message {i} ({m.role}) has no content", f"messages[{i}].content")
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        if m.tool_calls:
            d["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.tool_calls)]
        if m.role == "tool" and m.tool_call_id is None:
            raise bad_request(
                f"message {i} (tool) needs the tool_call_id of the call it answers", f"messages[{i}].tool_call_id"
            )
        if m.prefix:
            d["prefix"] = True
        out.append(d)
    if safe_prompt:
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{SAFE_PROMPT}\n\n{out[0]['content'] or ''}"}
        else:
            out.insert(0, {"role": "system", "content": SAFE_PROMPT})
    return out


def _tool_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    """An assistant message's earlier tool call as {"id", "type", "function": {"name", "arguments"}}
    (arguments as JSON text; the Mistral SDK may send an object)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f'{where} must be {{"id": ..., "function": {{"name": ..., "arguments": ...}}}}', where)
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where}.id must be the call's id", f"{where}.id")
    return {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}}


async def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: ToolUse | None = None, *, limit: int
) -> list[int]:
    """Chat formatting off the event loop (a chat template may take up to its time budget), with the
    request's tools (tools.py); refused early when the messages alone hold more than `limit` tokens."""
    messages, offered = prepare_messages(messages, tools, tokenizer)
    await _refuse_past(tokenizer, list(message_texts(messages)), limit, "messages")
    try:
        if offered is None:
            return await asyncio.to_thread(tokenizer.encode_chat, messages, add_generation_prompt=True)
        return await asyncio.to_thread(tokenizer.encode_chat, messages, add_generation_prompt=True, tools=offered)
    except (TemplateError, TokenizerError, RequestError) as exc:
        raise bad_request(str(exc), "messages") from exc


def check_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    for t in ids:
        if not 0 <= t < vocab_size:
            shown = str(t) if abs(t) < 10**20 else f"of {len(str(abs(t)))} digits"
            raise bad_request(f"token id {shown} is outside the vocabulary (size {vocab_size})", param)
    return ids


async def _refuse_past(tokenizer: Tokenizer, texts: list[str], limit: int, param: str) -> None:
    """400 context_length_exceeded, counting no further than the limit, when `texts` cannot fit."""
    try:
        count = await asyncio.to_thread(count_past, tokenizer, texts, limit)
    except (TokenizerError, RequestError) as exc:
        raise bad_request(str(exc), param) from exc
    if count is not None:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; the {param} hold{'' if param == 'messages' else 's'}"
            f" more than {count}",
            param=param,
            code="context_length_exceeded",
        )


async def encode_text(
    tokenizer: Tokenizer, text: str, param: str, *, limit: int, add_bos: bool | None = None
) -> list[int]:
    """`text` as token ids, refused early when it holds more than `limit` tokens."""
    bos = tokenizer.default_add_bos if add_bos is None else add_bos
    await _refuse_past(tokenizer, [text], limit, param)
    try:
        return await asyncio.to_thread(tokenizer.encode, text, add_bos=bos)
    except (TokenizerError, RequestError) as exc:
        raise bad_request(str(exc), param) from exc


async def encode_inputs(
    tokenizer: Tokenizer, value: Any, vocab_size: int, param: str, *, limit: int
) -> list[list[int]]:
    """A prompt (or embedding input) given as text, texts, token ids or lists of token ids; each at most
    `limit` tokens (the model's context), checked before the ids are."""
    if isinstance(value, str):
        value = [value]
    elif value and all(isinstance(t, int) for t in value):
        value = [value]
    if not value:
        raise bad_request(f"{param} must not be empty", param)
    if len(value) > MAX_CHOICES * 32:
        raise bad_request(f"{param} holds {len(value)} items, more than {MAX_CHOICES * 32}", param)
    out = []
    for i, item in enumerate(value):
        where = f"{param}[{i}]" if len(value) > 1 else param
        if isinstance(item, str):
            ids = await encode_text(tokenizer, item, where, limit=limit)
        else:
            check_context(len(item), 0, limit, where)
            ids = check_ids(item, vocab_size, where)
        if not ids:
            raise bad_request(f"{where} is empty", where)
        out.append(ids)
    return out


async def encode_fim(tokenizer: Tokenizer, prompt: str, suffix: str, model: str, *, limit: int) -> list[int]:
    if not getattr(tokenizer, "supports_fim", False):
        raise APIError(
            400,
            f"model {model!r} does not support fill-in-the-middle: its tokenizer "
            f"({tokenizer.chat_format}) has no FIM tokens",
            param="suffix",
            code="fim_not_supported",
        )
    await _refuse_past(tokenizer, [prompt, suffix], limit, "prompt")
    try:
        return await asyncio.to_thread(tokenizer.encode_fim, prompt, suffix)
    except (TokenizerError, RequestError) as exc:
        raise bad_request(str(exc), "prompt") from exc


def check_choices(n_prompts: int, n: int) -> None:
    if n_prompts * n > MAX_CHOICES:
        raise bad_request(f"{n_prompts} prompts x n={n} is more than {MAX_CHOICES} choices", "n")


def check_total_tokens(prompts: list[list[int]], param: str) -> None:
    """400 when an embeddings or scoring request holds more than MAX_REQUEST_TOKENS tokens in all."""
    total = sum(map(len, prompts))
    if total > MAX_REQUEST_TOKENS:
        raise bad_request(
            f"the {param} holds {total} tokens in all, more than {MAX_REQUEST_TOKENS}; split the request", param
        )


def check_context(n_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """400 context_length_exceeded when the prompt leaves no room, or no room for max_tokens."""
    wanted = n_prompt + (1 if max_tokens is None else max_tokens)  # 0: an echo that only scores the prompt
    if wanted > max_model_len:
        asked = f" + {max_tokens} for the completion" if max_tokens else ""
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but the request "
            f"needs {wanted} ({n_prompt} in the {param}{asked}); shorten the {param} or "
            "lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
