"""Evaluation: perplexity with a sliding window, and multiple-choice accuracy by log-likelihood.

Perplexity follows the fixed-length-model recipe of transformers' documentation: windows of `context`
tokens start every `stride` tokens; each window scores only the tokens the previous window did not
(so every token after the first is scored once, with up to `context - stride` tokens of history).
Worked example, 10 tokens, context 4, stride 2: windows [0,4) scores tokens 1-3, [2,6) scores 4-5,
[4,8) scores 6-7, [6,10) scores 8-9. Perplexity = exp(mean negative log-likelihood of scored tokens).

Multiple choice: each choice is scored as the sum of its tokens' log-probabilities after the question
("acc"), and per character of the choice ("acc_norm", lm-eval-harness' length normalisation)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RequestError
from .progress import tracked


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens (see the module docstring)."""
    if context < 2 or not 0 < stride <= context:
        raise RequestError(f"--context must be >= 2 and --stride in 1..context, got {context} and {stride}")
    out, scored_to = [], 1
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        if end > scored_to:
            out.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == n:
            break
    return out


def perplexity(llm: Any, ids: list[int], context: int, stride: int, progress: bool = False) -> Perplexity:
    """Sliding-window perplexity of token ids under `llm` (tramontane.LLM); `progress`: show the windows
    scored (progress.py)."""
    if len(ids) < 2:
        raise RequestError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    context = min(context, llm.config.max_seq_len)
    total, count, spans = 0.0, 0, windows(len(ids), context, stride)
    for begin, end, first in tracked(spans, len(spans), "perplexity", "windows", progress):
        logp = llm.score(ids[begin:end])  # [end-begin-1]: log p(ids[k] | ids[begin:k]) for k in begin+1..end-1
        scored = logp[first - begin - 1 :]
        total -= float(scored.double().sum())
        count += scored.numel()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(spans))


@dataclass
class ChoiceResult:
    accuracy: float  # argmax of the summed log-likelihood
    accuracy_norm: float  # argmax of the log-likelihood per character of the choice
    items: int


def read_choices(path: Path) -> list[dict[str, Any]]:
    """JSONL lines {"question": str, "choices": [str, ...], "answer": index or the answer's text}."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise RequestError(f"{path}:{number}: not JSON ({exc})") from None
        choices = item.get("choices") if isinstance(item, dict) else None
        answer = item.get("answer") if isinstance(item, dict) else None
        if answer in (choices or []) and isinstance(answer, str):
            answer = choices.index(answer)
        if (
            not isinstance(item.get("question") if isinstance(item, dict) else None, str)
            or not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)
            or type(answer) is not int
            or not 0 <= answer < len(choices)
        ):
            raise RequestError(
                f'{path}:{number}: expected {{"question": str, "choices": [str, ...], "answer": index or choice text}}'
            )
        items.append({"question": item["question"], "choices": choices, "answer": answer})
    if not items:
        raise RequestError(f"{path}: no items")
    return items


def continuation_logprob(llm: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), the continuation's tokens being those that follow the context's in
    the encoding of the whole text (as lm-eval-harness splits them)."""
    tok = llm.tokenizer
    whole = tok.encode(context + continuation, add_bos=tok.default_add_bos)
    head = tok.encode(context, add_bos=tok.default_add_bos)
    start = len(head)
    while start > 0 and whole[:start] != head[:start]:
        start -= 1  # the boundary token merged across context and continuation
    start = max(start, 1)
    logp = llm.score(whole)  # [len-1]
    return float(logp[start - 1 :].double().sum())


def choice_accuracy(llm: Any, items: list[dict[str, Any]], progress: bool = False) -> ChoiceResult:
    right = right_norm = 0
    for item in tracked(items, len(items), "scoring", "items", progress):
        scores = [continuation_logprob(llm, item["question"], " " + c) for c in item["choices"]]
        norm = [s / max(len(c), 1) for s, c in zip(scores, item["choices"])]
        right += int(torch.tensor(scores).argmax()) == item["answer"]
        right_norm += int(torch.tensor(norm).argmax()) == item["answer"]
    return ChoiceResult(right / len(items), right_norm / len(items), len(items))
