"""A private appliance server for one model version, for `appliance bench --compare`.

The running server serves one version per model, so comparing variants means serving each in
turn. Rather than switch what production serves, the bench starts `appliance serve` as a
child process on a free loopback port, with its own state directory that holds only the
chosen version (hard links into the repository, copies where links are impossible), its own
database and auth off (allowed on loopback only). Every other setting (batching, threads,
providers) comes from the caller's environment and config file, so the variant runs as the
appliance would run it. The child is stopped with SIGTERM (then SIGKILL) and its folder
removed. Never touches the real repository's files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from appliance.errors import ServerUnreachable
from appliance.repository.store import ModelRepository, ModelVersion

#: How long a private server may take to load its model and answer ready, in seconds.
SERVER_START_TIMEOUT_S = 300.0
#: How long it gets to drain after SIGTERM before SIGKILL, in seconds.
SERVER_STOP_TIMEOUT_S = 30.0
READY_POLL_INTERVAL_S = 0.2
LOG_FILE = "server.log"


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def link_version(version: ModelVersion, models_dir: Path) -> Path:
    """Mirror one version folder into `models_dir/<name>/<version>/` by hard links (or copies)."""
    target = models_dir / version.name / str(version.version)
    for dirpath, _dirnames, filenames in os.walk(version.path):
        relative = Path(dirpath).relative_to(version.path)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for filename in filenames:
            source = Path(dirpath) / filename
            if source.is_symlink():
                continue
            destination = target / relative / filename
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)
    return target


def link_versions(served: ModelVersion, companions: tuple[ModelVersion, ...], models_dir: Path) -> None:
    """Mirror `served` and its companions into `models_dir`, `served` the default version. The
    manifests are rewritten by rename, so links into the real repository are replaced, never
    written through."""
    link_version(served, models_dir)
    for companion in companions:
        link_version(companion, models_dir)
    if companions:
        ModelRepository(models_dir).set_default(served.name, served.version)


class PrivateServer:
    """`with PrivateServer(version, work_root) as server:` serves `version` at `server.url`."""

    def __init__(self, version: ModelVersion, work_root: Path, *, config_file: Path | None = None,
                 start_timeout_s: float = SERVER_START_TIMEOUT_S, extra_env: dict[str, str] | None = None,
                 companions: tuple[ModelVersion, ...] = ()) -> None:
        self.version = version
        #: Other versions of the same model the server needs beside it (the draft that
        #: `generation.speculative = "draft"` picks); `version` stays the one served.
        self.companions = companions
        #: Settings for this server only, as APPLIANCE_* variables (e.g. batching off for a
        #: side-by-side run); they win over the caller's environment and config file.
        self.extra_env = dict(extra_env or {})
        self.work_root = work_root
        self.config_file = config_file
        self.start_timeout_s = start_timeout_s
        self.port = free_loopback_port()
        self.folder: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> PrivateServer:
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.version.name}-v{self.version.version}-", dir=self.work_root))
        state_dir = self.folder / "state"
        link_versions(self.version, self.companions, state_dir / "models")
        env = dict(os.environ)
        env["APPLIANCE_DATABASE_URL"] = f"sqlite:///{state_dir / 'appliance.db'}"
        env.pop("NOTIFY_SOCKET", None)  # never answer systemd on the real service's behalf
        env.pop("WATCHDOG_USEC", None)
        env.update(self.extra_env)
        command = [sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--state-dir", str(state_dir), "--no-auth"]
        if self.config_file is not None:
            command += ["--config", str(self.config_file)]
        log = open(self.folder / LOG_FILE, "wb")  # noqa: SIM115 - the child owns it until it exits
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _last_log_line(self) -> str:
        if self.folder is None:
            return ""
        try:
            lines = [line for line in (self.folder / LOG_FILE).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        label = f"{self.version.name} version {self.version.version}"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerUnreachable(f"the private server for {label} exited with {code}: {self._last_log_line()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(READY_POLL_INTERVAL_S)
        raise ServerUnreachable(f"the private server for {label} was not ready within {self.start_timeout_s:g} s")

    def stop(self) -> None:
        """SIGTERM, wait for the drain, SIGKILL if it hangs; then remove the folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
