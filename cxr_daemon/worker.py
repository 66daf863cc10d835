"""Claim -> pipeline -> mark, and the daemon's main loop (STYLE.md §4)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from cxr_daemon.domain import QueuedStudy, StudyState, Trigger, reconnect_delay, utcnow
from cxr_daemon.errors import (
    ConfigError,
    CxrdError,
    PermanentError,
    SkipStudyError,
    TransientError,
)
from cxr_daemon.pipeline import Pipeline, RunSummary
from cxr_daemon.poller import Poller
from cxr_daemon.pool import WorkerPool
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
        # Outcomes the database was not there to take (it went away mid-study):
        # recorded before anything else is claimed, so no study stays `running`.
        self.unrecorded: list[tuple[QueuedStudy, StudyState, str]] = []
        self.unrecorded_lock = threading.Lock()

    def step(self) -> bool:
        """Claim and process one due study; return False when none is due.

        Raises:
            TransientError: the database is unreachable (nothing was claimed).
        """
        self._record_unrecorded()
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

    def _record_unrecorded(self) -> None:
        """Store the outcomes a database outage kept from being stored.

        A run the outage left open is closed as interrupted; a study whose
        outcome was "done" is handed back to the queue instead, since its run
        was not recorded: the next attempt makes the one done run.
        """
        while True:
            with self.unrecorded_lock:
                if not self.unrecorded:
                    return
                queued, state, reason = self.unrecorded[0]
            self.store.interrupt_runs(queued.study_uid)
            if state is StudyState.DONE:
                self.store.release(queued.study_uid)
            else:
                next_at = self.retry.next_attempt(queued.attempts, self.clock())
                due = next_at if state is StudyState.PENDING else None
                self.store.finish_study(queued.study_uid, state, reason, due)
            log.info("study_state_recorded_late", study_uid=queued.study_uid, state=state.value)
            with self.unrecorded_lock:
                self.unrecorded.pop(0)

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
        try:
            stored = self.store.finish_study(queued.study_uid, state, reason, next_at)
        except TransientError as exc:
            log.warning("study_state_not_recorded", state=state.value, error=str(exc))
            with self.unrecorded_lock:
                self.unrecorded.append((queued, state, reason))
            raise
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
    """The main loop: read the feed, run due housekeeping, work the queue, idle, until stopped.

    ``housekeeping`` are periodic tasks (the stability check, the sweep): each
    call runs the task if its own schedule says it is due and returns True when
    it queued a study. They run whenever the feed is drained, before the next
    claim, so a long queue does not starve them; each runs first at start-up,
    once the feed's backlog has been recorded (so ``--once`` sees what it holds).
    """

    def __init__(  # noqa: PLR0913 - the loop's collaborators, each injected (tests pass fakes)
        self,
        poller: Poller,
        worker: Worker,
        stop: threading.Event,
        poll_interval_s: float,
        heartbeat: Callable[[], None] = lambda: None,
        *,
        housekeeping: Sequence[Callable[[], bool]] = (),
        workers: int = 1,
    ) -> None:
        self.poller = poller
        self.worker = worker
        self.stop = stop
        self.poll_interval_s = poll_interval_s
        self.heartbeat = heartbeat
        self.housekeeping = tuple(housekeeping)
        self.failures = 0
        # One worker runs in this loop; more run in a pool of threads beside it.
        self.pool = WorkerPool(worker.step, workers, stop, poll_interval_s) if workers > 1 else None

    def run(self, *, once: bool = False) -> None:
        """Loop until stopped (or, with ``once``, until feed and queue are drained).

        Raises:
            ConfigError: fatal, the daemon must stop.
            CxrdError: with ``once``, an error that left the feed unread.
        """
        if self.pool is not None:
            self._run_pooled(once=once)
            return
        while not self.stop.is_set():
            self.heartbeat()
            try:
                busy = self.poller.step() or self._housekeeping() or self.worker.step()
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

    def _run_pooled(self, *, once: bool) -> None:
        """The feed and housekeeping here; claiming and processing in the pool."""
        assert self.pool is not None  # noqa: S101 - only called with a pool
        if once:
            while not self.stop.is_set() and (self.poller.step() or self._housekeeping()):
                self.heartbeat()
            self.pool.start(drain=True)
            self.pool.join()
            return
        self.pool.start()
        try:
            while not self.stop.is_set():
                self.heartbeat()
                try:
                    busy = self.poller.step() or self._housekeeping()
                    self.failures = 0
                except ConfigError:
                    raise
                except CxrdError as exc:
                    self._back_off(exc)
                    continue
                if busy:
                    self.pool.wake()
                else:
                    self.stop.wait(self.poll_interval_s)
        finally:
            self.pool.halt()
            self.pool.join()

    def _housekeeping(self) -> bool:
        """Run every due periodic task; True when one of them queued a study."""
        queued = False
        for task in self.housekeeping:
            queued = task() or queued
        return queued

    def _back_off(self, exc: CxrdError) -> None:
        """Wait longer after each consecutive failure (capped), interruptible by stop."""
        self.failures += 1
        delay = reconnect_delay(self.poll_interval_s, self.failures)
        log.warning("loop_error", error=str(exc), step=exc.step, retry_in_s=delay)
        self.stop.wait(delay)
