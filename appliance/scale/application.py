"""The appliance as a Ray Serve application: the ingress bound to one deployment per model,
from the plan (plan.py). `build_app(settings)` is what `appliance serve --ray` deploys;
`app_from_environment()` is what `serve run appliance.scale:app` and `serve deploy` (with the
config `appliance scale config` writes) import, reading the settings from the environment and
the TOML file as every appliance command does.
"""

from __future__ import annotations

import ray
from ray import serve
from ray.serve import Application

from appliance.config import Settings, load_settings
from appliance.scale.ingress import Ingress
from appliance.scale.plan import Plan, check_database, plan
from appliance.scale.replica import ModelReplica


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster (0 when this process is not connected)."""
    if not ray.is_initialized():
        return 0
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def build_app(settings: Settings, deployments: Plan | None = None) -> Application:
    """The bound application. When this process is connected to the cluster, SQLite is refused
    here already if the cluster has more than one node (the ingress checks again at start)."""
    check_database(settings, alive_nodes())
    current = deployments or plan(settings)
    handles = {
        deployment.model: serve.deployment(ModelReplica).options(**deployment.options).bind(
            settings, deployment.model, deployment.settings.num_cpus
        )
        for deployment in current.models
    }
    ingress = serve.deployment(serve.ingress()(Ingress)).options(**current.ingress)
    return ingress.bind(settings, handles, current.deployments())


def app_from_environment() -> Application:
    """`appliance.scale:app`: the settings from APPLIANCE_* and the TOML file."""
    return build_app(load_settings())
