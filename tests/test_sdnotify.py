"""sd_notify over a real datagram socket, as systemd's Type=notify and WatchdogSec= expect."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.ops.sdnotify import (
    SystemdNotifier,
    announce_when_ready,
    start_systemd_tasks,
    start_watchdog,
    watchdog_heartbeat,
    watchdog_interval_s,
)


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(5)
    yield address, sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_sends_ready_and_status_in_one_datagram(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    assert SystemdNotifier(address).ready("2 models loaded")
    assert _received(sock) == ["READY=1", "STATUS=2 models loaded"]


def test_abstract_socket_named_with_at_sign_is_reached() -> None:
    name = f"appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert SystemdNotifier(f"@{name}").stopping()
        assert _received(sock) == ["STOPPING=1"]


def test_status_with_newlines_stays_one_field(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    SystemdNotifier(address).status("draining\n3 requests\tleft")
    assert _received(sock) == ["STATUS=draining 3 requests left"]


def test_extend_timeout_is_sent_in_microseconds(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    SystemdNotifier(address).extend_timeout(1.5)
    assert _received(sock) == ["EXTEND_TIMEOUT_USEC=1500000"]


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier.from_environment()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert not SystemdNotifier(str(tmp_path / "gone.sock")).ready()


def test_non_unix_address_disables_notifications() -> None:
    assert not SystemdNotifier("vsock:2:1234").ready()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(env) == 15.0


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_no_watchdog_without_watchdog_usec_or_with_garbage() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def test_heartbeat_sends_watchdog_repeatedly_until_cancelled(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket

    async def run() -> None:
        task = asyncio.create_task(watchdog_heartbeat(SystemdNotifier(address), 0.01))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert _received(sock) == ["WATCHDOG=1"]
    assert _received(sock) == ["WATCHDOG=1"]


def test_heartbeat_is_withheld_while_the_health_check_fails(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    sock.setblocking(False)

    async def run() -> None:
        task = asyncio.create_task(watchdog_heartbeat(SystemdNotifier(address), 0.01, lambda: False))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run())
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_start_watchdog_runs_only_when_systemd_asks(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    notifier = SystemdNotifier(address)

    async def started() -> bool:
        task = start_watchdog(notifier)
        if task is None:
            return False
        await asyncio.sleep(0.02)
        task.cancel()
        return True

    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert not asyncio.run(started())
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert asyncio.run(started())
    assert _received(sock) == ["WATCHDOG=1"]


def test_ready_is_announced_only_once_the_server_says_ready(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    answers = iter([(False, "models are loading"), (False, "models are loading"), (True, "ready")])

    announced = asyncio.run(
        announce_when_ready(SystemdNotifier(address), lambda: next(answers), lambda: False, poll_s=0.001)
    )
    assert announced
    assert _received(sock) == ["STATUS=starting: models are loading"]
    assert _received(sock) == ["READY=1", "STATUS=ready: ready"]


def test_no_ready_when_the_server_stops_while_starting(path_socket: tuple[str, socket.socket]) -> None:
    address, _ = path_socket
    announced = asyncio.run(
        announce_when_ready(SystemdNotifier(address), lambda: (False, "loading"), lambda: True, poll_s=0.001)
    )
    assert not announced


def test_systemd_tasks_start_only_with_a_notify_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket

    async def run(notifier: SystemdNotifier) -> int:
        tasks = start_systemd_tasks(notifier, lambda: (True, "ready"), lambda: False)
        await asyncio.gather(*tasks[:1])
        for task in tasks:
            task.cancel()
        return len(tasks)

    assert asyncio.run(run(SystemdNotifier(None))) == 0
    assert asyncio.run(run(SystemdNotifier(address))) >= 1
    assert _received(sock)[0] == "READY=1"
