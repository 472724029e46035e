"""Sampling: `SamplingParams` and pure functions of (logits, params, generator).

The engine calls, once per step, on the last-position logits of a batch (B rows, V vocabulary):

    logits = apply_penalties(logits, prompt_counts, output_counts, params_list)   # [B, V]
    logprobs = compute_logprobs(raw_logits, tokens, top_n)    # optional, on the *raw* logits
    logits = process_logits(logits, params_list)                                  # [B, V]
    tokens = sample(logits, params_list, generators)                              # [B]

Order (the same as transformers' `generate` and vLLM): penalties -> temperature -> top-k -> top-p -> min-p.
Each mask step works on the distribution left by the step before it, so top-p sees the top-k survivors
renormalised and the temperature-scaled probabilities. Masked tokens get -inf.

No function here touches the global RNG: randomness comes only from the per-row `torch.Generator`s the
caller passes, and a greedy row (temperature 0) touches none. No function calls `.item()` or `.tolist()`
on a tensor; decisions about which steps to run are made from the Python parameters only.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (token id -> bias in [-100, 100])
# Temperatures in (0, GREEDY_TEMPERATURE) are treated as 0: dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5
_SEED_MIN, _SEED_END = -(1 << 63), 1 << 64
_UINT64_MASK = (1 << 64) - 1

# Token counts: a [B, V] integer tensor of per-row counts, or per-row lists of token ids.
TokenCounts = torch.Tensor | Sequence[Sequence[int]]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; validated on construction (RequestError names field and value).

    temperature 0 means greedy. top_k 0 or -1, top_p 1, min_p 0 and neutral penalties mean "off".
    repetition_penalty follows CTRL / transformers over prompt + output tokens; presence_penalty and
    frequency_penalty follow OpenAI over output tokens only. `stop` may be given as one string or a list;
    it is stored as a tuple. `logprobs` is the number of top alternatives to report (0..20) or None.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: str | None = None  # llguidance grammar the output must follow (structured.py), None = free
    grammar_reserve: int = 0  # tokens a whole new grammar item may take (a tool call); widens the finishing window
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before anything else

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise RequestError naming the first bad field and its value."""
        _check_real(self, "temperature", lambda v: 0.0 <= v < math.inf, "a finite number >= 0")
        _check_real(self, "top_p", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _check_real(self, "min_p", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        _check_int(self, "top_k", lambda v: v >= -1, "an integer >= -1 (0 or -1 disables it)")
        _check_real(self, "repetition_penalty", lambda v: 0.0 < v < math.inf, "a finite number > 0")
        _check_real(self, "presence_penalty", lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        _check_real(self, "frequency_penalty", lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        if self.seed is not None:
            _check_int(self, "seed", lambda v: _SEED_MIN <= v < _SEED_END, "a 64-bit integer")
        if self.max_tokens is not None:
            _check_int(self, "max_tokens", lambda v: v >= 1, "an integer >= 1")
        if self.logprobs is not None:
            _check_int(self, "logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"in 0..{MAX_LOGPROBS}")
        if not isinstance(self.ignore_eos, bool):
            _bad("ignore_eos", self.ignore_eos, "a boolean")
        _validate_stop(self.stop)
        _validate_stop_token_ids(self.stop_token_ids)
        _check_int(self, "grammar_reserve", lambda v: 0 <= v <= 1 << 20, "an integer >= 0")
        _validate_logit_bias(self.logit_bias)
        if self.grammar is not None and not isinstance(self.grammar, str):
            _bad("grammar", type(self.grammar).__name__, "a grammar string (see structured.json_grammar)")


def _bad(field: str, value: object, rule: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 100 else shown[:97] + "..."  # errors never echo a large input back
    raise RequestError(f"sampling parameter {field!r} must be {rule}, got {shown}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_real(params: SamplingParams, field: str, ok: Callable[[float], bool], rule: str) -> None:
    value = getattr(params, field)
    # `ok` rejects nan because every comparison with nan is False.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        _bad(field, value, rule)


def _check_int(params: SamplingParams, field: str, ok: Callable[[int], bool], rule: str) -> None:
    value = getattr(params, field)
    if not _is_int(value) or not ok(value):
        _bad(field, value, rule)


def _validate_logit_bias(bias: object) -> None:
    if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS:
        _bad("logit_bias", bias, f"a map of at most {MAX_LOGIT_BIAS} token ids to biases")
    assert isinstance(bias, tuple)
    for entry in bias:
        token, value = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            _bad("logit_bias", token, "keyed by token ids (integers >= 0)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100.0 <= value <= 100.0:
            _bad("logit_bias", value, "a map to biases in [-100, 100]")


def apply_logit_bias(logits: torch.Tensor, params_list: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [B, V] plus each row's logit_bias (OpenAI's: added to the logits before sampling; -100
    all but bans a token, 100 all but forces it). Returns float32 logits, new only when a row has a bias."""
    _check_rows(logits, params_list)
    if not any(p.logit_bias for p in params_list):
        return logits
    logits = logits.float().clone()
    for row, p in enumerate(params_list):
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
            logits[row].index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=logits.device))
    return logits


def _validate_stop(stop: object) -> None:
    if not isinstance(stop, tuple):
        _bad("stop", stop, "a string or a list of strings")
    assert isinstance(stop, tuple)
    if len(stop) > MAX_STOP_STRINGS:
        _bad("stop", stop, f"at most {MAX_STOP_STRINGS} strings")
    for s in stop:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            _bad("stop", s, f"a non-empty string of at most {MAX_STOP_CHARS} characters")


def _validate_stop_token_ids(ids: object) -> None:
    if not isinstance(ids, tuple):
        _bad("stop_token_ids", ids, "a list of token ids")
    assert isinstance(ids, tuple)
    for t in ids:
        if not _is_int(t) or t < 0:
            _bad("stop_token_ids", t, "a token id >= 0")


# ---- generators --------------------------------------------------------------------------------------


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator for one request: seeded from `seed`, or from OS entropy when None.

    Never touches torch's global RNG. Negative seeds map to their two's-complement uint64."""
    gen = torch.Generator(device=device)
    value = secrets.randbits(64) if seed is None else seed & _UINT64_MASK
    gen.manual_seed(value)
    return gen


# ---- penalties ---------------------------------------------------------------------------------------


def count_tokens(
    token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-row token counts [B, V] int64 from per-row lists of token ids (one bincount, no V loop)."""
    rows: list[int] = []
    ids: list[int] = []
    for row, toks in enumerate(token_lists):
        if toks and not (0 <= min(toks) and max(toks) < vocab_size):
            bad = next(t for t in toks if not 0 <= t < vocab_size)
            raise RequestError(f"token id {bad!r} is outside the vocabulary (size {vocab_size})")
        rows.extend([row] * len(toks))
        ids.extend(toks)
    b = len(token_lists)
    flat = torch.tensor(rows, dtype=torch.int64) * vocab_size + torch.tensor(ids, dtype=torch.int64)
    counts = torch.bincount(flat, minlength=b * vocab_size)  # [B*V]
    return counts.view(b, vocab_size).to(device)  # [B, V]


def _as_counts(tokens: TokenCounts | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    if tokens is None:
        return None
    if isinstance(tokens, torch.Tensor):
        if tokens.shape != shape:
            raise ValueError(f"token counts must have shape {tuple(shape)}, got {tuple(tokens.shape)}")
        return tokens.to(device)
    if len(tokens) != shape[0]:
        raise ValueError(f"expected {shape[0]} rows of token ids, got {len(tokens)}")
    return count_tokens(tokens, shape[1], device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_tokens: TokenCounts | None,
    output_tokens: TokenCounts | None,
    params_list: Sequence[SamplingParams],
) -> torch.Tensor:
    """Repetition, then frequency and presence penalties. Returns new float32 logits [B, V].

    `prompt_tokens` / `output_tokens`: [B, V] count tensors (what the engine keeps up to date) or
    per-row token id lists. Repetition (CTRL, arXiv:1909.05858, as transformers'
    RepetitionPenaltyLogitsProcessor): for tokens seen in prompt or output, logit / p if logit > 0
    else logit * p. OpenAI rule over output tokens only:
    logit -= frequency * count + presence * (count > 0).
    """
    _check_rows(logits, params_list)
    logits = logits.float()
    if not any(p.has_penalties for p in params_list):
        return logits.clone()
    out = _as_counts(output_tokens, logits.shape, logits.device)
    if any(p.repetition_penalty != 1.0 for p in params_list):
        prompt = _as_counts(prompt_tokens, logits.shape, logits.device)
        logits = _repetition(logits, prompt, out, params_list)
    if out is not None and any(p.presence_penalty or p.frequency_penalty for p in params_list):
        freq = _row_values(logits, [p.frequency_penalty for p in params_list])  # [B, 1]
        pres = _row_values(logits, [p.presence_penalty for p in params_list])  # [B, 1]
        logits = logits - freq * out.to(logits.dtype) - pres * (out > 0).to(logits.dtype)
    return logits


def _repetition(
    logits: torch.Tensor, prompt: torch.Tensor | None, out: torch.Tensor | None, params_list: Sequence[SamplingParams]
) -> torch.Tensor:
    seen = torch.zeros_like(logits, dtype=torch.bool)  # [B, V]
    for counts in (prompt, out):
        if counts is not None:
            seen |= counts > 0
    pen = _row_values(logits, [p.repetition_penalty for p in params_list])  # [B, 1]
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(seen, penalised, logits)


# ---- temperature and masks ---------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, params_list: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature -> top-k -> top-p -> min-p, per row. Returns new float32 logits [B, V].

    Greedy rows are left unscaled (their argmax is unchanged by the masks, which never drop the top token).
    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary survive).
    top-p keeps the smallest set of most probable tokens whose cumulative probability is >= top_p
    (computed as transformers does: drop tokens whose ascending cumulative probability is <= 1 - top_p).
    min-p drops tokens whose probability is < min_p * max probability.
    """
    _check_rows(logits, params_list)
    logits = logits.float()
    if any(not p.is_greedy and p.temperature != 1.0 for p in params_list):
        temps = [1.0 if p.is_greedy else p.temperature for p in params_list]
        logits = logits / _row_values(logits, temps)  # [B, V] / [B, 1]
    else:
        logits = logits.clone()
    use_k = any(p.top_k > 0 for p in params_list)
    use_p = any(p.top_p < 1.0 for p in params_list)
    if use_k or use_p:
        logits = _top_k_top_p(logits, params_list, use_k, use_p)
    if any(p.min_p > 0.0 for p in params_list):
        logits = _min_p(logits, params_list)
    return logits


def _top_k_top_p(logits: torch.Tensor, params_list: Sequence[SamplingParams], use_k: bool, use_p: bool) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, stable=True)  # [B, V] ascending
    if use_k:
        ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params_list]
        kth_pos = torch.tensor([vocab - k for k in ks], device=logits.device)[:, None]  # [B, 1]
        kth = sorted_logits.gather(-1, kth_pos)  # [B, 1]: the k-th largest logit of each row
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -math.inf)
    if use_p:
        # Threshold 1 - top_p computed in float64 on the host, like transformers; -1 switches a row off.
        limit = _row_values(logits, [1.0 - p.top_p if p.top_p < 1.0 else -1.0 for p in params_list])
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V] ascending cumulative probability
        drop = cum <= limit
        drop[:, -1] = False  # the most probable token always survives
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # back to vocabulary order


def _min_p(logits: torch.Tensor, params_list: Sequence[SamplingParams]) -> torch.Tensor:
    probs = logits.softmax(dim=-1)  # [B, V]
    floor = _row_values(logits, [p.min_p for p in params_list]) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < floor, -math.inf)  # rows with min_p 0 have floor 0: no-op


# ---- sampling ----------------------------------------------------------------------------------------


def sample(
    logits: torch.Tensor, params_list: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Next tokens [B] int64 from processed logits [B, V].

    Greedy rows take the argmax (first index on ties) and touch no generator. Other rows draw from
    softmax(logits) by inverse transform (`torch.multinomial`: one uniform number per token, from the
    row's own generator, against the cumulative probabilities), so a row's tokens depend only on its
    seed and its logits, never on the other rows of the batch; masked tokens (probability 0) are never
    drawn.
    """
    _check_rows(logits, params_list)
    if len(generators) != len(params_list):
        raise ValueError(f"expected {len(params_list)} generators, got {len(generators)}")
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [B]
    sampled = [i for i, p in enumerate(params_list) if not p.is_greedy]
    if not sampled:
        return tokens
    probs = logits[sampled].softmax(dim=-1)  # [S, V]
    for row, i in enumerate(sampled):
        gen = generators[i]
        if gen is None:
            raise ValueError(f"row {i} samples (temperature {params_list[i].temperature}) but has no generator")
        tokens[i] = torch.multinomial(probs[row], 1, generator=gen)[0]
    return tokens


# ---- logprobs ----------------------------------------------------------------------------------------


def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw model distribution: log_softmax of the logits *before* penalties,
    temperature and masks (vLLM's default "raw" logprobs; what OpenAI-style clients expect).

    Returns chosen [B] float32, top_ids [B, top_n] int64 and top_logprobs [B, top_n] float32, the
    alternatives sorted by descending log-probability."""
    if not 0 <= top_n <= logits.shape[-1]:
        raise ValueError(f"top_n must be in 0..{logits.shape[-1]}, got {top_n}")
    logp = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(-1, tokens.long()[:, None]).squeeze(-1)  # [B]
    top_logprobs, top_ids = logp.topk(top_n, dim=-1, sorted=True)  # [B, top_n]
    return chosen, top_ids, top_logprobs


# ---- helpers -----------------------------------------------------------------------------------------


def _row_values(logits: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    """Per-row scalars as a [B, 1] float32 column on the logits' device (a host-to-device copy)."""
    return torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]


def _check_rows(logits: torch.Tensor, params_list: Sequence[SamplingParams]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(params_list):
        raise ValueError(f"logits must be [B, V] with B = {len(params_list)} rows, got {tuple(logits.shape)}")
