"""The engine loop (one thread: schedule -> run -> update) and its asyncio front: submit, stream, abort.

The model runs in the engine thread only; the asyncio side talks to it through an inbox queue and
receives outputs through an `Outbox` (outbox.py: a wake-up that does not hand the GIL to the loop). An
exception inside a step fails the requests of that step (finish_reason "error") and the loop goes on
with the others.

Embeddings and prompt scoring are jobs (prompt_jobs.py) whose prompts run as background sequences:
chunked like prefill, paced beside generating requests (pacing.py), and dropped between two steps
once their caller has gone.

A request with a `speculation` gets a draft before each of its decoding steps (decoding/speculative.py:
prompt lookup or a draft model); the step runs its last token and the draft, and verification emits up
to k + 1 tokens at once: greedy answers are those of plain decoding, sampled ones keep their
distribution. A sampled request with a seed does not speculate (its answer depends on its seed alone).
A draft model's work and memory are budgeted like the model's own: in a step, the draft models read at
most `max_num_batched_tokens` tokens in all (a long prompt is read over several steps, its request
decoding without drafts until then), and the draft caches come out of `kv_cache_memory`: the memory is
split between the pool and the draft caches in the ratio of their bytes per token, so both hold as many
tokens; a draft cache grows only into what the others leave free, and a request whose cache cannot
grow decodes without drafts until room frees."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from ..build.backend import select_backend
from ..config import ModelConfig
from ..decoding.sampling import SamplingParams
from ..decoding.sequence import Delta, SequenceState, TokenLogprob, greedy_bias, pick_tokens
from ..decoding.speculative import Drafter, Speculation, SpeculationStats, accept
from ..model.cache import PagedCache
from ..model.kv_types import KvType
from ..parallel.dist import broadcast_object, is_parallel
from .blocks import BlockPool, bytes_per_block
from .metrics import EngineMetrics
from .outbox import Outbox
from .pacing import Pace
from .prompt_jobs import PromptJob, Result, Scores
from .release import release_idle_workers
from .runner import StepBuffers, StepOutput, run_step
from .scheduler import EngineSequence, Scheduler
from .types import (
    ContextLengthError,
    EngineRequest,
    EngineUnavailableError,
    QueueFullError,
    RequestOutput,
    ServedModel,
    UnknownAdapterError,
)

log = logging.getLogger("tramontane.engine")
JOB_WIDTH = 8  # prompts of one embeddings / scoring job in the scheduler at once
GENERATION_GRACE = 1.0  # seconds background work stays paced after the last generating request (its client's next)
_job_ids = itertools.count()


class AsyncEngine:
    def __init__(
        self,
        llm: ServedModel,
        *,
        model_name: str,
        kv_cache_memory: int,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        max_running: int = 64,
        max_queued: int = 256,
        dtype: torch.dtype | str | KvType = torch.float32,
        speculation: Speculation | None = None,
    ) -> None:
        self.model, self.tokenizer, self.config = llm.model, llm.tokenizer, llm.config
        self.speculation = speculation  # speculative decoding for requests that do not say (None: off)
        if speculation is not None:
            speculation.check_vocabulary(self.config.vocab_size)
        self.model_name, self.max_model_len, self.max_queued = model_name, llm.config.max_seq_len, max_queued
        pool_memory, self._draft_room = _split_memory(kv_cache_memory, self.model.config, dtype, speculation)
        num_blocks = pool_memory // bytes_per_block(self.model.config, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory {kv_cache_memory} bytes holds no block of {block_size} tokens"
                + (
                    f" (the draft model's caches take {kv_cache_memory - pool_memory} of them)"
                    if self._draft_room
                    else ""
                )
            )
        if is_parallel():  # the other ranks build the same pool over their heads (runner.follow)
            broadcast_object(("pool", num_blocks, block_size, dtype))
        self.pool = BlockPool(self.model.config, num_blocks, block_size, dtype)
        self._buffers = StepBuffers()  # where each step is laid out (engine/runner.py)
        self.backend = select_backend(self.model, PagedCache, dtype)
        log.info(
            "decode backend: %s (paged cache; offline generation: %s)",
            self.backend.name,
            getattr(llm, "backend", self.backend).name,
        )
        self.scheduler = Scheduler(
            self.pool,
            model_name=model_name,
            window=self.config.sliding_window,
            max_num_batched_tokens=max_num_batched_tokens,
            max_running=max_running,
        )
        self.metrics = EngineMetrics()
        self.speculation_stats = SpeculationStats()
        self._inbox: queue.Queue = queue.Queue()
        self._seqs: dict[str, EngineSequence] = {}
        self._jobs: dict[str, PromptJob] = {}
        self._job_seqs: dict[str, tuple[PromptJob, int, EngineSequence]] = {}  # request id -> job, prompt index
        self._pace = Pace(floor=4, ceiling=max_num_batched_tokens)
        self._last_generation = -GENERATION_GRACE
        self._streams: dict[str, asyncio.Queue] = {}
        self._arrival: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self._pending_adds = 0
        self._outbox: Outbox[RequestOutput] | None = None
        self._thread: threading.Thread | None = None
        self.accepting = False
        self._update_gauges()

    # ---- asyncio side -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread. The calling thread hands back its idle OpenMP workers first
        (engine/release.py): a program that loaded the model (or ran torch) on this thread kept a pool
        whose idle worker stopped the engine thread's from spinning, 72 against 291 tok/s for one
        request on 2 CPUs (SmolLM2 Q4_1); the server's loading thread does the same."""
        release_idle_workers()
        self._outbox = Outbox(asyncio.get_running_loop(), self._deliver)
        self._thread = threading.Thread(target=self._run, name="tramontane-engine", daemon=True)
        self._thread.start()
        self.accepting = True

    @property
    def adapters(self) -> set[str]:
        """Names of the LoRA adapters loaded into the model (requests pick one by name)."""
        selection = getattr(self.model, "lora_selection", None)
        return set(selection.adapters) if selection is not None else set()

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_admission(self, request: EngineRequest) -> None:
        if not self.accepting or not self.is_healthy():
            raise EngineUnavailableError("the engine is not accepting requests (loading, draining or stopped)")
        prompt, wanted = len(request.prompt_token_ids), request.params.max_tokens or 0
        if prompt == 0:
            raise ContextLengthError("the prompt is empty")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UnknownAdapterError(
                f"no LoRA adapter named {request.adapter!r} is loaded "
                f"(loaded: {', '.join(sorted(self.adapters)) or 'none'})"
            )
        if prompt + max(wanted, 1) > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; "
                f"the request has {prompt} prompt tokens and asks for {wanted} more"
            )
        self._check_queue()

    def queued(self) -> int:
        """Requests submitted and not yet running (read from the event loop: a snapshot)."""
        return len(self.scheduler.waiting) + self._pending_adds

    def _check_queue(self) -> None:
        if len(self.scheduler.waiting) + self._pending_adds + len(self._jobs) >= self.max_queued:
            raise QueueFullError(f"{self.max_queued} requests are already waiting; try again later")

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self._check_admission(request)
        rid = request.request_id
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = stream
        self._arrival[rid] = time.monotonic()
        self._pending_adds += 1
        self._inbox.put(("add", request))
        finished = False
        try:
            while True:
                out = await stream.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Each prompt's final hidden states, mean-pooled and L2-normalised."""
        return [r for r in await self._run_job("embed", token_ids, 0, None) if isinstance(r, list)]

    async def prompt_logprobs(self, token_ids: list[list[int]], top: int, adapter: str | None = None) -> list[Scores]:
        """Per prompt, log p(token k | tokens before k) for k = 1..T-1 [T-1], and the `top` most likely
        ids and their log-probabilities at each of those positions [T-1, top] (echo with logprobs)."""
        return [r for r in await self._run_job("score", token_ids, top, adapter) if isinstance(r, tuple)]

    async def _run_job(self, kind: str, prompts: list[list[int]], top: int, adapter: str | None) -> list[Result]:
        if not self.accepting or not self.is_healthy():
            raise EngineUnavailableError("the engine is not accepting requests (loading, draining or stopped)")
        if any(len(ids) == 0 for ids in prompts):
            raise ContextLengthError("a prompt is empty")
        self._check_queue()
        job = PromptJob(f"job-{next(_job_ids)}", "embed" if kind == "embed" else "score", prompts, top, adapter)
        self._jobs[job.job_id] = job
        self._inbox.put(("job", job))
        try:
            return await asyncio.wrap_future(job.future)  # cancelled with the caller: the engine drops the job
        finally:
            if not job.future.done():
                job.future.cancel()

    async def load_adapter(self, name: str, folder: str) -> None:
        """Load a LoRA adapter folder (PEFT layout) under `name` between two steps, while serving: the
        requests that name it get it from the next step on (a fine-tuning job's result)."""
        if is_parallel():
            raise EngineUnavailableError("adapters cannot be added to a model split over ranks")
        if not self.is_healthy():
            raise EngineUnavailableError("the engine is not running")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._inbox.put(("adapter", name, folder, done))
        await asyncio.wrap_future(done)

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new work, let running and waiting requests finish (up to the timeout), stop the thread."""
        self.accepting = False
        deadline = time.monotonic() + drain_timeout
        while (self._seqs or self._pending_adds or self._jobs) and time.monotonic() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        self._inbox.put(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        if self._outbox is not None and not (self._thread is not None and self._thread.is_alive()):
            self._outbox.close()

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.put_nowait(out)

    # ---- engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._flush()  # what the last step emitted, before waiting for work
                if not self._drain_inbox(block=not self._seqs and not self._jobs):
                    return
                self._drop_departed_jobs()
                if self._seqs or self._jobs:
                    self._step()
        finally:
            self._flush()  # what an escaping error left queued
            for job in list(self._jobs.values()):
                self._drop_job(job, EngineUnavailableError("the engine stopped"))
            if is_parallel():
                broadcast_object(("stop",))  # the other ranks' follow loops end with this one

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; False when told to stop."""
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            getattr(self, "_on_" + command[0])(*command[1:])
            self._flush()  # a refusal it emitted does not wait behind the next command (an adapter's load)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _on_add(self, request: EngineRequest) -> None:
        self._pending_adds -= 1
        if request.request_id not in self._streams:
            return  # the client left before the engine saw the request
        try:
            state = SequenceState(
                0,
                list(request.prompt_token_ids),
                request.params,
                self.tokenizer,
                self.max_model_len,
                request.min_tokens,
                context_reason="model_length",
            )
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            self._emit(RequestOutput(request.request_id, finish_reason="error", error=str(e)))
            return
        seq = EngineSequence(request, state)
        speculation = self.speculation if request.speculate is not False else None
        if request.speculate and speculation is None:
            speculation = Speculation()
        if speculation is not None and request.task == "generate" and not _seeded_sampling(request.params):
            seq.drafter = self._drafter(speculation, len(request.prompt_token_ids) + state.max_tokens)
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def _on_adapter(self, name: str, folder: str, done: concurrent.futures.Future[None]) -> None:
        from ..lora.layers import set_active
        from ..lora.peft import load_adapter

        if not done.set_running_or_notify_cancel():  # its caller has gone (the server is stopping)
            return
        try:
            load_adapter(self.model, folder, name)
            set_active(self.model, None)  # requests pick adapters per row; the next step reselects the backend
        except Exception as e:  # noqa: BLE001 - a bad adapter is the caller's error; serving goes on
            done.set_exception(e)
        else:
            done.set_result(None)

    def _on_abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.remove(seq)
            self.metrics.finished.labels(reason="abort").inc()
            self._forget(request_id)
            self._update_gauges()

    # ---- embeddings and scoring jobs ----------------------------------------------------------------
    def _on_job(self, job: PromptJob) -> None:
        if job.job_id in self._jobs:  # not dropped (client gone) before the engine saw it
            self._feed(job)

    def _feed(self, job: PromptJob) -> None:
        """Hand the job's next prompts to the scheduler, up to JOB_WIDTH at once."""
        while job.in_flight() < JOB_WIDTH and (index := job.take()) is not None:
            request = EngineRequest(
                f"{job.job_id}#{index}",
                job.prompts[index],
                SamplingParams(max_tokens=1),
                task=job.kind,
                adapter=job.adapter,
            )
            state = SequenceState(0, list(request.prompt_token_ids), request.params, self.tokenizer, self.max_model_len)
            seq = EngineSequence(request, state)
            self._job_seqs[request.request_id] = (job, index, seq)
            self.scheduler.add(seq)

    def _drop_departed_jobs(self) -> None:
        for job in [j for j in list(self._jobs.values()) if j.future.cancelled()]:
            self._drop_job(job, None)
            self.metrics.finished.labels(reason="abort").inc()

    def _drop_job(self, job: PromptJob, error: BaseException | None) -> None:
        """Take the job's sequences out of the scheduler (releasing their blocks) and settle it."""
        self._jobs.pop(job.job_id, None)
        for rid, (owner, _, seq) in list(self._job_seqs.items()):
            if owner is job:
                self.scheduler.remove(seq)
                del self._job_seqs[rid]
        if error is not None:
            job.settle(error)

    def _fold(self, batch: list[tuple[EngineSequence, int]], starts: list[int], out: StepOutput) -> None:
        """The step's outputs of background sequences into their jobs; finished prompts make room."""
        offset = 0
        for i, (seq, n) in enumerate(batch):
            entry = self._job_seqs.get(seq.request_id) if seq.background else None
            if entry is not None:
                job, index, _ = entry
                logits = out.logits[out.scored[i]] if i in out.scored else None
                job.fold(index, starts[i], out.hidden[offset : offset + n], logits)
                if seq.num_computed == seq.num_tokens:
                    self._finish_prompt(job, index, seq)
            offset += n

    def _finish_prompt(self, job: PromptJob, index: int, seq: EngineSequence) -> None:
        self.scheduler.remove(seq)
        del self._job_seqs[seq.request_id]
        if job.finish(index):
            self._jobs.pop(job.job_id, None)
            self.metrics.finished.labels(reason="stop").inc()
            self.metrics.prompt_tokens.inc(sum(map(len, job.prompts)))
            job.settle()
        else:
            self._feed(job)

    def _generating(self) -> bool:
        return bool(self.scheduler.waiting) or any(not s.background for s in self.scheduler.running)

    def _step(self) -> None:
        generating = self._generating()
        if generating:
            self._last_generation = time.monotonic()
        paced = generating or time.monotonic() - self._last_generation < GENERATION_GRACE
        scheduling = time.perf_counter()
        self._draft()
        batch, hopeless = self.scheduler.schedule(self._pace.tokens() if paced else None)
        for seq in hopeless:
            self._end_hopeless(seq)
        if not batch:
            self._update_gauges()
            time.sleep(0.001)
            return
        starts = [seq.num_computed for seq, _ in batch]
        began = time.perf_counter()
        try:
            if not self.backend.current():  # a module swap since (adapters applied to the model): pick again
                self.backend = select_backend(self.model, PagedCache, self.pool.kv)
            self._flush()  # anything emitted since the loop's top (a hopeless request's end)
            bias = greedy_bias([seq.state for seq, _ in batch if not seq.background])
            out = run_step(self.backend, self.pool, batch, self.config.sliding_window, self._buffers, bias)
            self.scheduler.after_step(batch)
            self._sample(batch, out)
            self._fold(batch, starts, out)
            self.metrics.forward_seconds.inc(out.seconds)
            self.metrics.step_seconds.inc(time.perf_counter() - scheduling)
        except Exception as e:  # noqa: BLE001 - this step's requests fail; the engine goes on
            log.exception("engine step failed")
            self._fail_step(batch, e)
        background = sum(n for seq, n in batch if seq.background)
        if background < sum(n for _, n in batch):  # a step with generating requests: what pacing steers by
            self._pace.observe(time.perf_counter() - began, background)
        self.metrics.step_requests.observe(len(batch))
        self.metrics.step_tokens.observe(sum(n for _, n in batch))
        self._update_gauges()

    def _end_hopeless(self, seq: EngineSequence) -> None:
        """A request whose next token can never fit the KV pool: `length`, or its job fails."""
        entry = self._job_seqs.get(seq.request_id)
        if entry is not None:
            self._drop_job(
                entry[0], ContextLengthError(f"a prompt of {len(seq.tokens)} tokens does not fit the KV cache")
            )
        elif not seq.background:
            self._finish(
                seq, RequestOutput(seq.request_id, finish_reason="length", prompt_tokens=len(seq.state.prompt))
            )

    def _fail_step(self, batch: list[tuple[EngineSequence, int]], e: Exception) -> None:
        for seq, _ in batch:
            entry = self._job_seqs.get(seq.request_id)
            if entry is not None:
                self._drop_job(entry[0], RuntimeError(f"the engine step failed: {e!r}"))
            elif seq.request_id in self._seqs:
                self._finish(seq, RequestOutput(seq.request_id, finish_reason="error", error=repr(e)))

    def _drafter(self, speculation: Speculation, tokens: int) -> Drafter:
        """A request's drafter (a draft model's cache for at most its prompt and answer, and at each step
        for what the draft memory has left: `_draft`)."""
        if speculation.draft is None:
            return speculation.drafter()
        return speculation.drafter(capacity=min(tokens, self.max_model_len) + speculation.num_tokens)

    def _draft(self) -> None:
        """Each speculating request about to decode guesses its next tokens (a draft the step verifies).
        The draft models read at most a step's token budget in all, the requests whose drafters are
        caught up first (a long prompt being read takes what they leave), and their caches grow only
        into the draft memory the live requests' caches leave free (`_split_memory`). A drafter that
        fails (a draft model's step) stops drafting for its request, which decodes on."""
        budget = self.scheduler.max_batched
        free = self._draft_room - sum(s.drafter.held for s in self._seqs.values() if s.drafter is not None)
        ready = [s for s in self.scheduler.running if s.drafter is not None and s.num_computed == s.num_tokens - 1]
        for seq in sorted(ready, key=lambda s: s.drafter.unread(s.tokens)):  # type: ignore[union-attr]
            drafter = seq.drafter
            assert drafter is not None
            room, held = seq.state.max_tokens - len(seq.state.output) - 1, drafter.held
            try:
                seq.draft = drafter.propose(seq.tokens, room, budget, held + max(free, 0))
                budget -= drafter.spent
                free -= drafter.held - held
            except Exception:  # noqa: BLE001 - drafting is an optimisation: the answer does not need it
                log.exception("request %s: drafting failed; it decodes without drafts", seq.request_id)
                seq.drafter, seq.draft = None, []

    def _sample(self, batch: list[tuple[EngineSequence, int]], step: StepOutput) -> None:
        for i in step.drafted:
            self._verify(batch[i][0], step.verify_logits(i))
        logits = step.logits
        rows = [
            i
            for i, (seq, _) in enumerate(batch)
            if not seq.background and seq.num_computed == seq.num_tokens and i not in step.drafted
        ]
        if not rows:
            return
        seqs = [batch[i][0] for i in rows]
        if step.tokens is not None:  # the backend's greedy tokens of every row (run_step)
            self._emit_tokens([(seq, token, None) for seq, token in zip(seqs, step.tokens[rows].tolist())])
            return
        # the usual step samples every row, in order: the logits as they are, or a view (16 rows: 3 MB;
        # a torch call costs ~30 us here)
        if rows[-1] != len(rows) - 1:
            chosen = logits[rows]
        else:
            chosen = logits if len(rows) == logits.shape[0] else logits[: len(rows)]
        try:
            tokens, logprobs = pick_tokens([s.state for s in seqs], chosen, self.tokenizer, self.backend.argmax)
            picked = list(zip(seqs, tokens.tolist(), logprobs))
        except Exception:  # noqa: BLE001 - find the request at fault: sample the rows one by one
            picked = self._pick_each(seqs, chosen)
        self._emit_tokens(picked)

    def _emit_tokens(self, picked: Sequence[tuple[EngineSequence, int, TokenLogprob | None]]) -> None:
        """Each request's new token into its state and out to its client (or its end)."""
        now = time.monotonic()
        for seq, token, lp in picked:
            try:
                delta = seq.state.append(token, lp)
            except Exception as e:  # noqa: BLE001 - detokenizing, a grammar or a stop rule failed this request
                self._fail(seq, e)
                continue
            self._time_token(seq.request_id, now)
            out = RequestOutput(
                seq.request_id,
                delta.text,
                [token],
                delta.logprobs,
                delta.finish_reason,
                len(seq.state.prompt),
                len(seq.state.output),
                seq.num_cached,
            )
            if delta.finish_reason:
                self._finish(seq, out)
            else:
                self._emit(out)

    def _verify(self, seq: EngineSequence, logits: torch.Tensor) -> None:
        """Emit what verifying the request's draft gives (logits [k + 1, V]): its kept tokens and one more."""
        draft, before = list(seq.draft), SpeculationStats(**vars(self.speculation_stats))
        assert seq.drafter is not None
        try:
            deltas = list(accept(seq.state, logits, draft, seq.drafter, self.tokenizer, self.speculation_stats))
        except Exception as e:  # noqa: BLE001 - detokenizing, a grammar or a stop rule failed this request
            seq.draft = []
            self._fail(seq, e)
            return
        self.scheduler.accepted(seq, self.speculation_stats.accepted - before.accepted)
        self.metrics.record_speculation(self.speculation_stats, before)
        self._time_token(seq.request_id, time.monotonic(), len(deltas))
        out = _merged(seq, deltas)
        if out.finish_reason:
            self._finish(seq, out)
        else:
            self._emit(out)

    def _pick_each(self, seqs: list[EngineSequence], logits: torch.Tensor) -> list[tuple[EngineSequence, int, Any]]:
        """Sampling row by row after a batched failure: a row that fails again fails its request alone."""
        picked = []
        for i, seq in enumerate(seqs):
            try:
                tokens, logprobs = pick_tokens([seq.state], logits[i : i + 1], self.tokenizer, self.backend.argmax)
            except Exception as e:  # noqa: BLE001 - this request's sampling (grammar, logprobs) failed
                self._fail(seq, e)
                continue
            picked.append((seq, int(tokens[0]), logprobs[0]))
        return picked

    def _fail(self, seq: EngineSequence, exc: Exception) -> None:
        log.error("request %s failed: %s: %s", seq.request_id, type(exc).__name__, exc)
        self._finish(
            seq,
            RequestOutput(
                seq.request_id,
                finish_reason="error",
                error=f"{type(exc).__name__}: {exc}",
                prompt_tokens=len(seq.state.prompt),
            ),
        )

    def _time_token(self, rid: str, now: float, count: int = 1) -> None:
        previous = self._last_token.get(rid)
        if previous is None:
            self.metrics.ttft.observe(now - self._arrival.get(rid, now))
        else:
            self.metrics.itl.observe(now - previous)
        self._last_token[rid] = now
        self.metrics.generation_tokens.inc(count)

    def _finish(self, seq: EngineSequence, out: RequestOutput) -> None:
        self.scheduler.remove(seq)
        self._seqs.pop(seq.request_id, None)
        self.metrics.finished.labels(reason=out.finish_reason).inc()
        self.metrics.prompt_tokens.inc(len(seq.state.prompt))
        self._forget(seq.request_id)
        self._emit(out)

    def _forget(self, rid: str) -> None:
        self._arrival.pop(rid, None)
        self._last_token.pop(rid, None)

    def _emit(self, out: RequestOutput) -> None:
        """Queue out for its stream: the loop gets it at the next _flush (once the step is done, at the
        top of _run; before a forward; after an inbox command)."""
        if self._outbox is not None:
            self._outbox.put(out)

    def _flush(self) -> None:
        if self._outbox is not None:
            self._outbox.flush()

    def _update_gauges(self) -> None:
        m, pool = self.metrics, self.pool
        m.queue_depth.set(len(self.scheduler.waiting))
        m.running.set(len(self.scheduler.running))
        m.kv_used.set(pool.num_used)
        m.kv_free.set(pool.num_free)
        m.prefix_queries.set(pool.queries)
        m.prefix_hits.set(pool.hits)
        m.prefix_hit_rate.set(pool.hits / pool.queries if pool.queries else 0.0)
        m.preemptions.set(self.scheduler.preemptions)


def _split_memory(
    memory: int, config: ModelConfig, kv: torch.dtype | str | KvType, speculation: Speculation | None
) -> tuple[int, int]:
    """(bytes for the pool, tokens the draft caches may hold): with a draft model, `memory` shared in the
    ratio of bytes per token (the model's, the draft model's), so both hold as many tokens."""
    draft = speculation.draft_bytes_per_token() if speculation is not None else 0
    if not draft:
        return memory, 0
    own = bytes_per_block(config, 1, kv)
    pool = memory * own // (own + draft)
    return pool, (memory - pool) // draft


def _seeded_sampling(params: SamplingParams) -> bool:
    """A sampled request with a seed: its tokens must depend only on its seed and logits, and verifying
    drafts draws its random numbers by how long each draft was, which the step budget (so the other
    requests) decides; such a request decodes without drafts."""
    return not params.is_greedy and params.seed is not None


def _merged(seq: EngineSequence, deltas: list[Delta]) -> RequestOutput:
    """One output for the tokens one step gave a request (a verified draft gives several)."""
    return RequestOutput(
        seq.request_id,
        "".join(d.text for d in deltas),
        [t for d in deltas for t in d.token_ids],
        [lp for d in deltas for lp in d.logprobs],
        deltas[-1].finish_reason,
        len(seq.state.prompt),
        len(seq.state.output),
        seq.num_cached,
    )
