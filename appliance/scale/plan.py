"""The deployments a Ray Serve application of the appliance consists of, decided from the
settings and the model repository in one place: the code path (`application.py`, for
`appliance serve --ray` and `serve run appliance.scale:app`) and the config file (`appliance
scale config` for `serve deploy`) both read this plan, so they cannot disagree.

- one `ingress` deployment: the appliance's own FastAPI app;
- one deployment per model with a deployable version (`model-NAME`), unless
  `scale.models.NAME.deploy` is false, with its replicas (fixed, or autoscaling bounds),
  what each replica reserves on its node, and how it is health-checked and drained;
- in copy mode (`scale.model_files = "copy"`), the `repository` deployment: one replica on the
  head node that hands the repository's files to replicas on other nodes (source.py);
- with `scale.ingress = "direct"`, the environment that turns on Ray Serve's direct ingress in
  its controller and the ingress replica (`direct_ingress_environment`), and the ingress pinned
  to the head node, where clients find host:port.

Also the rule for the database: SQLite only while every replica runs on one node. Never
imports Ray (the config command works without the `ray` extra).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from appliance.config import ScaleModelSettings, Settings
from appliance.errors import ApplianceError, ConfigError
from appliance.repository.store import ModelRepository
from appliance.serving.tasks import family_of

INGRESS = "ingress"
SOURCE = "repository"
#: Ray's resource that only the head node has (ray._common.constants.HEAD_NODE_RESOURCE_NAME;
#: Ray Serve pins its own controller with it): the copy mode's source runs where the repository is.
HEAD_NODE_RESOURCE = "node:__internal_head__"
#: Chunk requests the source takes at once (each at most files.CHUNK_BYTES in its memory).
SOURCE_MAX_ONGOING = 64
#: Requests the ingress replica takes at once (it is an async web app: the engines queue).
INGRESS_MAX_ONGOING = 4096
#: A replica whose constructor (loading its model) fails is retried this many times.
CONSTRUCTOR_RETRIES = 3
#: Ray waits this long for a health check to answer.
HEALTH_CHECK_TIMEOUT_S = 30.0
#: Ray Serve's own per-call access log off: the ingress logs requests as the privacy mode says
#: (api/request_logging.py), and a line per replica call would be noise at any rate.
REPLICA_LOGGING = {"enable_access_log": False}
#: Ray Serve's switch for direct ingress (ray.serve._private.constants): an ingress replica runs
#: its own HTTP server on a port its controller hands out from a range.
DIRECT_INGRESS_SWITCH = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_INGRESS_MIN_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
DIRECT_INGRESS_MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
#: How long a direct ingress replica keeps serving after it was told to stop, for an external
#: load balancer to take it out (Ray's default 30 s); none is in front of the appliance, which
#: drains its requests with `drain_grace_s` as in proxy mode.
DIRECT_INGRESS_DRAINING = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
#: How long a released port stays out of the controller's pool (Ray's default 150 s, for HAProxy
#: to forget it); the appliance's port has no HAProxy in front, and an ingress replica that
#: died must get it back at once.
DIRECT_INGRESS_QUARANTINE = "RAY_SERVE_PORT_QUARANTINE_S"
#: Ray Serve's proxy port in direct mode: it still starts one on the head node (Ray's fallback
#: way in), which must not take host:port from the ingress; 0 lets the system pick a free one.
DIRECT_INGRESS_PROXY_PORT = 0
#: The environment a `serve deploy` build reads the appliance's settings from.
SETTINGS_ENVIRONMENT = ("APPLIANCE_STATE_DIR", "APPLIANCE_CONFIG", "APPLIANCE_DATABASE_URL")
_REPLICAS_ARG = re.compile(r"^(?P<model>[a-z0-9][a-z0-9._-]{0,63})=(?P<count>\d+)$")


def deployment_name(model: str) -> str:
    return f"model-{model}"


@dataclass(frozen=True)
class ModelDeployment:
    model: str
    family: str
    settings: ScaleModelSettings
    options: dict[str, Any] = field(hash=False)

    @property
    def name(self) -> str:
        return str(self.options["name"])


@dataclass(frozen=True)
class Plan:
    ingress: dict[str, Any]
    models: list[ModelDeployment]
    #: Every model with a deployable version, deployed or not: {name: task family}.
    served: dict[str, str] = field(default_factory=dict)
    #: The copy mode's `repository` deployment; None when every node shares the repository.
    source: dict[str, Any] | None = None

    def deployments(self) -> dict[str, str]:
        """Model name -> its deployment's name."""
        return {deployment.model: deployment.name for deployment in self.models}


def with_replicas(settings: Settings, replicas: list[str]) -> Settings:
    """`--replicas MODEL=N` (repeatable) over the settings: N fixed replicas for MODEL."""
    models = dict(settings.scale.models)
    for text in replicas:
        match = _REPLICAS_ARG.match(text.strip())
        if match is None or int(match["count"]) < 1:
            raise ConfigError(f"--replicas: expected MODEL=N with N >= 1, got {text!r}", field="replicas")
        name = match["model"]
        models[name] = settings.scale.model(name).model_copy(
            update={"replicas": int(match["count"]), "min_replicas": None, "max_replicas": None, "deploy": True}
        )
    return settings.model_copy(update={"scale": settings.scale.model_copy(update={"models": models})})


def served_models(settings: Settings) -> dict[str, str]:
    """{model name: task family} of every model with a deployable version in the repository."""
    repository = ModelRepository(settings.models_dir)
    served: dict[str, str] = {}
    for name in repository.names():
        try:
            version = repository.serving_version(name)
        except ApplianceError:
            continue
        if version is not None:
            served[name] = family_of(version.manifest.task)
    return served


def plan(settings: Settings, models: dict[str, str] | None = None, changes: dict[str, dict[str, Any]] | None = None) -> Plan:
    """The application's deployments (`models`: {name: family}, default read from the
    repository), with an admin's `changes` per model (store/scale_models.py) over the
    configured replicas and resources; changes to models no longer served are left out."""
    chosen = served_models(settings) if models is None else models
    scale = settings.scale.with_model_changes({name: fields for name, fields in (changes or {}).items() if name in chosen})
    unknown = sorted(set(scale.models) - set(chosen))
    if unknown:
        raise ConfigError(
            f"scale.models: {', '.join(unknown)} not in the model repository (models: {', '.join(sorted(chosen)) or 'none'})",
            field="scale.models",
        )
    deployments = [
        ModelDeployment(name, family, scale.model(name), _model_options(settings, name, family, scale.model(name)))
        for name, family in sorted(chosen.items())
        if scale.model(name).deploy
    ]
    ingress_actor: dict[str, Any] = {"num_cpus": scale.ingress_cpus}
    if scale.ingress == "direct":
        ingress_actor["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    ingress = {
        "name": INGRESS,
        "num_replicas": scale.ingress_replicas,
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
        "ray_actor_options": ingress_actor,
        "graceful_shutdown_timeout_s": settings.drain_grace_s,
        "health_check_period_s": scale.health_check_period_s,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "logging_config": dict(REPLICA_LOGGING),
    }
    return Plan(ingress=ingress, models=deployments, served=dict(chosen), source=_source_options(settings) if scale.model_files == "copy" else None)


def direct_ingress_environment(settings: Settings) -> dict[str, str]:
    """What Ray Serve's controller (which hands out the port) and the ingress replica (which
    listens) need for direct ingress on the appliance's own port: a port range of exactly
    `settings.port`, so the one ingress replica gets that port. Empty in proxy mode.

    Every deployment gets it, not only the ingress (other replicas ignore it): as the job's
    environment (launch.py) or the application's (`serve_config`). A deployment's own
    environment would not do: a redeploy from the ingress (an admin's change) gives the
    deployments without one the ingress' environment, which Ray Serve would take for a change
    of every model and restart their replicas."""
    if settings.scale.ingress != "direct":
        return {}
    return {
        DIRECT_INGRESS_SWITCH: "1",
        DIRECT_INGRESS_MIN_PORT: str(settings.port),
        DIRECT_INGRESS_MAX_PORT: str(settings.port + 1),
        DIRECT_INGRESS_DRAINING: "0",
        DIRECT_INGRESS_QUARANTINE: "0",
    }


def http_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve's HTTP options: the proxy on host:port, or (direct ingress) the ingress replica
    there and the proxy Ray still starts on a free port of the same host; TLS for both."""
    port = DIRECT_INGRESS_PROXY_PORT if settings.scale.ingress == "direct" else settings.port
    http: dict[str, Any] = {"host": settings.host, "port": port}
    if settings.tls_cert is not None and settings.tls_key is not None:
        http.update(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
    return http


def controller_options(settings: Settings) -> dict[str, Any] | None:
    """Ray Serve's controller options: its environment for direct ingress (it is read when the
    controller starts, so a controller already running keeps its mode)."""
    environment = direct_ingress_environment(settings)
    return {"runtime_env": {"env_vars": environment}} if environment else None


def _source_options(settings: Settings) -> dict[str, Any]:
    """The copy mode's source: one replica on the head, no CPU reserved (it is idle but while a
    node copies, and then bound by disk and network)."""
    return {
        "name": SOURCE,
        "num_replicas": 1,
        "max_ongoing_requests": SOURCE_MAX_ONGOING,
        "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        "health_check_period_s": settings.scale.health_check_period_s,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": settings.drain_grace_s,
        "logging_config": dict(REPLICA_LOGGING),
    }


def _model_options(settings: Settings, name: str, family: str, model: ScaleModelSettings) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": model.num_cpus}
    if model.num_gpus:
        actor["num_gpus"] = model.num_gpus
    if model.memory_bytes:
        actor["memory"] = model.memory_bytes
    if model.max_ongoing_requests is not None:
        ongoing = model.max_ongoing_requests
    elif family == "generation":
        ongoing = settings.generation.max_running_sequences + settings.generation.max_waiting_sequences
    else:
        ongoing = settings.batching.max_queue_size
    options: dict[str, Any] = {
        "name": deployment_name(name),
        "max_ongoing_requests": ongoing,
        # Beyond this many waiting in an ingress' router, Ray refuses (429 with Retry-After,
        # as a full queue on one box) instead of queueing without bound.
        "max_queued_requests": ongoing,
        "ray_actor_options": actor,
        "health_check_period_s": settings.scale.health_check_period_s,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": settings.drain_grace_s,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "logging_config": dict(REPLICA_LOGGING),
    }
    if model.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = model.max_replicas_per_node
    if model.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": model.min_replicas or 1,
            "max_replicas": model.max_replicas,
            "target_ongoing_requests": model.target_ongoing_requests,
            "upscale_delay_s": settings.scale.upscale_delay_s,
            "downscale_delay_s": settings.scale.downscale_delay_s,
            "look_back_period_s": settings.scale.autoscaling_window_s,
        }
    else:
        options["num_replicas"] = model.replicas
    return options


def check_database(settings: Settings, nodes: int) -> None:
    """SQLite is one file on one node: refused once replicas may run on more than one."""
    if settings.uses_sqlite and nodes > 1:
        raise ConfigError(
            f"database_url: the Ray cluster has {nodes} nodes and the appliance's replicas may run on any of them, "
            "but SQLite is a file on one node; use PostgreSQL (database_url = \"postgresql+psycopg://USER@HOST/DB\", "
            "docs/SCALE.md)",
            field="database_url",
        )


def serve_config(
    settings: Settings, models: dict[str, str] | None = None, changes: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A `serve deploy` config: the HTTP options, and the application with every deployment's
    options written out (editable; `serve deploy` applies them over the code's), with an
    admin's saved `changes` as `appliance serve --ray` deploys them: a file written after an
    admin scaled a model must not scale it back when deployed."""
    current = plan(settings, models, changes)
    environment = {name: os.environ[name] for name in SETTINGS_ENVIRONMENT if os.environ.get(name)}
    environment.setdefault("APPLIANCE_STATE_DIR", str(settings.state_dir))
    if settings.config is not None:
        environment.setdefault("APPLIANCE_CONFIG", str(settings.config))
    if settings.database_url is not None:
        environment.setdefault("APPLIANCE_DATABASE_URL", settings.database_url)
    environment["RAY_USAGE_STATS_ENABLED"] = "0"
    environment.update(direct_ingress_environment(settings))
    controller = controller_options(settings)
    return {
        "proxy_location": settings.scale.proxy_location,
        "http_options": http_options(settings),
        **({"controller_options": controller} if controller is not None else {}),
        "applications": [
            {
                "name": settings.scale.app_name,
                "route_prefix": "/",
                "import_path": "appliance.scale:app",
                "runtime_env": {"env_vars": environment},
                "deployments": [_without_name_first(current.ingress)]
                + ([_without_name_first(current.source)] if current.source is not None else [])
                + [_without_name_first(d.options) for d in current.models],
            }
        ],
    }


def _without_name_first(options: dict[str, Any]) -> dict[str, Any]:
    return {"name": options["name"], **{key: value for key, value in options.items() if key != "name"}}


def to_yaml(value: Any, indent: int = 0) -> str:
    """A small YAML writer for the config's plain dicts, lists and scalars (strings quoted as
    JSON, which YAML reads the same), so the command needs no YAML library."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                text = to_yaml(item, indent + 1)
                lines.append(f"{pad}- {text.lstrip()}")
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return json.dumps(str(value))
