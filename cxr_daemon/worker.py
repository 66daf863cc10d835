"""Claim -> pipeline -> mark, and the daemon's main loop (STYLE.md §4)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from cxr_daemon.domain import QueuedStudy, StudyState, Trigger, utcnow
from cxr_daemon.errors import (
    ConfigError,
    CxrdError,
    PermanentError,
    SkipStudyError,
    TransientError,
)
from cxr_daemon.pipeline import Pipeline, RunSummary
from cxr_daemon.poller import Poller
from cxr_daemon.ports import Metrics, NullMetrics, Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RetryRule:
    """How often and how late a study is tried again after a transient error."""

    max_attempts: int
    backoff_s: Sequence[float]

    def next_attempt(self, attempts: int, now: datetime) -> datetime | None:
        """When to try again after ``attempts`` tries, or None when they are used up."""
        if attempts >= self.max_attempts:
            return None
        delays = self.backoff_s or (0.0,)
        return now + timedelta(seconds=delays[min(attempts, len(delays)) - 1])


@dataclass(frozen=True)
class Processed:
    """The state a study was left in, why, and the run summary when one completed."""

    state: StudyState
    reason: str
    summary: RunSummary | None


class Worker:
    """Processes queued studies one at a time."""

    def __init__(
        self,
        store: Store,
        pipeline: Pipeline,
        retry: RetryRule,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.retry = retry
        self.clock = clock
        self.metrics = metrics or NullMetrics()

    def step(self) -> bool:
        """Claim and process one due study; return False when none is due."""
        queued = self.store.claim(self.clock())
        if queued is None:
            return False
        self.process(queued, Trigger.FEED)
        return True

    def process(self, queued: QueuedStudy, trigger: Trigger) -> Processed:
        """Run the pipeline on a claimed study and store its new state.

        Raises:
            ConfigError: fatal; the study is handed back untouched first.
        """
        started = time.monotonic()
        summary: RunSummary | None = None
        with structlog.contextvars.bound_contextvars(study_uid=queued.study_uid):
            try:
                summary = self.pipeline.process(queued, trigger)
                state, reason = StudyState.DONE, summary.reason
            except ConfigError:
                self.store.release(queued.study_uid)
                raise
            except SkipStudyError as exc:
                state, reason = StudyState.SKIPPED, str(exc)
            except PermanentError as exc:
                state, reason = StudyState.FAILED, str(exc)
            except TransientError as exc:
                state, reason = self._retry_state(queued, str(exc))
            except Exception as exc:
                log.exception("study_crashed")
                state, reason = self._retry_state(queued, f"unexpected error: {exc!r}")
            stored = self._finish(queued, state, reason, started)
        return Processed(stored, reason, summary)

    def _retry_state(self, queued: QueuedStudy, reason: str) -> tuple[StudyState, str]:
        if self.retry.next_attempt(queued.attempts, self.clock()) is None:
            return StudyState.FAILED, f"gave up after {queued.attempts} attempts: {reason}"
        return StudyState.PENDING, reason

    def _finish(
        self, queued: QueuedStudy, state: StudyState, reason: str, started: float
    ) -> StudyState:
        next_at = (
            self.retry.next_attempt(queued.attempts, self.clock())
            if state is StudyState.PENDING
            else None
        )
        stored = self.store.finish_study(queued.study_uid, state, reason, next_at)
        self.metrics.study_finished(stored.value)
        log.info(
            "study_finished",
            state=stored.value,
            reason=reason or None,
            attempts=queued.attempts,
            next_attempt_at=next_at.isoformat() if next_at else None,
            duration_s=round(time.monotonic() - started, 3),
        )
        return stored


class Daemon:
    """The main loop: read the feed, work the queue, idle, until stopped."""

    def __init__(
        self,
        poller: Poller,
        worker: Worker,
        stop: threading.Event,
        poll_interval_s: float,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        self.poller = poller
        self.worker = worker
        self.stop = stop
        self.poll_interval_s = poll_interval_s
        self.heartbeat = heartbeat
        self.failures = 0

    def run(self, *, once: bool = False) -> None:
        """Loop until stopped (or, with ``once``, until feed and queue are drained).

        Raises:
            ConfigError: fatal, the daemon must stop.
            CxrdError: with ``once``, an error that left the feed unread.
        """
        while not self.stop.is_set():
            self.heartbeat()
            try:
                busy = self.poller.step() or self.worker.step()
                self.failures = 0
            except ConfigError:
                raise
            except CxrdError as exc:
                if once:
                    raise
                self._back_off(exc)
                continue
            if not busy:
                if once:
                    return
                self.stop.wait(self.poll_interval_s)

    def _back_off(self, exc: CxrdError) -> None:
        """Wait longer after each consecutive failure (capped), interruptible by stop."""
        self.failures += 1
        delay = min(self.poll_interval_s * 2 ** min(self.failures, 6), 60.0) or 1.0
        log.warning("loop_error", error=str(exc), step=exc.step, retry_in_s=delay)
        self.stop.wait(delay)
