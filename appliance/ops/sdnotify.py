"""sd_notify(3) without a dependency: readiness, watchdog, status and stopping for systemd.

systemd's `Type=notify` waits for `READY=1` on the datagram socket named by `NOTIFY_SOCKET`;
`WatchdogSec=` expects `WATCHDOG=1` at least every `WATCHDOG_USEC` microseconds or restarts the
service. Outside systemd (no `NOTIFY_SOCKET`) every call is a cheap no-op, so the server calls
these unconditionally. Must never raise because a notification failed: losing one status
line must not take the server down (systemd's own timeouts catch a server that truly hangs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: systemd wants a heartbeat within WATCHDOG_USEC; sd_watchdog_enabled(3) advises half of it.
WATCHDOG_FRACTION = 0.5


def _socket_address(notify_socket: str) -> str | bytes | None:
    """Map NOTIFY_SOCKET to an AF_UNIX address: '/path' as is, '@name' as an abstract socket."""
    if notify_socket.startswith("/"):
        return notify_socket
    if notify_socket.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of '@'.
        return b"\0" + notify_socket[1:].encode()
    return None


@dataclass(frozen=True)
class SystemdNotifier:
    """Sends sd_notify messages to one socket; disabled when `notify_socket` is None."""

    notify_socket: str | None

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """The notifier systemd asked for through NOTIFY_SOCKET (disabled when unset)."""
        return cls(os.environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.notify_socket is not None

    def notify(self, *assignments: str) -> bool:
        """Send newline-separated `KEY=VALUE` assignments in one datagram; True if sent."""
        if self.notify_socket is None:
            return False
        address = _socket_address(self.notify_socket)
        if address is None:
            logger.warning("NOTIFY_SOCKET=%s is not a unix socket path; notifications disabled", self.notify_socket)
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(payload)
        except OSError as exc:
            logger.warning("sd_notify to %s failed: %s", self.notify_socket, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the service is up: models loaded and the port listening."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a drain has begun, so `systemctl status` shows it and no restart races it."""
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status` (loading progress, drain progress)."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """One heartbeat: the event loop is alive."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, extra_s: float) -> bool:
        """Ask for more start/stop time (slow model loads, long drains) instead of being killed."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(extra_s * 1_000_000))}")


def _one_line(text: str) -> str:
    """The protocol is newline-separated: a newline inside STATUS would start a bogus field."""
    return " ".join(text.split())


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between heartbeats (half of WATCHDOG_USEC), or None when no watchdog is asked.

    Follows sd_watchdog_enabled(3): WATCHDOG_PID, when set, must name this very process,
    so a child that inherited the variables never pretends to be the service.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text and pid_text.strip() != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not an integer; watchdog heartbeat disabled", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 * WATCHDOG_FRACTION


async def watchdog_heartbeat(
    notifier: SystemdNotifier,
    interval_s: float,
    is_healthy: Callable[[], bool] | None = None,
) -> None:
    """Send WATCHDOG=1 every `interval_s` while `is_healthy()` holds; run as an asyncio task.

    The heartbeat runs on the server's event loop on purpose: a loop blocked by a stuck
    handler stops the heartbeat, and systemd restarts the service. A failing health check
    withholds the heartbeat for the same reason. Cancel the task to stop it.
    """
    while True:
        healthy = True
        if is_healthy is not None:
            try:
                healthy = bool(is_healthy())
            except Exception:  # noqa: BLE001 - a crashing check is an unhealthy server
                logger.exception("watchdog health check raised")
                healthy = False
        if healthy:
            notifier.watchdog()
        else:
            logger.warning("watchdog heartbeat withheld: health check failed")
        await asyncio.sleep(interval_s)


def start_watchdog(
    notifier: SystemdNotifier, is_healthy: Callable[[], bool] | None = None
) -> asyncio.Task[None] | None:
    """Start the heartbeat task on the running loop when systemd asked for one, else None."""
    interval_s = watchdog_interval_s()
    if interval_s is None or not notifier.enabled:
        return None
    return asyncio.get_running_loop().create_task(
        watchdog_heartbeat(notifier, interval_s, is_healthy), name="systemd-watchdog"
    )


#: How often the announcer asks the server whether it is ready yet.
READY_POLL_S = 0.2


async def announce_when_ready(
    notifier: SystemdNotifier,
    is_ready: Callable[[], tuple[bool, str]],
    should_stop: Callable[[], bool],
    poll_s: float = READY_POLL_S,
) -> bool:
    """Send READY=1 the first time `is_ready()` says so; STATUS= shows why not meanwhile.

    `is_ready` is the server's own readiness probe (models settled, database reachable), so
    systemd and `/v2/health/ready` never disagree. Returns False if the server began stopping
    first (then READY=1 is never sent).
    """
    last_reason = ""
    while not should_stop():
        ok, reason = is_ready()
        if ok:
            notifier.ready(f"ready: {reason}")
            return True
        if reason != last_reason:
            notifier.status(f"starting: {reason}")
            last_reason = reason
        await asyncio.sleep(poll_s)
    return False


def start_systemd_tasks(
    notifier: SystemdNotifier,
    is_ready: Callable[[], tuple[bool, str]],
    should_stop: Callable[[], bool],
) -> list[asyncio.Task[object]]:
    """The serve command's systemd duties on the running loop: readiness, then heartbeats.

    Keep the returned list referenced while the server runs (the loop holds tasks weakly).
    Nothing is started outside systemd.
    """
    if not notifier.enabled:
        return []
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[object]] = [
        loop.create_task(announce_when_ready(notifier, is_ready, should_stop), name="systemd-ready")
    ]
    watchdog = start_watchdog(notifier)
    if watchdog is not None:
        tasks.append(watchdog)  # type: ignore[arg-type]
    return tasks
