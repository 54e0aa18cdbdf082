"""What the routes need from the running server, in one object on `app.state.ctx`.

Built by the app factory (the composition root); routes reach it only through the typed
dependencies of `deps.py`. Holds no logic beyond small queries about readiness.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.config import Settings
from appliance.serving.cluster import ClusterHealth
from appliance.serving.service import ModelService
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.rate_limits import RateLimiter

#: How long a database reachability answer is reused by readiness probes, in seconds.
DB_CHECK_INTERVAL_S = 2.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ServerContext:
    settings: Settings
    database: Database
    keys: KeyStore
    models: ModelService
    metrics: Any
    #: Per-key rate limits (None: not enforced, e.g. a bare context in tests).
    rate_limiter: RateLimiter | None = None
    #: The cluster's view of the models' replicas (scale-out only).
    cluster: ClusterHealth | None = None
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    _db_ok: bool = True
    _db_checked: float = 0.0

    def __post_init__(self) -> None:
        self.api_networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in self.settings.api_networks]
        self.admin_networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in self.settings.admin_networks]

    def database_reachable(self) -> bool:
        now = time.monotonic()
        if now - self._db_checked >= DB_CHECK_INTERVAL_S:
            self._db_ok = self.database.reachable()
            self._db_checked = now
        return self._db_ok

    def ready(self) -> tuple[bool, str]:
        """Kubernetes readiness: not while draining, loading models, without the database, or
        (scale-out) while a model has no running replica."""
        if self.draining:
            return False, "draining"
        if not self.models.settled():
            return False, "models are loading"
        if not self.database_reachable():
            return False, "database unreachable"
        if self.cluster is not None:
            return self.cluster.ready()
        return True, "ready"


def in_networks(host: str | None, networks: list[Network]) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)
