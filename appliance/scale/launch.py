"""`appliance serve --ray ADDRESS|auto`: deploy the appliance on a Ray cluster and keep it
served until SIGTERM/SIGINT.

`auto` starts a local Ray cluster owned by this process (stopped when it exits; call
`local.prepare_local_cluster()` before this module is imported, as the CLI does); an address
joins an existing cluster (`ray start --head` on one box, `ray start --address=HEAD:6379` on the
others, docs/SCALE.md). Ray Serve's HTTP proxy listens on the settings' host and port. At a
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

import ray
from ray import serve

from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.ops.sdnotify import SystemdNotifier, watchdog_interval_s
from appliance.scale.application import alive_nodes, build_app, run_app
from appliance.scale.plan import check_database, plan
from appliance.store.scale_models import saved_changes

log = logging.getLogger("appliance.scale")

#: How often the waiting process wakes (signals, systemd's watchdog).
TICK_S = 1.0
#: How often the deployment's progress is read while it starts.
DEPLOY_POLL_S = 0.5


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
    count is a scheduling budget, and on one box every replica shares the same cores anyway)."""
    address = settings.scale.address
    local = address == "auto"
    try:
        if local:
            cpus = max(os.cpu_count() or 1, math.ceil(_reserved_cpus(settings)))
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
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


def deploy(settings: Settings, stop: threading.Event) -> bool:
    """Build the application from the settings (with the replicas and resources an admin
    changed on the Models page) and run it on the connected cluster; returns
    True once every replica is up (the ingress' models connected), False when `stop` was set
    first. A deployment that failed raises CannotStart with Ray's reason."""
    try:
        check_database(settings, alive_nodes())  # before the database is opened
        deployments = plan(settings, changes=saved_changes(settings.db_url))
        app = build_app(settings, deployments)
    except ApplianceError as exc:
        raise CannotStart(str(exc)) from None
    http: dict[str, object] = {"host": settings.host, "port": settings.port}
    if settings.tls_cert is not None and settings.tls_key is not None:
        http.update(ssl_certfile=str(settings.tls_cert), ssl_keyfile=str(settings.tls_key))
    serve.start(http_options=http, proxy_location=settings.scale.proxy_location)
    replicas = ", ".join(f"{d.model}={_count(d.options)}" for d in deployments.models) or "no models"
    log.info("deploying %s on %d Ray node(s): %s", settings.scale.app_name, alive_nodes(), replicas)
    name = settings.scale.app_name
    run_app(app, name)
    while not stop.wait(DEPLOY_POLL_S):
        application = serve.status().applications.get(name)
        status = str(application.status.value if application is not None else "NOT_STARTED")
        if status == "RUNNING":
            return True
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            reasons = [application.message] if application is not None and application.message else []
            if application is not None:
                reasons += [f"{d}: {info.message}" for d, info in application.deployments.items() if info.message]
            raise CannotStart(f"the Ray Serve application did not start ({status.lower()}): {_first_line(' / '.join(reasons) or status)}")
    return False


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
    owned = False
    try:
        if settings.scale.address == "auto" and not _port_free(settings.host, settings.port):
            raise CannotStart(f"cannot listen on {settings.host}:{settings.port}: the port is taken")
        owned = _connect(settings)
        # After connecting: Ray's core worker installs its own SIGTERM handler (it logs a stack
        # trace and ends the process), which would skip the drain.
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if stop.is_set() or not deploy(settings, stop):
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
        _stop(settings, owned)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _stop(settings: Settings, owned: bool) -> None:
    if not ray.is_initialized():
        return
    started = time.monotonic()
    try:
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
