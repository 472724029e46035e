"""The offline Python API: `tramontane.load(model)` returns an `LLM`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .build import LoadedModel, load_model, select_backend
from .decoding.offline import Generator, collect
from .decoding.sampling import SamplingParams
from .decoding.sequence import Completion, Delta
from .decoding.speculative import Speculation, SpeculationStats
from .device import resolve_dtype
from .errors import ConfigError, RequestError, TemplateError
from .hub.modelfile import ModelSettings
from .hub.resolve import resolve_model
from .hub.store import settings_for
from .model import Backend, KVCache, KvType, kv_type
from .quant.quantize import SIXTEEN_BIT
from .text.tokenizer import Tokenizer

Prompt = str | Sequence[int]


class TextStream:
    """A streamed chat answer: iterates its text deltas as they come; `finish_reason` once it has ended
    ("stop", or "length" where it reached max_tokens or the end of the context)."""

    def __init__(self, deltas: Iterator[Delta]) -> None:
        self._deltas = deltas
        self.finish_reason: str | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while True:
            delta = next(self._deltas)
            self.finish_reason = delta.finish_reason or self.finish_reason
            if delta.text:
                return delta.text


MODEL_ADAPTER = "modelfile-adapter"  # the name a created model's own ADAPTER loads under


class LLM:
    def __init__(
        self,
        loaded: LoadedModel,
        tokenizer: Tokenizer,
        dtype: torch.dtype = torch.float32,
        kv_dtype: str | torch.dtype | KvType | None = None,
    ) -> None:
        self.loaded, self.tokenizer, self.dtype = loaded, tokenizer, dtype
        self.kv = kv_type(dtype if kv_dtype is None or kv_dtype == "auto" else kv_dtype)
        self.kv.width(loaded.config.head_dim)  # refuses a block type the head dim does not divide
        self.model, self.config = loaded.model, loaded.config
        self.settings = ModelSettings()  # a created model's Modelfile settings (hub/modelfile.py)
        self.speculation: Speculation | None = None  # speculative decoding for every call that names none
        self._spec_stats = SpeculationStats()
        self._select_backend()

    def _select_backend(self) -> None:
        """Pick the decode backend for the offline cache (again after a module swap such as LoRA)."""
        self.backend: Backend = select_backend(self.model, KVCache, self.kv)
        self._runner = Generator(self.model, self.tokenizer, self.backend, self.dtype, self.kv)
        self._runner.stats = self._spec_stats  # the counters go on across a backend change (a LoRA adapter)

    @property
    def _generator(self) -> Generator:
        """The offline runner, its backend picked again if the model's modules were swapped since (a
        LoRA adapter applied to `llm.model` directly, say): a backend never runs modules it did not see."""
        if not self.backend.current():
            self._select_backend()
        return self._runner

    def _params(
        self, params: SamplingParams | Sequence[SamplingParams] | None, n: int, kwargs: dict[str, Any]
    ) -> list[SamplingParams]:
        if "response_format" in kwargs:  # {"type": "json_object"} or {"type": "json_schema", ...}
            from .text.grammar import check_grammar, response_format_grammar

            grammar = response_format_grammar(kwargs.pop("response_format"))
            if grammar is not None:
                check_grammar(grammar, self.tokenizer)
                kwargs["grammar"] = grammar
        if params is None:
            params = SamplingParams(**kwargs)
        elif kwargs:
            raise RequestError("pass either a SamplingParams or keyword sampling options, not both")
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise RequestError(f"{len(params)} SamplingParams for {n} prompts")
        return list(params)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=self.tokenizer.default_add_bos)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        stream: bool = False,
        speculation: Speculation | None = None,
        **kwargs: Any,
    ) -> list[Completion] | Iterator[Delta]:
        """Complete a batch of prompts (text or token ids). With stream=True, yields `Delta`s as they come
        (each names its prompt's index); otherwise returns one `Completion` per prompt. `speculation`
        (else `llm.speculation`): decode speculatively (decoding/speculative.py): greedy answers are
        unchanged, sampled ones keep their distribution."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode_prompt(p) for p in prompts]
        deltas = self._generator.run(ids, self._params(params, len(ids), kwargs), speculation or self.speculation)
        return deltas if stream else collect(deltas, ids)

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        stream: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        speculation: Speculation | None = None,
        **kwargs: Any,
    ) -> Completion | Iterator[str]:
        """Answer a conversation (OpenAI-style message dicts). With stream=True, yields text deltas.

        tools / tool_choice / parallel_tool_calls as in the chat completions API: the calls the model
        makes are in the Completion's `tool_calls` (finish_reason "tool_calls"); a required call
        ("required"/"any" or a named function) is constrained to valid arguments (tools.py)."""
        from .tools.request import call_grammar, call_reserve, call_text, prepare_messages, read_calls, read_tools

        use = read_tools(tools, tool_choice, parallel_tool_calls, self.tokenizer)
        messages, offered = prepare_messages(messages, use, self.tokenizer)
        extra = {"tools": offered} if offered is not None else {}
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True, **extra)
        grammar = call_grammar(use, self.tokenizer) if use is not None else None
        if grammar is not None:
            if params is not None or "response_format" in kwargs:
                raise RequestError(
                    "a required tool call brings its own grammar: pass sampling options as "
                    "keywords, without response_format"
                )
            kwargs["grammar"], kwargs["grammar_reserve"] = grammar, call_reserve(use, self.tokenizer)
        deltas = self._generator.run([ids], self._params(params, 1, kwargs), speculation or self.speculation)
        if stream:
            if use is not None and use.mode != "none":
                raise RequestError("stream=True with tools is not available offline; stream=False gives the calls")
            return TextStream(deltas)
        done = collect(deltas, [ids])[0]
        if use is not None and use.mode != "none":
            parsed = read_calls(call_text(self.tokenizer, done.token_ids), use, self.tokenizer)
            if parsed.calls:
                done.text, done.tool_calls, done.finish_reason = parsed.content, parsed.calls, "tool_calls"
        return done

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter folder (PEFT layout) under `name`; it applies once `use_adapter(name)`."""
        from .lora.layers import set_active
        from .lora.peft import load_adapter

        load_adapter(self.model, Path(path), name)
        set_active(self.model, None)
        self._select_backend()  # the adapters wrap projections: the compiled step no longer fits

    def use_adapter(self, name: str | None) -> None:
        """Generate with LoRA adapter `name` from now on (None: the base model)."""
        from .lora.layers import set_active

        set_active(self.model, name)

    @property
    def speculation_stats(self) -> SpeculationStats:
        """Speculative decoding's counters over this model's calls: passes, drafted and accepted tokens."""
        return self._spec_stats

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Log-probability of every token after the first, given the tokens before it."""
        return self._generator.score(self.encode_prompt(token_ids))


def load(
    model: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    packed: bool | None = None,
    quant: str | None = None,
    lora: dict[str, str | Path] | None = None,
    parallel: str | None = None,
    mmap: bool = True,
    kv_dtype: str | None = None,
) -> LLM:
    """Load a model folder (Hugging Face or Mistral native) or GGUF file; None = the default model.

    dtype: None/"auto" = bfloat16 for float checkpoints where the CPU supports it, else float32. Where
    the packed kernels are built (packed), a float checkpoint in bfloat16 or float16 (asked for, or
    "auto" on such a CPU or for a file stored in that type) keeps its matrices as 16-bit rows for those
    kernels and the compiled decode step, with float32 activations and cache ("auto" on a bfloat16 file
    thus loses nothing); "float32" keeps float32 modules.
    packed: keep a GGUF file's quantized matrices packed and run them with the packed kernels
    (default: when the compiled kernels are available).
    quant: "int8" or "int4" weight-only quantization of the float matrices after loading (quant/).
    lora: {name: adapter folder} LoRA adapters to load (none applies until `use_adapter(name)`).
    parallel: "tp", "ep" or "tp+ep" when this process is one rank of a torch.distributed group (torchrun):
    it loads only its part of the model (parallel/plan.py); every rank then runs the same calls.
    mmap: packed GGUF blocks are views of the mapped file, read as first touched (False: copied in).
    kv_dtype: how the KV cache stores keys and values: "f32", "bf16", "f16" or "q8_0" (34 bytes per
    32 elements, as llama.cpp's -ctk q8_0); None/"auto" = the model's dtype (float32 for packed models)."""
    from .quant.kernels import available
    from .text.tokenizer import load_tokenizer, tokenizer_from_gguf
    from .weights.sources import detect_format

    path = resolve_model(model)
    fmt = detect_format(path)
    packed = available() if packed is None else packed
    if quant is None and parallel is None and packed and fmt != "gguf":
        quant = _float_packing(path, dtype)  # 16-bit rows on the packed kernels (activations float32)
    dtype = torch.float32 if quant in SIXTEEN_BIT else resolve_dtype(dtype, fmt)
    shard = None
    if parallel is not None and (quant is not None or lora):
        raise RequestError(
            "--quant and --lora cannot be combined with --parallel yet: the sharded model runs "
            "float weights without adapters"
        )
    if parallel is not None:
        from .parallel.dist import rank_and_world

        shard = (parallel, *rank_and_world())
    loaded = load_model(
        path,
        dtype=dtype,
        progress=progress,
        packed=packed,
        shard=shard,
        mmap=mmap,
        quant=quant if quant is not None and fmt != "gguf" else None,  # float files: as read
    )
    if quant is not None and loaded.config.quant != quant:  # a GGUF file's float matrices, after loading
        from .quant.quantize import quantize_model

        quantize_model(loaded.model, quant)
        loaded.config = loaded.model.config
    if loaded.format == "gguf":
        tokenizer = tokenizer_from_gguf(loaded.metadata, str(path))
    else:
        tokenizer = load_tokenizer(path)
    settings = settings_for(path)
    if settings.template is not None:  # a model created from a Modelfile with a TEMPLATE
        tokenizer = _with_go_template(tokenizer, settings.template)
    llm = LLM(loaded, tokenizer, dtype, kv_dtype)
    llm.settings = settings
    for name, adapter in (lora or {}).items():
        llm.load_adapter(name, adapter)
    if llm.settings.adapter is not None:  # a model created from a Modelfile with an ADAPTER
        llm.load_adapter(MODEL_ADAPTER, llm.settings.adapter)
        llm.use_adapter(MODEL_ADAPTER)
    return llm


def _with_go_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    """The tokenizer formatting chats with a Modelfile's TEMPLATE (text/go_chat.py). A TEMPLATE stored
    before templates were checked at `tramontane create` may not parse: the model still loads, with its
    own chat template and a warning saying why."""
    with_go_template = getattr(tokenizer, "with_go_template", None)
    if with_go_template is None:
        raise ConfigError(
            f"this model formats chats with {tokenizer.chat_format}, which a Modelfile TEMPLATE cannot "
            "replace: create the model without TEMPLATE"
        )
    try:
        return with_go_template(template)
    except TemplateError as exc:
        warnings.warn(
            f"this model's Modelfile TEMPLATE does not parse ({exc}): chats use the model's own chat template; "
            "`tramontane create` it again with a fixed TEMPLATE",
            stacklevel=3,
        )
        return tokenizer


def _float_packing(path: Path, dtype: str | torch.dtype | None) -> str | None:
    """ "bf16" or "f16" where a float checkpoint loads as 16-bit packed rows: the dtype asked for, or on
    "auto" the CPU's bfloat16 (resolve_dtype) or the type most of the file's tensors are stored in."""
    from .weights.sources import open_source

    chosen = resolve_dtype(dtype, "safetensors")
    if dtype in (None, "auto") and chosen is torch.float32:
        counts = open_source(path)[2].type_counts()
        stored = max(counts, key=lambda k: counts[k]) if counts else None
        chosen = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored or "", torch.float32)
    return next((scheme for scheme, d in SIXTEEN_BIT.items() if d is chosen), None)
