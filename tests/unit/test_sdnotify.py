"""The systemd notify protocol (sd_notify(3)) on real unix datagram sockets."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_daemon.sdnotify import Notifier


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's, and its path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield sock, path


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on the socket, without blocking."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2)


def test_ready_watchdog_and_stopping_reach_the_socket(
    listener: tuple[socket.socket, str],
) -> None:
    """READY=1 with STATUS=, WATCHDOG=1 and STOPPING=1 arrive as datagrams, in order."""
    sock, path = listener
    notifier = Notifier(path, watchdog_usec=60_000_000)
    notifier.ready("checkpoint 12")
    notifier.watchdog()
    notifier.stopping()
    assert [sock.recv(4096).decode() for _ in range(3)] == [
        "READY=1\nSTATUS=checkpoint 12",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_abstract_namespace_address() -> None:
    """An address starting with "@" is a socket in the abstract namespace."""
    name = f"cxrd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier(f"@{name}").send("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_watchdog_pings_are_rate_limited(listener: tuple[socket.socket, str]) -> None:
    """Heartbeats closer together than the interval send one ping; a later one sends again."""
    sock, path = listener
    clock = FakeClock()
    notifier = Notifier(path, watchdog_usec=180_000_000, clock=clock)
    assert notifier.watchdog_interval_s == 1.0  # never more than one a second
    for _ in range(50):
        notifier.watchdog()
        clock.now += 0.01
    assert received(sock) == ["WATCHDOG=1"]
    clock.now += 1.0
    notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]


def test_small_watchdog_is_pinged_four_times_per_interval() -> None:
    """A 2 s watchdog may be pinged every 0.5 s, well inside half its interval."""
    assert Notifier("/nowhere", watchdog_usec=2_000_000).watchdog_interval_s == 0.5


def test_watchdog_is_silent_when_systemd_set_none(listener: tuple[socket.socket, str]) -> None:
    """Without WATCHDOG_USEC, heartbeats send nothing (READY still does)."""
    sock, path = listener
    notifier = Notifier(path, watchdog_usec=0)
    notifier.watchdog()
    notifier.ready()
    assert received(sock) == ["READY=1"]


def test_no_socket_is_a_no_op() -> None:
    """Outside systemd (no NOTIFY_SOCKET) every call does nothing and raises nothing."""
    notifier = Notifier("", watchdog_usec=60_000_000)
    assert notifier.send("READY=1") is False
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()


def test_unreachable_socket_is_not_an_error(tmp_path: Path) -> None:
    """A socket path nobody listens on makes send() return False, never raise."""
    assert Notifier(str(tmp_path / "gone")).send("WATCHDOG=1") is False
