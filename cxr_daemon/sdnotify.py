"""systemd's notify protocol: a datagram to ``$NOTIFY_SOCKET`` (sd_notify(3)).

No dependency: the protocol is one ``sendto`` of ``KEY=VALUE`` lines. Outside
systemd (no socket configured) every call is a no-op.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

# The watchdog is pinged from irregular places (each main-loop pass, the end of
# every pipeline step, before every adapter retry), so a ping skipped by the
# rate limit lengthens the silence systemd sees by up to this much. Short, then:
# the limit is only there to keep a busy loop from sending thousands a second.
MIN_WATCHDOG_INTERVAL_S = 1.0


class Notifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1 and STATUS= to systemd."""

    def __init__(
        self,
        address: str = "",
        watchdog_usec: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # An address starting with "@" is in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_enabled = watchdog_usec > 0
        # sd_watchdog_enabled(3) asks for a ping at least every half interval;
        # a quarter leaves room for a tiny watchdog (tests) to be kept too.
        quarter_s = watchdog_usec / 4_000_000
        self.watchdog_interval_s = min(quarter_s, MIN_WATCHDOG_INTERVAL_S)
        self.clock = clock
        self.last_watchdog: float | None = None

    def send(self, message: str) -> bool:
        """Send one notification; return False when not under systemd or it failed."""
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> None:
        """Config, database and Orthanc are reachable: the service is up."""
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        """Keep-alive: a no-op unless systemd set a watchdog; at most one a second."""
        if not self.watchdog_enabled:
            return
        now = self.clock()
        if self.last_watchdog is None or now - self.last_watchdog >= self.watchdog_interval_s:
            self.last_watchdog = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.send("STOPPING=1")
