"""Request and response bodies of the OpenAI- and Mistral-compatible HTTP API (pydantic models).

The request models check *types* only (a violation is a 422); value rules (ranges, lengths,
combinations) are checked when a request is translated for the engine (a 400 naming the field, see
convert.py). Unknown fields are ignored, so that newer SDKs that send extra optional fields still work.
Both APIs share one model per endpoint: the Mistral names (`random_seed`, `safe_prompt`, `min_tokens`,
FIM's `suffix`) sit next to the OpenAI ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ----------------------------------------------------------------------------------------


class ContentPart(_Request):
    """One part of a message's content. Only {"type": "text", "text": ...} is supported; other types
    pass the schema and are refused with a 400 naming the part."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    prefix: bool = False  # Mistral: the last assistant message is the start of the answer


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """The generation settings every generating endpoint accepts."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    random_seed: int | None = None  # Mistral's name for seed
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) -> bias in [-100, 100]
    ignore_eos: bool = False
    user: str | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # vLLM's: requests share prefix-cache blocks only with requests of the same salt (tenants apart)
    cache_salt: str | None = None
    # tramontane's: speculative decoding on or off for this request (None: serve --speculative-config)
    speculation: bool | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    safe_prompt: bool = False
    chat_template: str | None = None  # vLLM's extension; refused unless the server allows request templates


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    safe_prompt: bool = False


class FIMCompletionRequest(SamplingFields):
    prompt: str
    suffix: str | None = None


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str | None = None
    dimensions: int | None = None
    output_dimension: int | None = None  # Mistral's name for dimensions
    user: str | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses ---------------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[TokenLogprobOut] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str  # the arguments object as JSON text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCallOut):
    """A streamed call: whole in one delta (the APIs allow the arguments in pieces; one piece is valid)."""

    index: int


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=lambda v: v is None)  # absent, as OpenAI


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=lambda v: v is None)


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    """A text completion, and (with `object` "text_completion") each of its streamed chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(_Response):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage


class ModelCapabilities(_Response):
    """Mistral's model card lists what a model can do; OpenAI clients ignore it."""

    completion_chat: bool = True
    completion_fim: bool = False
    function_calling: bool = False
    fine_tuning: bool = False
    vision: bool = False


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tramontane"
    type: Literal["base"] = "base"
    max_context_length: int
    capabilities: ModelCapabilities


class AdapterCard(_Response):
    """A LoRA adapter served on top of the base model (Mistral's fine-tuned card; `parent` as vLLM)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tramontane"
    type: Literal["fine-tuned"] = "fine-tuned"
    root: str  # the base model's id
    parent: str
    job: str = "local"  # the fine-tuning job that made it ("local": loaded with --lora)
    archived: bool = False
    name: str | None = None
    description: str | None = None
    max_context_length: int
    capabilities: ModelCapabilities


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard | AdapterCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
