"""Prometheus metrics of one engine (its own registry, so tests can run several engines)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..decoding.speculative import SpeculationStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 512, 1024, 2048, 4096)


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("tramontane_http_requests", "HTTP requests by status code", ["status"], registry=r)
        self.finished = Counter(
            "tramontane_requests_finished", "Engine requests by finish reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("tramontane_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tramontane_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "tramontane_time_to_first_token_seconds", "Submit to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "tramontane_inter_token_latency_seconds",
            "Time between a request's tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_requests = Histogram(
            "tramontane_step_requests", "Requests in one forward step", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_tokens = Histogram(
            "tramontane_step_tokens", "Tokens in one forward step", buckets=TOKEN_BUCKETS, registry=r
        )
        # A step's wall time (schedule, layout, forward, sampling, detokenizing, emitting) and the forward's
        # part of it (the model and the logits): the rest is the engine's per-step overhead.
        self.step_seconds = Counter("tramontane_step_seconds", "Wall time of engine steps", registry=r)
        self.forward_seconds = Counter("tramontane_forward_seconds", "Model forward time within steps", registry=r)
        self.queue_depth = Gauge("tramontane_queue_depth", "Requests waiting to run", registry=r)
        self.running = Gauge("tramontane_running_requests", "Requests running", registry=r)
        self.kv_used = Gauge("tramontane_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("tramontane_kv_blocks_free", "KV cache blocks free", registry=r)
        self.prefix_queries = Gauge("tramontane_prefix_cache_queries", "Prefix-cache block look-ups", registry=r)
        self.prefix_hits = Gauge("tramontane_prefix_cache_hits", "Prefix-cache block hits", registry=r)
        self.prefix_hit_rate = Gauge("tramontane_prefix_cache_hit_rate", "Hits / look-ups", registry=r)
        self.preemptions = Gauge("tramontane_preemptions", "Requests preempted so far", registry=r)
        # speculative decoding: passes verifying drafts, tokens drafted, kept, and emitted by those passes
        self.spec_passes = Counter("tramontane_speculative_passes", "Steps that verified a draft", registry=r)
        self.spec_drafted = Counter("tramontane_speculative_drafted_tokens", "Tokens drafted", registry=r)
        self.spec_accepted = Counter("tramontane_speculative_accepted_tokens", "Drafted tokens kept", registry=r)
        self.spec_emitted = Counter("tramontane_speculative_emitted_tokens", "Tokens verification gave", registry=r)
        self.spec_acceptance = Gauge(
            "tramontane_speculative_acceptance_rate", "Drafted tokens kept / drafted, so far", registry=r
        )
        self.spec_per_pass = Gauge(
            "tramontane_speculative_tokens_per_pass", "Tokens a verifying step gives a request, so far", registry=r
        )

    def record_speculation(self, now: SpeculationStats, before: SpeculationStats) -> None:
        self.spec_passes.inc(now.passes - before.passes)
        self.spec_drafted.inc(now.drafted - before.drafted)
        self.spec_accepted.inc(now.accepted - before.accepted)
        self.spec_emitted.inc(now.emitted - before.emitted)
        self.spec_acceptance.set(now.acceptance)
        self.spec_per_pass.set(now.tokens_per_pass)

    def record_http(self, status: int) -> None:
        self.http_requests.labels(status=str(status)).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
