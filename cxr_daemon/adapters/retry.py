"""The one short-retry policy of the adapters (STYLE.md §3).

Inside one adapter call, a ``TransientError`` is retried a few times with
exponential backoff and jitter; the wait is interruptible by the daemon's
stop event, so a shutdown never sits out a backoff. Longer backoff belongs to
the queue (``next_attempt_at``), not here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import structlog
import tenacity

from cxr_daemon.errors import TransientError

T = TypeVar("T")
log = structlog.get_logger(__name__)

ATTEMPTS = 3


class RetryPolicy:
    """Call a function, retrying ``TransientError`` up to ``attempts`` times in all."""

    def __init__(
        self,
        stop: threading.Event | None = None,
        *,
        attempts: int = ATTEMPTS,
        initial_s: float = 0.5,
        max_wait_s: float = 5.0,
    ) -> None:
        self.stop = stop or threading.Event()
        self.attempts = attempts
        self.initial_s = initial_s
        self.max_wait_s = max_wait_s
        self.on_retry: Callable[[str], None] = lambda _step: None

    def _sleep(self, seconds: float) -> None:
        """Wait between tries; returns early when the daemon is stopping."""
        self.stop.wait(seconds)

    def call(self, step: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry it on ``TransientError``; re-raise the last error."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("retrying", step=step, attempt=state.attempt_number, error=str(exc))
            self.on_retry(step)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_when_event_set(self.stop),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self.initial_s, jitter=self.initial_s, max=self.max_wait_s
            ),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
