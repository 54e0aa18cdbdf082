"""The dashboard's numbers: the box, the models, request rates, latency, tokens/s, queue depth
and cost per 1k tokens.

A sampler task takes one point every `interval_s` from the appliance's own state (the live
request statistics of the API layer, the model registry, the generation engines' gauges,
psutil) and keeps the last hour in memory; the page draws its charts from `/admin/api/metrics`.
Nothing here leaves the box. Never imports the API layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from appliance.config import CostSettings
from appliance.errors import ApplianceError
from appliance.generation.registry import GenerationRegistry
from appliance.runtime.registry import ModelRegistry
from appliance.store.request_log import LiveStats

SAMPLE_INTERVAL_S = 5.0
#: Points kept (one hour at the default interval).
SAMPLES_KEPT = 720
#: Window over which tokens/s is averaged for the cost figure.
COST_WINDOW_S = 300.0
HOURS_PER_YEAR = 8766.0
#: The generation engines' gauge of queued sequences.
GENERATION_QUEUE_METRIC = "appliance_num_requests_waiting"
NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Point:
    t: float
    requests_per_s: float
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    tokens_per_s: float
    queue_depth: int
    cpu_percent: float
    memory_percent: float


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def cost_per_1k_tokens(cost: CostSettings, tokens_per_s: float) -> dict[str, Any]:
    """What 1k tokens cost on this box at `tokens_per_s`: amortised hardware plus electricity."""
    hardware_per_hour = cost.hardware_price / (cost.lifetime_years * HOURS_PER_YEAR)
    power_per_hour = cost.power_watts / 1000.0 * cost.electricity_price_kwh
    per_hour = hardware_per_hour + power_per_hour
    per_1k = per_hour / (tokens_per_s * 3.6) if tokens_per_s > 0 else None
    return {
        "currency": cost.currency,
        "per_hour": per_hour,
        "hardware_per_hour": hardware_per_hour,
        "power_per_hour": power_per_hour,
        "tokens_per_s": tokens_per_s,
        "per_1k_tokens": per_1k,
        "cloud_per_1k_tokens": cost.cloud_price_per_1k_tokens,
    }


def gpus() -> list[str]:
    """NVIDIA GPUs the driver reports (no subprocess, no library load)."""
    names: list[str] = []
    if NVIDIA_GPUS_DIR.is_dir():
        for info in sorted(NVIDIA_GPUS_DIR.glob("*/information")):
            with contextlib.suppress(OSError):
                for line in info.read_text().splitlines():
                    if line.startswith("Model:"):
                        names.append(line.split(":", 1)[1].strip())
    return names


def providers_built() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def box_info() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_cores": psutil.cpu_count(logical=True) or 0,
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_average": [round(v, 2) for v in psutil.getloadavg()],
        "memory_total_bytes": memory.total,
        "memory_used_bytes": memory.total - memory.available,
        "memory_percent": memory.percent,
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "gpus": gpus(),
        "providers_built": providers_built(),
    }


def engine_provider(generation: GenerationRegistry, name: str) -> tuple[str | None, str | None]:
    """The execution provider of a generation engine's session ("cpu", "cuda", ...), if it
    says, and why it is not on the GPU when the box has one."""
    try:
        engine = generation.engine(name)
    except ApplianceError:
        return None, None
    session = getattr(getattr(engine, "runner", None), "session", None)
    providers = session.get_providers() if session is not None else []
    placement = getattr(engine, "placement", None)
    return (providers[0].removesuffix("ExecutionProvider").lower() if providers else None), getattr(placement, "note", None)


def loaded_models(registry: ModelRegistry, generation: GenerationRegistry | None = None) -> list[dict[str, Any]]:
    """Tensor models of the registry, then the generation engines' models."""
    rows = []
    for state in registry.states():
        loaded = state.loaded
        rows.append(
            {
                "name": state.name,
                "version": state.version,
                "status": state.status,
                "reason": state.reason,
                "provider": loaded.provider.active if loaded else None,
                "task": loaded.manifest.task if loaded else None,
                "queued": loaded.batcher.queued if loaded else 0,
            }
        )
    if generation is not None:
        for name in sorted(generation.generation_models()):
            status, reason = generation.status(name)
            provider, note = engine_provider(generation, name) if status == "ready" else (None, None)
            rows.append(
                {
                    "name": name, "version": None, "status": status, "reason": reason or note,
                    "provider": provider, "task": "text-generation", "queued": 0,
                }
            )
    return rows


def generation_queue_depth(generation: GenerationRegistry | None) -> int:
    """Sequences waiting for admission in every generation engine (from its own gauge)."""
    if generation is None:
        return 0
    depth = 0.0
    for metric in generation.metrics.requests_waiting.collect():
        depth += sum(sample.value for sample in metric.samples if sample.name == GENERATION_QUEUE_METRIC)
    return int(depth)


class DashboardSampler:
    """Takes a Point every `interval_s` while the server runs."""

    def __init__(
        self, registry: ModelRegistry, live: LiveStats, interval_s: float = SAMPLE_INTERVAL_S,
        *, generation: GenerationRegistry | None = None,
    ) -> None:
        self.registry = registry
        self.generation = generation
        self.live = live
        self.interval_s = interval_s
        self.points: deque[Point] = deque(maxlen=SAMPLES_KEPT)
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        psutil.cpu_percent(interval=None)  # prime: the first reading is meaningless

    def sample(self) -> Point:
        now = time.monotonic()
        elapsed = max(1e-6, now - self._last)
        window = self.live.since(self._last)
        self._last = now
        latencies_ms = [v * 1000.0 for v in window.latencies_s]
        queued = sum(m["queued"] for m in loaded_models(self.registry)) + generation_queue_depth(self.generation)
        point = Point(
            t=time.time(),
            requests_per_s=window.requests / elapsed,
            errors=window.errors,
            p50_ms=percentile(latencies_ms, 0.50),
            p95_ms=percentile(latencies_ms, 0.95),
            tokens_per_s=window.tokens / elapsed,
            queue_depth=queued,
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_percent=psutil.virtual_memory().percent,
        )
        self.points.append(point)
        return point

    def recent_tokens_per_s(self, window_s: float = COST_WINDOW_S) -> float:
        cut = time.time() - window_s
        chosen = [p.tokens_per_s for p in self.points if p.t >= cut and p.tokens_per_s > 0]
        return sum(chosen) / len(chosen) if chosen else 0.0

    def series(self) -> list[dict[str, Any]]:
        return [asdict(point) for point in self.points]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="admin-dashboard-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
