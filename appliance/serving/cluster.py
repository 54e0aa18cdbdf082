"""What the doors may know about models served by replicas in other processes (scale-out on
Ray Serve, appliance.scale): whether each model has a replica running, and where its replicas
run. On one box there is no cluster (`ServerContext.cluster` is None) and nothing here is used.
Plain types only; never imports Ray or the engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica of a model's deployment, as the cluster reported it last."""

    replica_id: str
    #: Ray's replica state: STARTING, UPDATING, RECOVERING, RUNNING, STOPPING, PENDING_MIGRATION.
    state: str
    node_ip: str | None
    node_id: str | None
    pid: int | None
    #: Unix time the replica started.
    started_at: float | None


@dataclass(frozen=True)
class DeploymentStatus:
    """A model's deployment: its health and replicas."""

    model: str
    #: Ray's deployment status: UPDATING, HEALTHY, UNHEALTHY, UPSCALING, DOWNSCALING, DEPLOY_FAILED.
    status: str
    message: str
    replicas: tuple[ReplicaStatus, ...]
    #: Autoscaling bounds, or None with a fixed replica count.
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_replicas: int | None = None

    @property
    def running(self) -> int:
        return sum(1 for replica in self.replicas if replica.state == "RUNNING")


class ClusterHealth(Protocol):
    """The cluster as the ingress sees it (a poll of Ray Serve's controller)."""

    def ready(self) -> tuple[bool, str]:
        """False, with the reason, while a served model has no running replica."""
        ...

    def model_problem(self, name: str) -> str | None:
        """Why `name` cannot serve now (no running replica), or None."""
        ...

    def deployments(self) -> list[DeploymentStatus]:
        """Every model deployment with its replicas (admin UI)."""
        ...


class ClusterScaler(Protocol):
    """Changes the running cluster's deployments (admin UI, Ray mode): each model's replicas
    and what each replica reserves, from the configured settings with an admin's changes."""

    async def rescale(self, changes: dict[str, dict[str, Any]]) -> None:
        """Apply `changes` ({model: {field: value}}, config.ADMIN_SCALE_FIELDS) to the running
        application; ApplianceError when the cluster cannot take them."""
        ...
