"""Prometheus metrics of the generation engine, with vLLM's names where one fits.

One `GenerationMetrics` per server (on the app's own CollectorRegistry, which GET /metrics
exports; tests run several apps in one process), shared by all its engines and labelled by
model name; each engine reads its own children through `LabelledMetrics`. Never imports
onnxruntime.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_CHUNK_BUCKETS_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class GenerationMetrics:
    """Every generation metric, registered on one CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "appliance_time_to_first_token_seconds", "Time from submission to the first generated token.", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.time_per_output_token = Histogram(
            "appliance_time_per_output_token_seconds", "Inter-token latency after the first token.", ["model"],
            buckets=_TOKEN_BUCKETS_S, registry=r,
        )
        self.e2e_request_latency = Histogram(
            "appliance_e2e_request_latency_seconds", "Time from submission to the end of a sequence.", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens processed (cached ones included).", ["model"], registry=r)
        self.generation_tokens = Counter("appliance_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.requests_running = Gauge("appliance_num_requests_running", "Sequences decoding or prefilling.", ["model"], registry=r)
        self.requests_waiting = Gauge("appliance_num_requests_waiting", "Sequences queued for admission.", ["model"], registry=r)
        self.kv_cache_usage = Gauge("appliance_kv_cache_usage_perc", "Fraction of the KV budget reserved (0..1).", ["model"], registry=r)
        self.prefix_cache_queries = Counter(
            "appliance_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model"], registry=r
        )
        self.prefix_cache_hits = Counter("appliance_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["model"], registry=r)
        self.spec_draft_tokens = Counter("appliance_spec_decode_num_draft_tokens", "Draft tokens proposed.", ["model"], registry=r)
        self.spec_accepted_tokens = Counter("appliance_spec_decode_num_accepted_tokens", "Draft tokens accepted.", ["model"], registry=r)
        self.spec_emitted_tokens = Counter(
            "appliance_spec_decode_num_emitted_tokens", "Tokens produced by verification runs (accepted + bonus).", ["model"], registry=r
        )
        self.forced_tokens = Counter(
            "appliance_grammar_forced_tokens", "Tokens a grammar forced, verified in one run instead of one step each.", ["model"],
            registry=r,
        )
        self.preempted_steps = Counter(
            "appliance_preempted_steps", "Decode runs of batch-priority rows stopped for an interactive prompt (and repeated).",
            ["model"], registry=r,
        )
        self.prefill_chunk_tokens = Histogram(
            "appliance_prefill_chunk_tokens", "Prompt tokens per prefill run (the stall limit cuts chunks beside decoding streams).",
            ["model"], buckets=_CHUNK_BUCKETS_TOKENS, registry=r,
        )
        self.request_queue_time = Histogram(
            "appliance_request_queue_time_seconds", "Time a sequence waited for a slot (admitted or refused).", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self.request_success = Counter(
            "appliance_request_success", "Finished sequences by finish reason.", ["model", "finished_reason"], registry=r
        )


class LabelledMetrics:
    """One engine's child of each metric, looked up once: `labels()` costs on every call, and
    these are hit for every emitted token."""

    def __init__(self, metrics: GenerationMetrics, model: str) -> None:
        self._model = model
        self._request_success = metrics.request_success
        self.time_to_first_token = metrics.time_to_first_token.labels(model=model)
        self.time_per_output_token = metrics.time_per_output_token.labels(model=model)
        self.e2e_request_latency = metrics.e2e_request_latency.labels(model=model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model=model)
        self.generation_tokens = metrics.generation_tokens.labels(model=model)
        self.requests_running = metrics.requests_running.labels(model=model)
        self.requests_waiting = metrics.requests_waiting.labels(model=model)
        self.kv_cache_usage = metrics.kv_cache_usage.labels(model=model)
        self.prefix_cache_queries = metrics.prefix_cache_queries.labels(model=model)
        self.prefix_cache_hits = metrics.prefix_cache_hits.labels(model=model)
        self.request_queue_time = metrics.request_queue_time.labels(model=model)
        self.spec_draft_tokens = metrics.spec_draft_tokens.labels(model=model)
        self.spec_accepted_tokens = metrics.spec_accepted_tokens.labels(model=model)
        self.spec_emitted_tokens = metrics.spec_emitted_tokens.labels(model=model)
        self.forced_tokens = metrics.forced_tokens.labels(model=model)
        self.preempted_steps = metrics.preempted_steps.labels(model=model)
        self.prefill_chunk_tokens = metrics.prefill_chunk_tokens.labels(model=model)

    def count_finished(self, reason: str) -> None:
        """One sequence ended with `reason` (a second label, so not looked up in advance)."""
        self._request_success.labels(model=self._model, finished_reason=reason).inc()
