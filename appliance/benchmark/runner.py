"""Running a benchmark: check the target, build the workload, sweep, price, and assemble the result.

`run_bench` loads one running server; `run_compare` measures every deployable version of a
model, each on a private server (see serverproc), and recommends one for a quality budget.
Failures a user can cause (unreachable server, refused key, unknown model, every warm-up
request failing) become typed errors with one readable message. Progress is reported through
a small `ProgressSink`, so the CLI can draw a bar and tests can stay silent. Never prints.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from appliance.benchmark.compare import recommend, variant_result, variants_of
from appliance.benchmark.cost import HourlyCost, point_cost
from appliance.benchmark.loadgen import MAX_IN_FLIGHT_OPEN_LOOP, LoadMode, PointPlan, PointRun, run_point
from appliance.benchmark.results import BenchResult, PointResult, VariantResult
from appliance.benchmark.safety import check_sweep, check_target
from appliance.benchmark.serverproc import PrivateServer
from appliance.benchmark.stats import summarise
from appliance.benchmark.workloads import (
    ChatWorkload,
    EmbeddingsWorkload,
    InferWorkload,
    RerankWorkload,
    Workload,
    WorkloadKind,
    load_prompts,
)
from appliance.config import CostSettings
from appliance.errors import ApplianceError, Forbidden, InvalidInput, ModelNotFound, ServerUnreachable, Unauthorized
from appliance.repository.store import ModelRepository

#: Timeout for the checks made before the load starts, in seconds.
PREFLIGHT_TIMEOUT_S = 10.0
#: Distinct error messages kept per point in the result.
MAX_ERROR_SAMPLES = 3
#: What a compare run reports as its target: one private server per variant.
PRIVATE_TARGET = "private loopback server per variant"
#: Which workload measures a model of each task when `--compare` is not told.
WORKLOAD_FOR_TASK: dict[str, WorkloadKind] = {
    "text-generation": "chat",
    "feature-extraction": "embeddings",
    "text-classification": "rerank",
}


class ProgressSink(Protocol):
    def point_started(self, label: str) -> None: ...

    def point_progress(self, fraction: float, finished: int) -> None: ...

    def point_finished(self) -> None: ...


class SilentProgress:
    def point_started(self, label: str) -> None:
        return None

    def point_progress(self, fraction: float, finished: int) -> None:
        return None

    def point_finished(self) -> None:
        return None


@dataclass
class BenchOptions:
    """Everything one run was asked to do (the CLI fills it from options and settings)."""

    model: str
    workload: WorkloadKind = "chat"
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    version: int | None = None
    prompts: Path | None = None
    output_tokens: tuple[int, int] | None = None
    temperature: float | None = None
    ignore_eos: bool = False
    sentences: int = 8
    sequence: int = 16
    mode: LoadMode = "closed"
    concurrency: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    duration_s: float = 10.0
    max_requests: int = 200
    warmup_requests: int = 2
    request_timeout_s: float = 120.0
    allow_remote: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_sweep(concurrency=self.concurrency, rates=self.rates)
        if self.request_timeout_s <= 0:
            raise InvalidInput(f"timeout: must be positive, got {self.request_timeout_s:g}", field="timeout")
        self.mode = "closed" if self.concurrency else "open"
        # Builds a plan now so bad bounds fail before anything is sent.
        self.plan(1.0)

    @property
    def levels(self) -> list[float]:
        return [float(c) for c in self.concurrency] if self.concurrency else list(self.rates)

    def plan(self, level: float) -> PointPlan:
        return PointPlan(
            mode=self.mode,
            level=level,
            duration_s=self.duration_s,
            max_requests=self.max_requests,
            warmup_requests=self.warmup_requests,
            request_timeout_s=self.request_timeout_s,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "levels": self.levels,
            "duration_s": self.duration_s,
            "max_requests": self.max_requests,
            "warmup_requests": self.warmup_requests,
            "request_timeout_s": self.request_timeout_s,
            "seed": self.seed,
        }


def _client(base_url: str, api_key: str | None, timeout_s: float, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout_s), limits=limits)


def _refused(response: httpx.Response, url: str) -> None:
    if response.status_code == 401:
        raise Unauthorized(f"the server at {url} wants an API key (401): pass --api-key or set APPLIANCE_API_KEY", field="api-key")
    if response.status_code == 403:
        raise Forbidden(f"the server at {url} refused the API key (403): it needs the 'infer' scope", field="api-key")


def _json(response: httpx.Response, url: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ServerUnreachable(f"{response.request.method} {response.request.url.path} on {url} did not answer JSON; is it an appliance?", field="url") from None


#: V2 model states a benchmark can run against (the serving layer's; older servers said "ready").
SERVABLE_STATES = ("READY", "LOADING")


async def preflight(client: httpx.AsyncClient, options: BenchOptions, url: str) -> dict[str, Any] | None:
    """Check the server answers and serves the model; returns V2 metadata for infer workloads."""
    try:
        return await _preflight(client, options, url)
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"the server at {url} is unreachable: {exc.__class__.__name__}: {exc}", field="url") from None


async def _preflight(client: httpx.AsyncClient, options: BenchOptions, url: str) -> dict[str, Any] | None:
    live = await client.get("/v2/health/live", timeout=PREFLIGHT_TIMEOUT_S)
    if live.status_code != 200:
        raise ServerUnreachable(f"the server at {url} is not live (GET /v2/health/live answered {live.status_code})", field="url")
    if options.workload == "infer":
        version = f"/versions/{options.version}" if options.version is not None else ""
        response = await client.get(f"/v2/models/{options.model}{version}", timeout=PREFLIGHT_TIMEOUT_S)
        _refused(response, url)
        if response.status_code == 404:
            raise ModelNotFound(f"model {options.model!r}{' version ' + str(options.version) if options.version else ''} does not exist on {url}", field="model")
        if response.status_code != 200:
            raise ServerUnreachable(f"GET /v2/models/{options.model} answered {response.status_code}", field="model")
        metadata = _json(response, url)
        if not isinstance(metadata, dict):
            raise ServerUnreachable(f"GET /v2/models/{options.model} on {url} answered no model metadata", field="url")
        state = str(metadata.get("state") or "READY").upper()
        if state not in SERVABLE_STATES and not await _loads_on_demand(client, options.model):
            reason = metadata.get("reason") or ""
            raise ModelNotFound(f"model {options.model!r} is {state} on {url}{': ' + reason if reason else ''}", field="model")
        return metadata
    response = await client.get("/v1/models", timeout=PREFLIGHT_TIMEOUT_S)
    _refused(response, url)
    if response.status_code != 200:
        raise ServerUnreachable(f"GET /v1/models on {url} answered {response.status_code}", field="url")
    listing = _json(response, url)
    cards = listing.get("data", []) if isinstance(listing, dict) else []
    served = sorted(str(card.get("id")) for card in cards if isinstance(card, dict))
    if options.model not in served:
        raise ModelNotFound(
            f"model {options.model!r} is not served by {url} (served: {', '.join(served) or 'none'})", field="model"
        )
    return None


async def _loads_on_demand(client: httpx.AsyncClient, model: str) -> bool:
    """An evicted model is not loaded, but `/v1/models` lists it: its first request loads it
    (the warm-up requests pay for that, not the measurement)."""
    response = await client.get("/v1/models", timeout=PREFLIGHT_TIMEOUT_S)
    listing = response.json() if response.status_code == 200 else {}
    cards = listing.get("data", []) if isinstance(listing, dict) else []
    return any(isinstance(card, dict) and card.get("id") == model for card in cards)


def build_workload(options: BenchOptions, metadata: dict[str, Any] | None) -> Workload:
    if options.workload == "infer":
        assert metadata is not None
        return InferWorkload(model=options.model, version=options.version, metadata=metadata, rows=options.sentences, sequence=options.sequence)
    prompts, source = load_prompts(options.prompts)
    if options.workload == "embeddings":
        return EmbeddingsWorkload(model=options.model, prompts=prompts, source=source, sentences_per_request=options.sentences)
    if options.workload == "rerank":
        return RerankWorkload(model=options.model, prompts=prompts, source=source, documents_per_request=options.sentences)
    return ChatWorkload(model=options.model, prompts=prompts, source=source, output_tokens=options.output_tokens, temperature=options.temperature, ignore_eos=options.ignore_eos)


def _point_result(run: PointRun, cost: CostSettings, unit: str) -> PointResult:
    """Statistics and cost of one point, priced in the workload's unit only."""
    stats = summarise(run.records, run.wall_s)
    tokens_per_input = stats.prompt_tokens / stats.inputs if stats.inputs and stats.prompt_tokens else None
    per_token = unit == "output_tokens"
    priced = point_cost(
        cost,
        output_tokens_per_s=stats.output_tokens_per_s if per_token else 0.0,
        inputs_per_s=0.0 if per_token else stats.inputs_per_s,
        prompt_tokens_per_input=tokens_per_input,
    )
    samples: list[str] = []
    for record in run.records:
        if record.error and len(samples) < MAX_ERROR_SAMPLES:
            line = f"{record.error_key}: {record.error}"
            if line not in samples:
                samples.append(line)
    return PointResult.build(run.plan.mode, run.plan.level, stats, priced, run.warmup_errors, samples)


async def measure(url: str, options: BenchOptions, cost: CostSettings, progress: ProgressSink, label: str) -> tuple[Workload, list[PointResult]]:
    """Preflight, then every sweep point in order against one server."""
    # One connection per closed-loop client; an open loop may need as many as it has in flight,
    # else requests would queue in the client's pool and hide the server's queueing.
    connections = max(int(max(options.levels)), 1) if options.mode == "closed" else MAX_IN_FLIGHT_OPEN_LOOP
    async with _client(url, options.api_key, options.request_timeout_s, connections) as client:
        metadata = await preflight(client, options, url)
        workload = build_workload(options, metadata)
        points: list[PointResult] = []
        for index, level in enumerate(options.levels):
            unit = "clients" if options.mode == "closed" else "req/s"
            progress.point_started(f"{label} {level:g} {unit}")
            run = await run_point(client, workload, options.plan(level), seed=options.seed + index, progress=progress.point_progress)
            progress.point_finished()
            if index == 0 and run.records and not any(r.ok for r in run.records):
                # A workload that fails on every request (wrong kind for the model, a server
                # that refuses it) is a usage error, not a measurement.
                first = run.records[0]
                raise InvalidInput(f"every request to {options.model!r} failed ({first.error_key}: {first.error})", field="model")
            points.append(_point_result(run, cost, workload.cost_unit))
        return workload, points


def _result(options: BenchOptions, url: str, workload: Workload, cost: CostSettings, variants: list[VariantResult], started: bool) -> BenchResult:
    return BenchResult(
        target=url,
        started_servers=started,
        workload=workload.describe(),
        cost_unit=workload.cost_unit,
        settings=options.describe(),
        cost_model={**cost.model_dump(), "cost_per_h": HourlyCost.from_settings(cost).total_per_h},
        variants=variants,
    )


def run_bench(options: BenchOptions, cost: CostSettings, progress: ProgressSink | None = None) -> BenchResult:
    """Load the server at `options.url` with the workload over the sweep."""
    url = check_target(options.url, allow_remote=options.allow_remote)
    sink = progress or SilentProgress()
    workload, points = asyncio.run(measure(url, options, cost, sink, options.model))
    variant = VariantResult(model=options.model, version=options.version, points=points)
    return _result(options, url, workload, cost, [variant], started=False)


def run_compare(
    options: BenchOptions,
    cost: CostSettings,
    repository: ModelRepository,
    work_root: Path,
    *,
    max_quality_loss: float,
    config_file: Path | None = None,
    workload_given: bool = False,
    progress: ProgressSink | None = None,
) -> BenchResult:
    """Measure every deployable version of `options.model`, each on its own private server."""
    if max_quality_loss < 0:
        raise InvalidInput(f"max-quality-loss: must be >= 0, got {max_quality_loss:g}", field="max-quality-loss")
    versions, skipped = variants_of(repository, options.model)
    if not workload_given:
        options.workload = WORKLOAD_FOR_TASK.get(versions[-1].manifest.task, "infer")
    sink = progress or SilentProgress()
    variants: list[VariantResult] = []
    workload: Workload | None = None
    for version in versions:
        result = variant_result(version)
        try:
            with PrivateServer(version, work_root, config_file=config_file) as server:
                chosen = version.version if options.workload == "infer" else None
                per_version = dataclasses.replace(options, version=chosen, api_key=None, url=server.url)
                workload, result.points = asyncio.run(measure(server.url, per_version, cost, sink, result.label))
        except ApplianceError as exc:
            result.error = exc.message
        variants.append(result)
    if workload is None:
        reasons = "; ".join(f"{v.label}: {v.error}" for v in variants)
        raise ServerUnreachable(f"compare: no variant of {options.model!r} could be measured ({reasons})", field="compare")
    bench = _result(options, PRIVATE_TARGET, workload, cost, variants, started=True)
    bench.workload["skipped_versions"] = skipped
    bench.recommendation = recommend(variants, workload.cost_unit, max_quality_loss)
    return bench
