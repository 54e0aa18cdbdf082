"""`appliance serve` and `appliance up`: run the server in the foreground.

Exit codes: 0 after SIGTERM/SIGINT when in-flight work drained within `drain_grace_s`; 1 when
the drain ran out of time; 2 when the server cannot start (bad config, port taken, auth off
beyond loopback). During the drain the server keeps answering, with 503 for new work, and the
readiness probe says 503. uvicorn's habit of re-raising the signal after shutdown is turned
off so the exit code is ours.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from appliance.admin.tls import ensure_tls
from appliance.cli.app import ConfigOption, StateDirOption, app, console, fail, settings_from
from appliance.cli.export_cmd import INTERRUPTED_EXIT_CODE
from appliance.cli.logging_setup import configure_logging
from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.ops.sdnotify import SystemdNotifier, start_systemd_tasks
from appliance.repository import ModelRepository

log = logging.getLogger("appliance.server")

EXIT_DRAIN_TIMEOUT = 1
EXIT_CANNOT_START = 2
#: uvicorn's own exit status when the app's lifespan startup failed.
UVICORN_STARTUP_FAILURE = 3

HostOption = Annotated[str | None, typer.Option("--host", help="Address to listen on. Env: APPLIANCE_HOST.")]
PortOption = Annotated[int | None, typer.Option("--port", help="TCP port. Env: APPLIANCE_PORT.")]
NoAuthOption = Annotated[
    bool, typer.Option("--no-auth", help="Serve without API keys (only allowed on loopback).")
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option("--tls-cert", help="TLS certificate (PEM). Beyond loopback without one, a self-signed one is made. Env: APPLIANCE_TLS_CERT."),
]
TlsKeyOption = Annotated[Path | None, typer.Option("--tls-key", help="TLS private key (PEM). Env: APPLIANCE_TLS_KEY.")]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS|auto",
        help="Serve on a Ray cluster (the `ray` extra): its head's HOST:PORT, or 'auto' to start a local one for the "
        "server's lifetime (docs/SCALE.md). Env: APPLIANCE_SCALE__ADDRESS.",
    ),
]
ReplicasOption = Annotated[
    list[str] | None,
    typer.Option("--replicas", metavar="MODEL=N", help="With --ray: N replicas of MODEL (repeatable); else scale.models."),
]


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains before it stops listening and never re-raises the signal."""

    def __init__(self, config: uvicorn.Config, *, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self.signalled: int | None = None
        self.drain_deadline: float | None = None
        self.drained = True
        self._ctx = None
        self._inflight = None
        # systemd (Type=notify, WatchdogSec=): READY=1 once models settled, heartbeats, STOPPING=1.
        self.notifier = SystemdNotifier.from_environment()
        self._systemd_tasks: list[object] = []

    def attach(self, ctx: object, inflight: object) -> None:
        self._ctx = ctx
        self._inflight = inflight

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled is not None:
            # A second signal: stop now.
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT
            return
        self.signalled = sig
        self.drain_deadline = time.monotonic() + self.grace_s
        self.notifier.stopping(f"draining (grace {self.grace_s:.0f} s)")
        if self._ctx is not None:
            self._ctx.draining = True  # type: ignore[attr-defined]
        log.info("received %s: draining (grace %.1f s)", signal.Signals(sig).name, self.grace_s)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._ctx is not None:
            self._systemd_tasks = start_systemd_tasks(
                self.notifier, self._ctx.ready, lambda: self.should_exit or self.signalled is not None  # type: ignore[attr-defined]
            )

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None:
            if self._busy() == 0:
                return True
            if time.monotonic() >= self.drain_deadline:
                self.drained = False
                log.error("drain grace of %.1f s ran out with %d request(s) in flight", self.grace_s, self._busy())
                return True
        return await super().on_tick(counter)

    def _busy(self) -> int:
        http = self._inflight.value if self._inflight is not None else 0  # type: ignore[attr-defined]
        return int(http)


def _bind(settings: Settings) -> socket.socket:
    """Bind the listening socket ourselves so a taken port is one readable line."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        why = "the port is taken" if exc.errno == errno.EADDRINUSE else exc.strerror
        fail(f"cannot listen on {settings.host}:{settings.port}: {why}", code=EXIT_CANNOT_START)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(settings: Settings) -> int:
    """Serve until a signal; returns the process exit code."""
    from appliance.app import check_bind_policy, create_app

    configure_logging(settings.log_level, settings.log_format)
    try:
        check_bind_policy(settings)
    except ApplianceError as exc:
        fail(str(exc), code=EXIT_CANNOT_START)
    try:
        settings, tls_note = ensure_tls(settings)
    except (OSError, ValueError) as exc:
        fail(f"tls_cert: cannot prepare TLS: {exc}", code=EXIT_CANNOT_START)
    if tls_note:
        log.warning(tls_note)
    # Bind before building the app: a taken port fails fast, before migrations run.
    sock = _bind(settings)
    try:
        application = create_app(settings)
    except ApplianceError as exc:
        sock.close()
        fail(str(exc), code=EXIT_CANNOT_START)
    config = uvicorn.Config(
        application,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_grace_s) or 1),
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_level=settings.log_level,
    )
    server = DrainingServer(config, grace_s=settings.drain_grace_s)
    server.attach(application.state.ctx, application.state.inflight)
    scheme = "https" if settings.tls_cert else "http"
    console.print(f"serving on {scheme}://{settings.host}:{settings.port} (state {settings.state_dir})", highlight=False)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        return EXIT_CANNOT_START if code == UVICORN_STARTUP_FAILURE else code
    finally:
        sock.close()
    if not server.started:
        return EXIT_CANNOT_START
    if server.signalled is not None and not server.drained:
        return EXIT_DRAIN_TIMEOUT
    return 0


def _settings(
    host: str | None, port: int | None, state_dir: object, config: object, no_auth: bool,
    tls_cert: Path | None = None, tls_key: Path | None = None, ray: str | None = None,
) -> Settings:
    return settings_from(
        host=host, port=port, state_dir=state_dir, config=config, auth=False if no_auth else None,
        tls_cert=tls_cert, tls_key=tls_key, scale={"address": ray} if ray else None,
    )


def run_on_ray(settings: Settings, replicas: list[str]) -> int:
    """`serve --ray`: the appliance as a Ray Serve application (appliance.scale); the same
    checks before it starts as `run_server`."""
    from appliance.app import check_bind_policy

    configure_logging(settings.log_level, settings.log_format)
    try:
        check_bind_policy(settings)
    except ApplianceError as exc:
        fail(str(exc), code=EXIT_CANNOT_START)
    if settings.scale.address == "auto":
        from appliance.scale.local import prepare_local_cluster

        prepare_local_cluster()  # before Ray is imported: it reads its auth settings once
    try:
        from appliance.scale.launch import serve_on_ray
        from appliance.scale.plan import with_replicas
    except ImportError as exc:
        fail(f"--ray needs the `ray` extra ({exc.name} is not installed): pip install 'inference-appliance[ray]'", code=EXIT_CANNOT_START)
    try:
        settings, tls_note = ensure_tls(settings)
        settings = with_replicas(settings, replicas)
    except (OSError, ValueError) as exc:
        fail(f"tls_cert: cannot prepare TLS: {exc}", code=EXIT_CANNOT_START)
    except ApplianceError as exc:
        fail(str(exc), code=EXIT_CANNOT_START)
    if tls_note:
        log.warning(tls_note)
    try:
        return serve_on_ray(settings, announce=lambda line: console.print(line, highlight=False, soft_wrap=True))
    except ApplianceError as exc:
        fail(str(exc), code=EXIT_CANNOT_START)


@app.command("serve")
def serve(
    host: HostOption = None,
    port: PortOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    no_auth: NoAuthOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    ray: RayOption = None,
    replicas: ReplicasOption = None,
) -> None:
    """Serve every deployable model in the repository (KServe V2 + OpenAI API) until SIGTERM."""
    settings = _settings(host, port, state_dir, config, no_auth, tls_cert, tls_key, ray)
    if settings.scale.address:
        raise typer.Exit(run_on_ray(settings, replicas or []))
    if replicas:
        fail("--replicas needs --ray (replicas run on a Ray cluster)", code=EXIT_CANNOT_START)
    raise typer.Exit(run_server(settings))


@app.command("up")
def up(
    host: HostOption = None,
    port: PortOption = None,
    state_dir: StateDirOption = None,
    config: ConfigOption = None,
    no_auth: NoAuthOption = False,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Quickstart: make sure the embedded default models are exported, then serve."""
    settings = _settings(host, port, state_dir, config, no_auth, tls_cert, tls_key)
    try:
        from appliance.export.defaults import DEFAULT_MODELS, existing_default
    except ImportError as exc:
        fail(f"the export stage is not installed ({exc.name}); install the 'export' extra or use `appliance serve`", code=EXIT_CANNOT_START)
    repository = ModelRepository(settings.models_dir)
    if any(existing_default(repository, model) is None for model in DEFAULT_MODELS):
        _export_defaults_in_child(settings, config)
    for model in DEFAULT_MODELS:
        version = existing_default(repository, model)
        if version is None:
            fail(f"exporting the default models failed: {model.name} has no deployable version", code=EXIT_CANNOT_START)
        console.print(f"model {version.name} version {version.version} ready to serve", highlight=False)
    raise typer.Exit(run_on_ray(settings, []) if settings.scale.address else run_server(settings))


def _export_defaults_in_child(settings: Settings, config: Path | None) -> None:
    """`appliance export --defaults` in a child process: the export loads torch and
    transformers (~0.7 GB resident, plus their thread pools), which the server must not carry
    for its whole life. The child shares the terminal, so its progress bars show as they are."""
    command = [sys.executable, "-m", "appliance", "export", "--defaults", "--state-dir", str(settings.state_dir)]
    if config is not None:
        command += ["--config", str(config)]
    child = subprocess.Popen(command)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        # The child got the same Ctrl-C: let it remove what it staged and say so itself.
        child.wait()
        fail("interrupted: the default models were not all exported", code=INTERRUPTED_EXIT_CODE)
    if code != 0:
        fail("exporting the default models failed (the export said why above)", code=EXIT_CANNOT_START)
