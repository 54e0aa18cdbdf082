"""The ingress deployment: the appliance's own FastAPI app (create_app: auth, rate limits,
privacy logging, usage counting, the OpenAI and V2 routes, the Batch API, the admin UI,
/metrics) running in a Ray Serve replica, with its ModelService opening models as Ray
deployments (clients.RayOpener) instead of sessions in this process. Its admin UI changes a
model's replicas and resources through the scaler it is given (application.Redeployer).

The ingress' ModelService keeps its own bookkeeping (states, leases, the index the doors read)
but never holds a model's memory: its budget and keep-alive are switched off here, because the
replicas hold the models and Ray decides where they run. A `ClusterWatch` follows the replicas
for readiness, fast 503s and the admin page.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray.serve.handle import DeploymentHandle

from appliance.api.metrics import ServerMetrics
from appliance.app import create_app
from appliance.config import Settings
from appliance.repository.store import ModelRepository
from appliance.scale.clients import RayOpener, ReplicaCounter
from appliance.scale.cluster import ClusterWatch
from appliance.scale.plan import check_database
from appliance.serving.cluster import ClusterScaler

log = logging.getLogger("appliance.scale.ingress")

#: The ingress' ModelService counts no memory: the replicas hold the models.
NO_BUDGET_BYTES = 1 << 62
#: How often the ingress reads the replicas' states from Ray Serve's controller.
CLUSTER_POLL_S = 1.0


def ingress_settings(settings: Settings) -> Settings:
    """The ingress serves every deployed model at once and never 'unloads' one for memory or
    idleness (a connection to a deployment costs nothing)."""
    serving = settings.serving.model_copy(
        update={
            "memory_budget_bytes": NO_BUDGET_BYTES,
            "gpu_memory_budget_bytes": None,
            "max_loaded_models": 0,
            "keep_alive_s": -1.0,
            "load_at_start": True,
        }
    )
    return settings.model_copy(update={"serving": serving})


class Ingress:
    """Built by Ray on the replica (`__serve_build_asgi_app__`), never pickled as an app."""

    def __init__(
        self, settings: Settings, handles: dict[str, DeploymentHandle], deployments: dict[str, str], scaler: ClusterScaler
    ) -> None:
        """`scaler`: applies an admin's replica and resource changes (application.Redeployer)."""
        self.settings = ingress_settings(settings)
        self.handles = handles
        self.deployments = deployments
        self.scaler = scaler
        self._watching: asyncio.Task[None] | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        import ray

        check_database(self.settings, sum(1 for node in ray.nodes() if node.get("Alive")))
        watch = ClusterWatch(self.settings.scale.app_name, self.deployments, CLUSTER_POLL_S)
        scale = self.settings.scale

        def opener(_repository: ModelRepository, metrics: ServerMetrics) -> RayOpener:
            return RayOpener(self.handles, cluster=watch, counter=ReplicaCounter(metrics.registry), retry_after_s=scale.retry_after_s)

        app = create_app(self.settings, opener=opener)
        app.state.ctx.cluster = watch
        app.state.cluster = watch
        app.state.scaler = self.scaler
        self._watching = asyncio.get_running_loop().create_task(watch.run(), name="cluster-watch")
        log.info("ingress ready to serve %d model deployment(s): %s", len(self.deployments), ", ".join(sorted(self.deployments)))
        return app

    async def __del__(self) -> Any:
        if self._watching is not None:
            self._watching.cancel()
