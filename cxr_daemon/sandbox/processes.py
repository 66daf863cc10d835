"""Child server processes that never outlive their owner, and small helpers around them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import weakref
from collections import deque
from typing import IO, TYPE_CHECKING, Self

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

# Debian installs servers in /usr/sbin, which is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def find_program(*names: str) -> str:
    """Path of the first installed program among `names`.

    Raises:
        FileNotFoundError: none of them is installed.
    """
    for name in names:
        found = shutil.which(name, path=_SEARCH_PATH)
        if found:
            return found
    raise FileNotFoundError(f"not installed: {' or '.join(names)}")


def free_loopback_ports(count: int) -> list[int]:
    """Ask the kernel for `count` distinct free TCP ports on 127.0.0.1.

    Raises:
        OSError: no port could be bound.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the ports are distinct
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tail(path: Path, lines: int = 30) -> str:
    """Last `lines` lines of a text file, or a note when it does not exist; never raises."""
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return f"(no log at {path})"


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM `proc` and wait for its exit; SIGKILL it after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _reap(processes: list[subprocess.Popen[bytes]]) -> None:
    """Last resort, at garbage collection or interpreter exit: end what is still running."""
    while processes:
        terminate(processes.pop(), timeout_s=10)


class Supervised:
    """Owner of one server process: stop, kill, restart, context manager, last-resort reaping.

    Subclasses implement `start()` with `_spawn()`.
    """

    stop_timeout_s = 30.0

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []
        # Runs at garbage collection or interpreter exit; it must not reference self.
        self._finalizer = weakref.finalize(self, _reap, self._live)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return any(proc.poll() is None for proc in self._live)

    @property
    def pid(self) -> int:
        """The server's process ID.

        Raises:
            RuntimeError: it is not running.
        """
        live = [proc for proc in self._live if proc.poll() is None]
        if not live:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return live[-1].pid

    def start(self) -> None:
        """Start the server and wait until it serves (implemented by subclasses)."""
        raise NotImplementedError

    def _spawn(
        self, command: list[str], output: IO[bytes] | int, cwd: Path
    ) -> subprocess.Popen[bytes]:
        """Start `command`, stdout and stderr to `output`, and track it for stop/kill.

        Its own session: a terminal's Ctrl-C reaches only us, and we stop the server in
        order instead of both dying at once.
        """
        proc = subprocess.Popen(  # noqa: S603 - commands are built from fixed programs
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        self._live.append(proc)
        return proc

    def stop(self) -> None:
        """Shut down with SIGTERM and wait until the process has exited (SIGKILL on timeout).

        Waiting matters: a restarted server fails while the old one still holds its locks.
        Never raises; a no-op when not running.
        """
        while self._live:
            terminate(self._live.pop(), self.stop_timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it; never raises."""
        while self._live:
            proc = self._live.pop()
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop, then start again with the same ports and data (raises as `start()`)."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
