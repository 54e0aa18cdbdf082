"""The dashboard's numbers: the box, the models, request rates, latency, tokens/s, queue depth
and cost per 1k tokens.

A sampler task takes one point every `interval_s` from the appliance's own state (the live
request statistics of the API layer, the ModelService's models and memory budget, psutil) and keeps the last hour in memory; the page draws its charts from `/admin/api/metrics`.
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
from appliance.serving.service import ModelService
from appliance.serving.states import ServingState
from appliance.store.request_log import LiveStats

SAMPLE_INTERVAL_S = 5.0
#: Points kept (one hour at the default interval).
SAMPLES_KEPT = 720
#: Window over which tokens/s is averaged for the cost figure.
COST_WINDOW_S = 300.0
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
    #: Share of the models' memory budget held by loaded models (percent).
    budget_percent: float


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def cost_per_1k_tokens(cost: CostSettings, tokens_per_s: float) -> dict[str, Any]:
    """What 1k tokens cost on this box at `tokens_per_s`: amortised hardware plus electricity."""
    per_hour = cost.per_hour
    per_1k = per_hour / (tokens_per_s * 3.6) if tokens_per_s > 0 else None
    return {
        "currency": cost.currency,
        "per_hour": per_hour,
        "hardware_per_hour": cost.amortisation_per_h,
        "power_per_hour": cost.power_per_h,
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


def loaded_models(models: ModelService) -> list[dict[str, Any]]:
    """Every model of every task with its state, memory and queue (dashboard and its JSON)."""
    rows = []
    for status in models.statuses():
        rows.append(
            {
                "name": status.name,
                "version": status.loaded_version or status.version,
                "status": status.state.value.lower(),
                "reason": status.reason,
                "provider": status.provider,
                "task": status.task,
                "queued": status.queued,
                "inflight": status.inflight,
                "resident_bytes": status.resident_bytes if status.state in (ServingState.READY, ServingState.LOADING) else 0,
            }
        )
    return rows


def budget_info(models: ModelService) -> dict[str, Any]:
    """The memory budget and how much of it the loaded models hold."""
    used = models.memory_in_use()
    limits = models.budget
    return {
        "host_bytes": limits.host_bytes,
        "host_used_bytes": used.get("cpu", 0),
        "host_percent": 100.0 * used.get("cpu", 0) / limits.host_bytes if limits.host_bytes else 0.0,
        "gpu_bytes": limits.gpu_bytes,
        "gpu_used_bytes": used.get("cuda", 0),
        "max_models": limits.max_models,
        "loaded": sum(1 for status in models.statuses() if status.state is ServingState.READY),
    }


class DashboardSampler:
    """Takes a Point every `interval_s` while the server runs."""

    def __init__(self, models: ModelService, live: LiveStats, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.models = models
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
        queued = sum(status.queued for status in self.models.statuses())
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
            budget_percent=budget_info(self.models)["host_percent"],
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
