"""`appliance serve --ray ADDRESS|auto`: deploy the appliance on a Ray cluster and keep it
served until SIGTERM/SIGINT.

`auto` starts a local Ray cluster owned by this process (stopped when it exits; call
`local.prepare_local_cluster()` before this module is imported, as the CLI does); an address
joins an existing cluster (`ray start --head` on one box, `ray start --address=HEAD:6379` on the
others, docs/SCALE.md). The ingress replica itself listens on the settings' host and port
(`scale.ingress = "direct"`, the default: plan.direct_ingress_environment, given to the job,
which every deployment inherits, and to Serve's controller, which reads it once, when it
starts), or Ray Serve's HTTP proxy does (`proxy`). A Serve instance already running with other
HTTP settings is refused rather than served from where it listens. At a
signal the application is deleted, which drains it (every replica gets `drain_grace_s` to
finish its requests), then this process disconnects (and stops the local cluster if it started
one). Exit codes as `appliance serve`: 0 after a clean stop, 2 when it could not start.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.context import _get_global_client

from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.ops.sdnotify import SystemdNotifier, watchdog_interval_s
from appliance.scale.application import alive_nodes, build_app, run_app
from appliance.scale.plan import (
    DIRECT_INGRESS_PROXY_PORT,
    HEAD_NODE_RESOURCE,
    Plan,
    check_database,
    controller_options,
    direct_ingress_environment,
    http_options,
    plan,
)
from appliance.store.scale_models import saved_changes

log = logging.getLogger("appliance.scale")

#: How often the waiting process wakes (signals, systemd's watchdog).
TICK_S = 1.0
#: How often the deployment's progress is read while it starts.
DEPLOY_POLL_S = 0.5
#: How long a direct ingress replica that Ray reports running may take to accept a connection.
DIRECT_PROBE_S = 5.0
#: Hosts that mean every interface (the probe then connects to the head node's address).
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
#: The probe's address when Ray names no head node.
LOOPBACK = "127.0.0.1"


class CannotStart(ApplianceError):
    """One readable line: why the Ray deployment could not start (exit 2)."""


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _connect(settings: Settings) -> bool:
    """Join the cluster, or start a local one; True when this process owns the cluster.

    A local cluster is one box: its CPU count is raised to what the replicas reserve (Ray's CPU
    count is a scheduling budget, and on one box every replica shares the same cores anyway).
    The job's environment is what every deployment inherits (plan.direct_ingress_environment)."""
    address = settings.scale.address
    local = address == "auto"
    environment = direct_ingress_environment(settings)
    runtime_env = {"env_vars": environment} if environment else None
    try:
        if local:
            cpus = max(os.cpu_count() or 1, math.ceil(_reserved_cpus(settings)))
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
                logging_level=logging.WARNING, configure_logging=False,
            )
        else:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - Ray's errors are many; one line says which
        raise CannotStart(f"scale.address: cannot {'start a local Ray cluster' if local else f'join the Ray cluster at {address}'}: {_first_line(exc)}") from None
    return local


def _reserved_cpus(settings: Settings) -> float:
    deployments = plan(settings, changes=saved_changes(settings.db_url))
    total = float(deployments.ingress["num_replicas"]) * settings.scale.ingress_cpus
    for deployment in deployments.models:
        autoscaling = deployment.options.get("autoscaling_config")
        count = autoscaling["max_replicas"] if isinstance(autoscaling, dict) else deployment.options["num_replicas"]
        total += count * deployment.settings.num_cpus
    return total


def prepare(settings: Settings) -> tuple[Application, Plan]:
    """Everything that may refuse before this process changes the cluster's applications: the
    database rule, the plan (with the replicas and resources an admin changed on the Models
    page), the build, a Serve instance already running with other HTTP settings; then Ray
    Serve is started (a no-op when it runs)."""
    try:
        check_database(settings, alive_nodes())  # before the database is opened
        deployments = plan(settings, changes=saved_changes(settings.db_url))
        app = build_app(settings, deployments)
    except ApplianceError as exc:
        raise CannotStart(str(exc)) from None
    http = http_options(settings)
    _check_running_serve(settings, http)
    serve.start(http_options=http, proxy_location=settings.scale.proxy_location, controller_options=controller_options(settings))
    return app, deployments


def deploy(settings: Settings, app: Application, deployments: Plan, stop: threading.Event) -> bool:
    """Run the application on the connected cluster; returns True once every replica is up
    (the ingress' models connected), False when `stop` was set first. A deployment that failed
    raises CannotStart with Ray's reason."""
    replicas = ", ".join(f"{d.model}={_count(d.options)}" for d in deployments.models) or "no models"
    log.info("deploying %s on %d Ray node(s): %s", settings.scale.app_name, alive_nodes(), replicas)
    name = settings.scale.app_name
    run_app(app, name)
    while not stop.wait(DEPLOY_POLL_S):
        application = serve.status().applications.get(name)
        status = str(application.status.value if application is not None else "NOT_STARTED")
        if status == "RUNNING":
            if settings.scale.ingress == "direct":
                _check_direct_ingress(settings)
            return True
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            reasons = [application.message] if application is not None and application.message else []
            if application is not None:
                reasons += [f"{d}: {info.message}" for d, info in application.deployments.items() if info.message]
            raise CannotStart(f"the Ray Serve application did not start ({status.lower()}): {_first_line(' / '.join(reasons) or status)}")
    return False


def _check_running_serve(settings: Settings, http: dict[str, Any]) -> None:
    """Ray Serve already running on the cluster (an earlier deploy, or `serve start`) keeps the
    HTTP options it started with: serve.start only warns about new ones. Refuse rather than
    listen somewhere the settings do not say (a direct ingress' controller has proxy port 0)."""
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return
    running = client.http_config
    if (running.host, running.port) != (http["host"], http["port"]):
        mode = "ingress = \"direct\"" if running.port == DIRECT_INGRESS_PROXY_PORT else f"its proxy on {running.host}:{running.port}"
        raise CannotStart(
            f"Ray Serve already runs on this cluster with {mode}, started by an earlier deploy; this one wants "
            f"ingress = \"{settings.scale.ingress}\" on {settings.host}:{settings.port}: stop it first with `serve shutdown -y` "
            "(on the head node), or deploy with the same settings"
        )


def _check_direct_ingress(settings: Settings) -> None:
    """The ingress replica listens on the head node's host:port (a controller started for
    another port by an earlier direct deploy would have handed out that one instead)."""
    host = settings.host if settings.host not in WILDCARD_HOSTS else _head_node_ip()
    deadline = time.monotonic() + DIRECT_PROBE_S
    while True:
        try:
            socket.create_connection((host, settings.port), timeout=DIRECT_PROBE_S).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise CannotStart(
                    f"ingress = \"direct\": the ingress replica does not listen on {host}:{settings.port} ({exc.strerror or exc}); "
                    "a Ray Serve controller started for another port keeps its port: `serve shutdown -y` on the head node"
                ) from None
            time.sleep(DEPLOY_POLL_S)


def _head_node_ip() -> str:
    return next(
        (str(node["NodeManagerAddress"]) for node in ray.nodes() if node.get("Alive") and HEAD_NODE_RESOURCE in node.get("Resources", {})),
        LOOPBACK,
    )


def _count(options: dict[str, object]) -> str:
    autoscaling = options.get("autoscaling_config")
    if isinstance(autoscaling, dict):
        return f"{autoscaling['min_replicas']}..{autoscaling['max_replicas']}"
    return str(options.get("num_replicas"))


def serve_on_ray(settings: Settings, announce: Callable[[str], None] = print) -> int:
    """Deploy, serve until a signal, drain, stop; the exit code (0). Raises CannotStart (after
    stopping what it started) when the application could not be deployed."""
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        signals.append(sig)
        stop.set()

    notifier = SystemdNotifier.from_environment()
    previous: dict[int, object] = {}
    owned = deployed = False
    try:
        if settings.scale.address == "auto" and not _port_free(settings.host, settings.port):
            raise CannotStart(f"cannot listen on {settings.host}:{settings.port}: the port is taken")
        owned = _connect(settings)
        # After connecting: Ray's core worker installs its own SIGTERM handler (it logs a stack
        # trace and ends the process), which would skip the drain.
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if stop.is_set():
            return 0
        app, deployments = prepare(settings)
        deployed = True
        if not deploy(settings, app, deployments, stop):
            return 0
        scheme = "https" if settings.tls_cert else "http"
        announce(
            f"serving on {scheme}://{settings.host}:{settings.port} through Ray Serve "
            f"({'a local cluster' if owned else settings.scale.address}, {alive_nodes()} node(s); state {settings.state_dir})"
        )
        notifier.ready("serving on Ray")
        interval = watchdog_interval_s()
        while not stop.wait(min(TICK_S, interval) if interval else TICK_S):
            if interval:
                notifier.watchdog()
        notifier.stopping(f"draining (grace {settings.drain_grace_s:.0f} s)")
        log.info("received %s: deleting the application (drains its replicas)", signal.Signals(signals[0]).name)
        return 0
    finally:
        _stop(settings, owned=owned, deployed=deployed)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _stop(settings: Settings, *, owned: bool, deployed: bool) -> None:
    """Delete the application if this process deployed it (a refused start leaves the one
    running alone), stop Serve on a cluster this process owns, disconnect."""
    if not ray.is_initialized():
        return
    started = time.monotonic()
    try:
        if deployed:
            serve.delete(settings.scale.app_name, _blocking=True)
        if owned:
            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - stopping must go on
        log.warning("stopping the Ray Serve application: %s", _first_line(exc))
    finally:
        ray.shutdown()
    log.info("stopped in %.1f s", time.monotonic() - started)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
