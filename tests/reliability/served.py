"""`appliance serve` as a real child process, the way a box runs it, for fault and load tests.

The server gets its own state directory and a free loopback port; its stdout and stderr go to
a log file the tests read afterwards (for secrets and prompt text). `kill9()` is the power
cut, `terminate()` the SIGTERM systemd sends. `sample_connections()` reads the server's
sockets with psutil, so a test can prove it never dialled anywhere. Only tests import this.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.helpers.server import free_port, process_env as clean_env  # clean_env: the name the reliability tests use

ROOT = Path(__file__).resolve().parents[2]
#: A 2-core box shared with other jobs loads the default LLM in well under this.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
_METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


@dataclass
class ServedAppliance:
    """One running `appliance serve` process."""

    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log_path: Path
    key: str
    remote_addresses: set[str] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value} (loopback is an admin network: no key needed)."""
        text = httpx.get(self.url("/metrics"), timeout=30).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            match = _METRIC_LINE.match(line)
            if match and not line.startswith("#"):
                labels = match.group("labels")
                values[match.group("name") + (f"{{{labels}}}" if labels else "")] = float(match.group("value"))
        return values

    def metric_sum(self, name: str) -> float:
        return sum(value for key, value in self.metrics().items() if key == name or key.startswith(name + "{"))

    def rss_bytes(self) -> int:
        process = psutil.Process(self.proc.pid)
        return int(process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True)))

    def sample_connections(self) -> None:
        """Remember every remote address the server's sockets are connected to right now."""
        try:
            process = psutil.Process(self.proc.pid)
            processes = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for each in processes:
            try:
                for connection in each.net_connections(kind="inet"):
                    if connection.raddr:
                        self.remote_addresses.add(connection.raddr.ip)
            except psutil.NoSuchProcess:
                continue

    def foreign_addresses(self) -> list[str]:
        """Sampled remote addresses that are not the test client's (loopback)."""
        return sorted(address for address in self.remote_addresses if not ipaddress.ip_address(address).is_loopback)

    def kill9(self) -> None:
        """The power cut: SIGKILL to the server, no chance to clean up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, as systemd stops the service; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode} before it was ready:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{base_url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"server not ready after {timeout_s:.0f} s:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


@contextmanager
def served(state_dir: Path, key: str, *, log_name: str = "server.log", **env: str) -> Iterator[ServedAppliance]:
    """Start `appliance serve` on `state_dir` (already holding models and keys) and wait until
    every model settled; the process is always gone when the block ends."""
    port = free_port()
    log_path = state_dir.parent / log_name
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--port", str(port)],
            cwd=ROOT, env=clean_env(state_dir, **env), stdout=log_file, stderr=subprocess.STDOUT,
        )
    appliance = ServedAppliance(proc=proc, port=port, state_dir=state_dir, log_path=log_path, key=key)
    try:
        wait_ready(appliance.base_url, proc, log_path)
        yield appliance
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def integrity_ok(db_path: Path) -> bool:
    with sqlite3.connect(db_path) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def table_rows(db_path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(db_path) as connection:
        return list(connection.execute(query).fetchall())
