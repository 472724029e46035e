"""Embeddings and prompt scoring as engine work.

A job is one HTTP request's prompts. The engine feeds a few of them at a time to the scheduler as
background sequences (chunked under the step's token budget, like prefill), and after each step folds
the outputs of their tokens in here: for an embedding, the sum of the final hidden states; for
scoring, each position's log-probability of the token that follows it and the `top` most likely
alternatives. A sequence that is preempted starts again from position 0, and so does its partial.

    job = PromptJob("embd-1", "embed", [[1, 2, 3], [4, 5]], top=0)
    job.take()                       # 0: the first prompt goes to the scheduler
    job.fold(0, 0, hidden, None)     # hidden [3,dim] of positions 0..2
    job.finish(0)                    # the prompt is done: its vector is kept
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Literal

import torch

Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # chosen [T-1], top ids [T-1,top], top logprobs
Result = list[float] | Scores


@dataclass
class _Embedding:
    total: torch.Tensor | None = None  # [dim] float64 sum of the hidden states so far
    count: int = 0

    def add(self, hidden: torch.Tensor) -> None:
        part = hidden.double().sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.count += hidden.shape[0]

    def result(self) -> list[float]:
        """Mean over the tokens, L2-normalised."""
        assert self.total is not None
        return torch.nn.functional.normalize((self.total / self.count).float(), dim=0).tolist()


@dataclass
class _Scores:
    prompt: list[int]
    top: int
    chosen: list[torch.Tensor] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_lp: list[torch.Tensor] = field(default_factory=list)

    def add(self, start: int, logits: torch.Tensor) -> None:
        """logits [n,V] of positions start..start+n-1; position k scores token k+1 (the last has none)."""
        m = min(logits.shape[0], len(self.prompt) - 1 - start)
        if m <= 0:
            return
        logp = logits[:m].float().log_softmax(-1)  # [m,V]
        following = torch.tensor(self.prompt[start + 1 : start + 1 + m])[:, None]  # [m,1]
        self.chosen.append(logp.gather(-1, following).squeeze(-1))
        values, indices = logp.topk(self.top, dim=-1)
        self.top_lp.append(values)
        self.top_ids.append(indices)

    def result(self) -> Scores:
        if not self.chosen:  # a one-token prompt: nothing to score
            return torch.zeros(0), torch.zeros(0, self.top, dtype=torch.long), torch.zeros(0, self.top)
        return torch.cat(self.chosen), torch.cat(self.top_ids), torch.cat(self.top_lp)


class PromptJob:
    """The prompts of one embeddings or scoring request, their partial outputs, and the future its
    caller awaits (cancelled when the client leaves: the engine then drops the job)."""

    def __init__(
        self,
        job_id: str,
        kind: Literal["embed", "score"],
        prompts: list[list[int]],
        top: int = 0,
        adapter: str | None = None,
    ) -> None:
        self.job_id, self.kind, self.prompts, self.top, self.adapter = job_id, kind, prompts, top, adapter
        self.future: Future[list[Result]] = Future()
        self.results: list[Result | None] = [None] * len(prompts)
        self.partials: dict[int, _Embedding | _Scores] = {}
        self.next = 0  # the next prompt to hand to the scheduler
        self.running: set[int] = set()  # prompts handed out and not finished
        self.done = 0

    def take(self) -> int | None:
        """The index of the next prompt to run, or None when all have been handed out."""
        if self.next == len(self.prompts):
            return None
        self.next += 1
        self.running.add(self.next - 1)
        return self.next - 1

    def in_flight(self) -> int:
        return len(self.running)

    def fold(self, index: int, start: int, hidden: torch.Tensor, logits: torch.Tensor | None) -> None:
        """One step's output for prompt `index`, positions start..start+n-1: hidden [n,dim]; for
        scoring, logits [n,V]."""
        if start == 0 or index not in self.partials:  # first chunk, or again after a preemption
            self.partials[index] = _Embedding() if self.kind == "embed" else _Scores(self.prompts[index], self.top)
        partial = self.partials[index]
        if isinstance(partial, _Embedding):
            partial.add(hidden)
        else:
            assert logits is not None
            partial.add(start, logits)

    def finish(self, index: int) -> bool:
        """Prompt `index` has run to its end; True when it was the job's last."""
        self.results[index] = self.partials.pop(index).result()
        self.running.discard(index)
        self.done += 1
        return self.done == len(self.prompts)

    def settle(self, error: BaseException | None = None) -> None:
        """Hand the results (or the error) to the caller, unless it has gone (a cancelled future)."""
        with contextlib.suppress(InvalidStateError):
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result([r for r in self.results if r is not None])
