"""systemd's notify protocol: a datagram to ``$NOTIFY_SOCKET`` (sd_notify(3)).

No dependency: the protocol is one ``sendto`` of ``KEY=VALUE`` lines. Outside
systemd (no socket configured) every call is a no-op.
"""

from __future__ import annotations

import socket
import time


class Notifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1 and STATUS= to systemd."""

    def __init__(self, address: str = "", watchdog_usec: int = 0) -> None:
        # An address starting with "@" is in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        # Ping at half the watchdog interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s = watchdog_usec / 2_000_000 if watchdog_usec else 0.0
        self.last_watchdog = 0.0

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
        """Keep-alive from the main loop, rate-limited to half the watchdog interval."""
        now = time.monotonic()
        if now - self.last_watchdog >= self.watchdog_interval_s:
            self.last_watchdog = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.send("STOPPING=1")
