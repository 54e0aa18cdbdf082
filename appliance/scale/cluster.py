"""The ingress' view of the cluster: every model deployment and its replicas, polled from Ray
Serve's controller.

It answers readiness (`/v2/health/ready` is 503 while a served model has no running replica),
per-model readiness, the fast 503 + Retry-After for a model whose replicas are all being
restarted (instead of a request waiting in Ray's router), and the admin page's replicas per
model and where they run. A poll that fails keeps the last view (the controller restarts on its
own; the replicas keep serving meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from appliance.serving.cluster import DeploymentStatus, ReplicaStatus

log = logging.getLogger("appliance.scale.cluster")

#: States in which a replica takes requests.
RUNNING = "RUNNING"


class ClusterWatch:
    """Polls the Serve controller every `interval_s` (implements serving.cluster.ClusterHealth)."""

    def __init__(self, app_name: str, deployments: dict[str, str], interval_s: float) -> None:
        """`deployments`: model name -> its deployment's name."""
        self.app_name = app_name
        self.models_by_deployment = {deployment: model for model, deployment in deployments.items()}
        self.interval_s = interval_s
        self._view: dict[str, DeploymentStatus] = {}
        self.polled_at: float | None = None

    async def run(self) -> None:
        while True:
            try:
                details = await asyncio.to_thread(serve_details)
                self.update(details)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last view; the controller comes back
                log.warning("cannot read Ray Serve's status: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            await asyncio.sleep(self.interval_s)

    def update(self, details: dict[str, Any]) -> None:
        """Read Ray Serve's instance details (the shape of `ServeInstanceDetails`)."""
        application = (details.get("applications") or {}).get(self.app_name) or {}
        view: dict[str, DeploymentStatus] = {}
        for deployment_name, deployment in (application.get("deployments") or {}).items():
            model = self.models_by_deployment.get(deployment_name)
            if model is None:
                continue
            config = deployment.get("deployment_config") or {}
            autoscaling = config.get("autoscaling_config") or None
            replicas = tuple(
                ReplicaStatus(
                    replica_id=str(replica.get("replica_id")),
                    state=_text(replica.get("state")),
                    node_ip=replica.get("node_ip"),
                    node_id=replica.get("node_id"),
                    pid=replica.get("pid"),
                    started_at=replica.get("start_time_s"),
                )
                for replica in deployment.get("replicas") or ()
            )
            view[model] = DeploymentStatus(
                model=model,
                status=_text(deployment.get("status")),
                message=str(deployment.get("message") or ""),
                replicas=tuple(sorted(replicas, key=lambda replica: (replica.node_ip or "", replica.replica_id))),
                min_replicas=autoscaling.get("min_replicas") if autoscaling else None,
                max_replicas=autoscaling.get("max_replicas") if autoscaling else None,
                target_replicas=deployment.get("target_num_replicas"),
            )
        self._view = view
        self.polled_at = time.time()

    # -- ClusterHealth --------------------------------------------------------------------------
    def model_problem(self, name: str) -> str | None:
        deployment = self._view.get(name)
        if deployment is None or deployment.running > 0:
            return None
        states = ", ".join(f"{replica.state.lower()}" for replica in deployment.replicas) or "none yet"
        return f"no running replica on the Ray cluster (replicas: {states}); Ray is starting one"

    def running(self, name: str) -> int:
        """Running replicas of `name` (0 before the first poll)."""
        deployment = self._view.get(name)
        return deployment.running if deployment is not None else 0

    def autoscaling(self, name: str) -> bool:
        """Whether `name`'s replica count follows its load (Ray's autoscaler)."""
        deployment = self._view.get(name)
        return deployment is not None and deployment.max_replicas is not None

    def ready(self) -> tuple[bool, str]:
        for name in sorted(self._view):
            problem = self.model_problem(name)
            if problem is not None:
                return False, f"model {name}: {problem}"
        return True, "ready"

    def deployments(self) -> list[DeploymentStatus]:
        return [self._view[name] for name in sorted(self._view)]


def _text(value: Any) -> str:
    """An enum member's value (Ray's states are str enums), else the text."""
    return str(getattr(value, "value", value))


def serve_details() -> dict[str, Any]:
    """Ray Serve's instance details (what `serve.status()` and `serve status` read), from the
    controller; blocking, so called in a worker thread."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    return client.get_serve_details()
