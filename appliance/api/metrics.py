"""Prometheus metrics of the server, named after Triton's `nv_inference_*` where one fits.

One CollectorRegistry per app (tests run several apps in one process). Model state and queue
depths are read from the ModelService at scrape time, so they can never drift from the truth.
Counters carry the `_total` suffix the Prometheus client adds. Never imports onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from appliance.api.deps import MetricsAccessDep
from appliance.serving.service import ModelService
from appliance.serving.states import ServingState
from appliance.store.usage_recorder import UsageEvent
from appliance.store.usage_report import NO_KEY_LABEL

# The `_created` timestamp series double the output and no dashboard of ours reads them.
disable_created_metrics()

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _ModelsCollector:
    """Per-model state, residency and queue depth of every task, read from the ModelService at
    scrape time."""

    def __init__(self, models: ModelService) -> None:
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("nv_model_loaded", "1 when the model version is loaded and ready", labels=["model", "version", "provider"])
        state = GaugeMetricFamily("appliance_model_state", "1 for the state each model is in", labels=["model", "version", "state"])
        pending = GaugeMetricFamily("nv_inference_pending_request_count", "Requests waiting in the model's queue", labels=["model", "version"])
        resident = GaugeMetricFamily(
            "appliance_model_resident_bytes", "Bytes a loaded model is counted for in the memory budget", labels=["model"]
        )
        budget = GaugeMetricFamily("appliance_memory_budget_bytes", "The models' memory budget per device", labels=["device"])
        in_use = GaugeMetricFamily("appliance_memory_budget_used_bytes", "Bytes of the budget the loaded models hold", labels=["device"])
        for model in self.models.statuses():
            version = str(model.loaded_version or model.version or "")
            state.add_metric([model.name, version, model.state.value], 1.0)
            if model.loaded_version is not None:
                loaded.add_metric([model.name, version, model.provider or ""], 1.0 if model.state is ServingState.READY else 0.0)
                pending.add_metric([model.name, version], float(model.queued))
                resident.add_metric([model.name], float(model.resident_bytes))
        limits = self.models.budget
        budget.add_metric(["cpu"], float(limits.host_bytes))
        if limits.gpu_bytes is not None:
            budget.add_metric(["cuda"], float(limits.gpu_bytes))
        for device, used in self.models.memory_in_use().items():
            in_use.add_metric([device], float(used))
        yield from (loaded, state, pending, resident, budget, in_use)


class _BatchObserver:
    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self._exec = metrics.exec_count.labels(model, version)
        self._count = metrics.inference_count.labels(model, version)
        self._batch = metrics.batch_size.labels(model, version)

    def batch_executed(self, rows: int, jobs: int, compute_s: float) -> None:
        del jobs, compute_s
        self._exec.inc()
        self._count.inc(rows)
        self._batch.observe(rows)


class KeyUsageMetrics:
    """Per-key usage as Prometheus counters, beside (never instead of) the usage table:
    `appliance_key_requests_total{key,model,status_class}` and
    `appliance_key_tokens_total{key,model,kind}` (kind: prompt, completion).

    `key` is the key's public prefix (its id, never the secret; "(no key)" while auth is off),
    not its group: the group is looked up in the database when counts are written, and a
    request must never wait on the database; the Usage page sums per group. The cardinality
    is bounded: only keys that `require_scope` verified are counted and keys are created by an
    admin; a model the server does not serve is counted as "(unknown)"; `status_class` is one
    of 1xx-5xx. A revoked key's series stay until the process restarts, as Prometheus expects
    of a counter. Token series appear with the first token counted (a tensor model never has
    them).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "appliance_key_requests", "Inference requests per API key (its id), model and status class",
            ["key", "model", "status_class"], registry=registry,
        )
        self.tokens = Counter(
            "appliance_key_tokens", "Tokens per API key (its id) and model, as the client's usage reported them",
            ["key", "model", "kind"], registry=registry,
        )

    def count(self, event: UsageEvent) -> None:
        key = event.key_id or NO_KEY_LABEL
        self.requests.labels(key, event.model, f"{event.status // 100}xx").inc()
        for kind, tokens in (("prompt", event.prompt_tokens), ("completion", event.completion_tokens)):
            if tokens:
                self.tokens.labels(key, event.model, kind).inc(tokens)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "version"]
        self.success = Counter("nv_inference_request_success", "Successful inference requests", labels, registry=self.registry)
        self.failure = Counter("nv_inference_request_failure", "Failed inference requests", [*labels, "reason"], registry=self.registry)
        self.inference_count = Counter("nv_inference_count", "Inferences performed (batch rows)", labels, registry=self.registry)
        self.exec_count = Counter("nv_inference_exec_count", "Model executions (batches)", labels, registry=self.registry)
        self.queue_duration = Histogram(
            "nv_inference_queue_duration_seconds", "Time requests waited in the queue", labels, buckets=LATENCY_BUCKETS_S, registry=self.registry
        )
        self.compute_duration = Histogram(
            "nv_inference_compute_infer_duration_seconds", "Model execution time of the request's batch", labels, buckets=LATENCY_BUCKETS_S, registry=self.registry
        )
        self.request_duration = Histogram(
            "nv_inference_request_duration_seconds", "End-to-end request time inside the server", labels, buckets=LATENCY_BUCKETS_S, registry=self.registry
        )
        self.batch_size = Histogram("nv_inference_batch_size", "Rows per executed batch", labels, buckets=BATCH_BUCKETS, registry=self.registry)
        self.inflight = Gauge("appliance_http_inflight_requests", "HTTP requests being served", registry=self.registry)
        self.key_usage = KeyUsageMetrics(self.registry)

    def attach(self, models: ModelService, inflight: Any) -> None:
        """Read model states and the in-flight count from their owners at scrape time."""
        self.registry.register(_ModelsCollector(models))  # type: ignore[arg-type]
        self.inflight.set_function(lambda: float(inflight.value))

    def observer(self, model: str, version: int) -> _BatchObserver:
        return _BatchObserver(self, model, str(version))

    def request_done(self, model: str, version: int | str, *, queue_us: float, compute_us: float, total_s: float) -> None:
        labels = (model, str(version))
        self.success.labels(*labels).inc()
        self.queue_duration.labels(*labels).observe(queue_us / 1e6)
        self.compute_duration.labels(*labels).observe(compute_us / 1e6)
        self.request_duration.labels(*labels).observe(total_s)

    def request_failed(self, model: str, version: int | str | None, status: int) -> None:
        self.failure.labels(model, str(version or ""), str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(request: Request, _access: MetricsAccessDep) -> Response:
    server_metrics: Any = request.app.state.ctx.metrics
    return Response(server_metrics.render(), media_type=CONTENT_TYPE_LATEST)
