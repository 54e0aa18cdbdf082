"""The appliance as a Ray Serve application: the ingress bound to one deployment per model
(and, in copy mode, the models bound to the `repository` deployment they copy from), from the
plan (plan.py). `build_app(settings)` is what `appliance serve --ray` deploys;
`app_from_environment()` is what `serve run appliance.scale:app` and `serve deploy` (with the
config `appliance scale config` writes) import, reading the settings from the environment and
the TOML file as every appliance command does. Both apply the replicas and resources an admin
changed on the Models page (saved in the database), and `Redeployer` applies a new change to
the running application from the ingress.

Every deployment of one build carries the same code version (`code_version()`), which Ray
Serve compares to decide what a redeploy changes: with it unchanged, a new replica count or new
autoscaling bounds apply in place (running replicas keep serving) and new resources replace
only that model's replicas; a new build (each `appliance serve --ray`) restarts everything.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from appliance import __version__
from appliance.config import Settings, load_settings
from appliance.errors import ConfigError
from appliance.scale.cluster import serve_details
from appliance.scale.ingress import Ingress
from appliance.scale.plan import Plan, check_database, plan
from appliance.scale.replica import ModelReplica
from appliance.scale.source import RepositorySource
from appliance.store.scale_models import saved_changes

#: Random bytes of a build's code version.
CODE_VERSION_BYTES = 6
#: Ray Serve's source of an application deployed from a config file (`serve deploy`).
DECLARATIVE = "declarative"


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster (0 when this process is not connected)."""
    if not ray.is_initialized():
        return 0
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def code_version() -> str:
    """A new build's code version: the appliance's version and a random tail."""
    return f"appliance-{__version__}-{secrets.token_hex(CODE_VERSION_BYTES)}"


def build_app(settings: Settings, deployments: Plan | None = None, *, version: str | None = None) -> Application:
    """The bound application (`deployments` default: the plan with the admin's saved changes).
    When this process is connected to the cluster, SQLite is refused here already if the
    cluster has more than one node (the ingress checks again at start)."""
    check_database(settings, alive_nodes())
    current = deployments or plan(settings, changes=saved_changes(settings.db_url))
    version = version or code_version()
    source = (
        _deployment(RepositorySource, current.source, version).bind(settings) if current.source is not None else None
    )
    handles = {
        deployment.model: _deployment(ModelReplica, deployment.options, version).bind(
            settings, deployment.model, deployment.settings.num_cpus, source
        )
        for deployment in current.models
    }
    ingress = _deployment(serve.ingress()(Ingress), current.ingress, version)
    return ingress.bind(settings, handles, current.deployments(), Redeployer(settings, current.served, version))


def _deployment(cls: type, options: dict[str, Any], version: str) -> Deployment:
    # Ray Serve 2.60 takes a deployment's code version only as an internal option (it sets one
    # itself for `serve deploy`); without it every `serve.run` is a new version, which
    # restarts every replica.
    return serve.deployment(cls).options(**options).options(version=version, _internal=True)


@dataclass(frozen=True)
class Redeployer:
    """The ingress' serving.cluster.ClusterScaler: the application built again from the
    settings it was deployed with and an admin's changes, with the same code version, and run
    over the running one (Ray Serve then changes only what differs; see the module's doc)."""

    settings: Settings
    served: dict[str, str]
    version: str

    async def rescale(self, changes: dict[str, dict[str, Any]]) -> None:
        details = await asyncio.to_thread(serve_details)
        application = (details.get("applications") or {}).get(self.settings.scale.app_name) or {}
        if str(getattr(application.get("source"), "value", application.get("source"))) == DECLARATIVE:
            raise ConfigError(
                "the application was deployed from a Serve config file (`serve deploy`): change the replicas and "
                "resources in that file's `deployments` and deploy it again",
                field="scale.models",
            )
        app = build_app(self.settings, plan(self.settings, self.served, changes), version=self.version)
        try:
            await asyncio.to_thread(run_app, app, self.settings.scale.app_name)
        except Exception as exc:  # noqa: BLE001 - Ray's errors are many; one line says which
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ConfigError(f"Ray Serve did not take the change: {first}", field="scale.models") from None


def run_app(app: Application, name: str) -> None:
    """Deploy (or redeploy) the application without waiting for its replicas."""
    serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix="/")],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def app_from_environment() -> Application:
    """`appliance.scale:app`: the settings from APPLIANCE_* and the TOML file."""
    return build_app(load_settings())
