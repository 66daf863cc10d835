"""``pipeline.workers``: up to N studies in flight, each processed synchronously.

Each thread runs the same claim -> pipeline -> mark loop as a single worker;
claims are safe under concurrency in the store (``FOR UPDATE SKIP LOCKED`` on
MySQL, one writer at a time on SQLite). Model calls dominate a study's time
and release the GIL, so threads scale with model latency; CPU-bound rendering
does not scale past the machine's cores.

Shutdown is the daemon's: the shared stop event ends each loop after its
study in hand, and ``join`` waits for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from cxr_daemon.domain import reconnect_delay
from cxr_daemon.errors import ConfigError, CxrdError

log = structlog.get_logger(__name__)


class WorkerPool:
    """N threads claiming and processing studies until stopped (or drained)."""

    def __init__(
        self, step: Callable[[], bool], size: int, stop: threading.Event, idle_s: float
    ) -> None:
        self.step = step  # Worker.step: claim and process one study, False when none is due
        self.size = size
        self.stop = stop  # the daemon's: a signal ends every loop after its study in hand
        self.halted = threading.Event()  # the daemon's loop ended for another reason
        self.idle_s = idle_s
        self.work = threading.Event()  # set by the feed when it queued something
        self.fatal: ConfigError | None = None
        self.threads: list[threading.Thread] = []

    def start(self, *, drain: bool = False) -> None:
        """Start the threads; with ``drain`` each ends when nothing is due."""
        self.threads = [
            threading.Thread(target=self._loop, args=(drain,), name=f"worker-{n}", daemon=True)
            for n in range(self.size)
        ]
        for thread in self.threads:
            thread.start()

    def halt(self) -> None:
        """End every loop after its study in hand (without touching the stop event)."""
        self.halted.set()
        self.work.set()

    def wake(self) -> None:
        """New work is queued: idle threads look now rather than at their next timeout."""
        self.work.set()

    def join(self) -> None:
        """Wait for every thread; re-raise a fatal error one of them hit.

        Raises:
            ConfigError: a thread met a fatal error (the stop event is set).
        """
        for thread in self.threads:
            thread.join()
        if self.fatal is not None:
            raise self.fatal

    def alive(self) -> bool:
        """Whether any thread is still running."""
        return any(t.is_alive() for t in self.threads)

    def _loop(self, drain: bool) -> None:
        failures = 0
        while not (self.stop.is_set() or self.halted.is_set()):
            try:
                busy = self.step()
                failures = 0
            except ConfigError as exc:
                self.fatal = exc
                self.stop.set()
                return
            except CxrdError as exc:  # the database is away: back off, then try again
                failures += 1
                delay = reconnect_delay(self.idle_s, failures)
                log.warning("worker_error", error=str(exc), retry_in_s=delay)
                self.stop.wait(delay)
                continue
            if busy:
                continue
            if drain:
                return
            self.work.wait(self.idle_s)
            self.work.clear()
