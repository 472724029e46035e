"""`echo` on /v1/completions: the prompt comes back before the completion, with the log-probability of
each of its tokens given the ones before (the first has none: null, as OpenAI returns it). With
`max_tokens: 0` nothing is generated: the request only scores its prompt, which is how
lm-eval-harness' `local-completions` model computes log-likelihoods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..engine.types import RequestOutput
from ..text.tokenizer import Tokenizer
from .common import completion_logprobs, finite
from .formats import CompletionFormat, total_usage
from .protocol import CompletionChoice, CompletionLogprobs
from .streaming import Choice


@dataclass
class Echo:
    """One prompt's echo: its text and (when logprobs were asked for) its tokens' log-probabilities."""

    text: str
    logprobs: CompletionLogprobs | None


def echoes(tokenizer: Tokenizer, prompts: list[list[int]], scored: list[tuple[torch.Tensor, ...]] | None) -> list[Echo]:
    """scored: per prompt (chosen [T-1], top ids [T-1,k], top logprobs [T-1,k]), or None without logprobs."""
    out = []
    for p, ids in enumerate(prompts):
        text = tokenizer.decode(ids)
        if scored is None:
            out.append(Echo(text, None))
            continue
        chosen, top_ids, top_lp = (t.tolist() for t in scored[p])
        pieces = [tokenizer.decode([t], skip_special=False) for t in ids]
        lp = CompletionLogprobs(
            tokens=pieces,
            token_logprobs=[None, *map(finite, chosen)],
            top_logprobs=[
                None,
                *(
                    {tokenizer.decode([i], skip_special=False): finite(v) for i, v in zip(row_ids, row_lp)}
                    for row_ids, row_lp in zip(top_ids, top_lp)
                ),
            ],
        )
        offset = 0
        for piece in pieces:
            lp.text_offset.append(offset)
            offset += len(piece)
        out.append(Echo(text, lp))
    return out


def _joined(echo: Echo, generated: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if echo.logprobs is None:
        return generated
    if generated is None:
        return echo.logprobs
    shift = sum(len(t) for t in echo.logprobs.tokens)
    return CompletionLogprobs(
        tokens=echo.logprobs.tokens + generated.tokens,
        token_logprobs=echo.logprobs.token_logprobs + generated.token_logprobs,
        top_logprobs=echo.logprobs.top_logprobs + generated.top_logprobs,
        text_offset=echo.logprobs.text_offset + [o + shift for o in generated.text_offset],
    )


class EchoCompletionFormat(CompletionFormat):
    """text_completion with each choice's prompt in front (choice k answers prompt k // n)."""

    def __init__(self, response_id: str, model: str, n: int, logprobs: bool, echoed: list[Echo]) -> None:
        super().__init__(response_id, model, n, logprobs)
        self.echoed = echoed

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            echo = self.echoed[c.index // self.n]
            generated = completion_logprobs(c.logprobs, len(echo.text)) if self.logprobs else None
            out.append(
                CompletionChoice(
                    index=c.index,
                    text=echo.text + c.text,
                    finish_reason=c.finish_reason,
                    logprobs=_joined(echo, generated),
                )
            )
        return self._body(out, total_usage(choices, self.n))

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        echo = self.echoed[choice.index // self.n]
        return self._body([CompletionChoice(index=choice.index, text=echo.text, logprobs=echo.logprobs)], None)

    def chunk(self, choice: Choice, out: RequestOutput, offset: int) -> dict[str, Any] | None:
        return super().chunk(choice, out, offset + len(self.echoed[choice.index // self.n].text))

    def scored_only(self, prompts: list[list[int]]) -> dict[str, Any]:
        """The answer to max_tokens 0: the prompts, nothing generated."""
        choices = [
            Choice(index=k, prompt_tokens=len(prompts[k // self.n]), finish_reason="length")
            for k in range(len(prompts) * self.n)
        ]
        return self.response(choices)
