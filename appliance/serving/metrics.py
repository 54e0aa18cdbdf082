"""Prometheus metrics of the serving layer: resident bytes per model, loads, evictions by
reason, load time. Registered on the server's one CollectorRegistry (names in
../shared/INTERFACES.md). The per-model state gauges are read from the ModelService at scrape
time (api/metrics.py), so they never drift. Never imports the API layer.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LOAD_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

#: Eviction reasons (the `reason` label).
EVICTED_FOR_ROOM = "room"
EVICTED_IDLE = "keep_alive"
EVICTED_BY_REQUEST = "request_keep_alive"


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.loads = Counter("appliance_model_loads", "Model loads (first loads, reloads and loads after an eviction)", ["model"], registry=registry)
        self.evictions = Counter(
            "appliance_model_evictions", "Models unloaded to free memory, by reason (room, keep_alive, request_keep_alive)",
            ["model", "reason"], registry=registry,
        )
        self.load_seconds = Histogram(
            "appliance_model_load_seconds", "Time to load a model (open its sessions, warm up)", ["model"],
            buckets=LOAD_BUCKETS_S, registry=registry,
        )
