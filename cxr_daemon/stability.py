"""Studies whose StableStudy never came: look them up, queue the stable ones (DESIGN feed 7).

Orthanc tracks stability in memory only: a study received less than StableAge
before Orthanc restarts never gets a ``StableStudy`` change, yet
``/studies/{id}`` then says ``IsStable``. The feed records every ``NewStudy`` as
``waiting``; a study still waiting StableAge + margin later is looked up here:

- Orthanc says ``IsStable`` -> ``pending``, as if its StableStudy had come;
- Orthanc no longer has it (404) -> ``skipped``, with that reason;
- not stable yet (images still arriving) -> left waiting, looked up again later.

Core module: talks to the ports only (STYLE.md §2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from cxr_daemon.domain import StudyRef, utcnow
from cxr_daemon.errors import PermanentError, StudyGoneError
from cxr_daemon.ports import Orthanc, Store

log = structlog.get_logger(__name__)

# The check reads one indexed query when due; Orthanc is asked only about studies
# already StableAge + margin old. Never more often than this, whatever the poll interval.
CHECK_INTERVAL_MIN_S = 5.0
# Studies looked up per check, so one check never holds the loop for long.
BATCH = 50


class Schedule:
    """When a periodic task is due: at once the first time, then every ``interval_s``.

    The next run is set when a run starts, so a run that fails is not retried
    before the interval has passed: a failing task cannot take the loop over.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.next_at: float | None = None

    def due(self) -> bool:
        """Return True if the task should run now (and count this as its run)."""
        now = self.clock()
        if self.next_at is not None and now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        return True


class StabilityCheck:
    """Queues waiting studies that Orthanc reports stable once ``grace`` has passed.

    ``grace`` is Orthanc's StableAge plus a margin (config ``[orthanc]``
    ``stable_age_s`` + ``stable_margin_s``); ``schedule`` says when to check.
    """

    def __init__(
        self,
        orthanc: Orthanc,
        store: Store,
        grace: timedelta,
        schedule: Schedule,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.orthanc = orthanc
        self.store = store
        self.grace = grace
        self.schedule = schedule
        self.clock = clock
        self.batch = BATCH

    def step(self) -> bool:
        """When due, look up the studies waiting longer than StableAge + margin.

        Returns True when at least one was queued.

        Raises:
            TransientError, ConfigError: from Orthanc or the database; the
                studies not yet looked up wait for the next check.
        """
        if not self.schedule.due():
            return False
        queued = False
        for ref in self.store.waiting_older_than(self.clock() - self.grace, self.batch):
            queued = self._check(ref) or queued
        return queued

    def _check(self, ref: StudyRef) -> bool:
        with structlog.contextvars.bound_contextvars(study_uid=ref.study_uid):
            try:
                study = self.orthanc.study(ref.orthanc_id)
            except StudyGoneError as exc:
                reason = f"deleted from Orthanc before it became stable ({exc})"
                if self.store.skip_waiting(ref.study_uid, reason):
                    log.info("waiting_study_gone", orthanc_id=ref.orthanc_id, reason=reason)
                return False
            except PermanentError as exc:
                # Waiting cannot fix it: queue it, and the pipeline's own lookup
                # fails it with this reason where `cxrd status` shows it.
                log.warning("waiting_study_unreadable", orthanc_id=ref.orthanc_id, error=str(exc))
                return self.store.promote_waiting(ref.study_uid)
            if not study.is_stable:
                log.debug("waiting_study_not_stable_yet", orthanc_id=ref.orthanc_id)
                return False
            promoted = self.store.promote_waiting(ref.study_uid)
            if promoted:
                # A lost StableStudy means Orthanc restarted (or crashed) within
                # StableAge of this study: worth an operator's attention.
                log.warning(
                    "stable_study_recovered",
                    orthanc_id=ref.orthanc_id,
                    hint="no StableStudy change came; queued because Orthanc reports IsStable",
                )
            return promoted
