"""``cxrd backfill`` and the periodic sweep: queue CXR studies the feed never delivered.

One core function, ``Backfill.run``, serves both. It asks Orthanc for the stable
studies of each StudyDate in a range that have a series of the ``[filter]``
modalities (``/tools/find``) and queues those cxrd

- has never seen (history before ``start_from = "now"``, a lost change), or
- left ``done`` while the chest X-ray instance set (the pipeline's selection)
  now differs from its last done run's (late images whose StableStudy was lost).

Every other state is left alone: ``waiting`` belongs to the stability check,
``pending``/``running`` are queued already, ``skipped``/``failed`` ended with a
reason (``cxrd reprocess`` runs one again). A second run therefore queues
nothing. ``Backfill`` and ``Sweep`` talk to the ports only; ``run_backfill`` is
the command around them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import structlog

from cxr_daemon import bootstrap
from cxr_daemon.config import Config
from cxr_daemon.domain import (
    FilterRule,
    StudyRef,
    StudyState,
    chest_xray_series,
    instance_set_hash,
    validate_uid,
)
from cxr_daemon.errors import (
    ConfigError,
    CxrdError,
    InvalidUidError,
    PermanentError,
    StudyGoneError,
)
from cxr_daemon.ports import Orthanc, Store
from cxr_daemon.stability import CHECK_INTERVAL_MIN_S, Schedule, StabilityCheck

log = structlog.get_logger(__name__)

NEVER_PROCESSED = "never processed"
SET_CHANGED = "instance set changed"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True)
class Missed:
    """A study the backfill queues, and why."""

    ref: StudyRef
    why: str


def local_today() -> date:
    """Today's date where cxrd runs: StudyDate is the modality's local date."""
    return datetime.now(UTC).astimezone().date()


def _days(date_from: date, date_to: date) -> Iterator[date]:
    day = date_from
    while day <= date_to:
        yield day
        day += timedelta(days=1)


def _ignore(_missed: Missed) -> None:
    """Report nothing."""


class Backfill:
    """Finds and queues the studies of a StudyDate range that the feed never delivered."""

    def __init__(self, orthanc: Orthanc, store: Store, rule: FilterRule) -> None:
        self.orthanc = orthanc
        self.store = store
        self.rule = rule

    def run(
        self,
        date_from: date,
        date_to: date,
        *,
        dry_run: bool = False,
        report: Callable[[Missed], None] = _ignore,
    ) -> list[Missed]:
        """Queue (unless ``dry_run``) the missed studies of [date_from, date_to]; return them.

        One ``/tools/find`` per StudyDate keeps each answer small; each day's
        studies are queued in one transaction before the next day is searched,
        so an interrupted backfill keeps what it queued. ``report`` is called
        for each study once it is queued (or would be, with ``dry_run``).

        Raises:
            TransientError, ConfigError, PermanentError: from Orthanc or the
                database; the days before were queued.
        """
        missed: list[Missed] = []
        seen: set[str] = set()
        for day in _days(date_from, date_to):
            found = []
            for ref in self.orthanc.find_studies(day, day, self.rule.modalities):
                why = None if ref.study_uid in seen else self._why_missed(ref)
                seen.add(ref.study_uid)
                if why:
                    found.append(Missed(ref, why))
            if found and not dry_run:
                self.store.queue_studies([m.ref for m in found])
            for m in found:
                report(m)
            missed += found
        return missed

    def _why_missed(self, ref: StudyRef) -> str | None:
        """Why ``ref`` should be queued, or None when it should not."""
        try:
            validate_uid(ref.study_uid, "StudyInstanceUID")
        except InvalidUidError as exc:
            # Cannot be a queue key nor an S3 key (as in the poller).
            log.error("study_rejected", orthanc_id=ref.orthanc_id, reason=str(exc))  # noqa: TRY400 - the reason is the message
            return None
        row = self.store.study_row(ref.study_uid)
        if row is None:
            return NEVER_PROCESSED
        if row.state is not StudyState.DONE:
            return None
        try:
            study = self.orthanc.study(ref.orthanc_id)
        except StudyGoneError:
            return None  # deleted since the search: nothing to queue
        except PermanentError as exc:
            log.warning(
                "backfill_lookup_failed",
                study_uid=ref.study_uid,
                orthanc_id=ref.orthanc_id,
                error=str(exc),
            )
            return None
        series = {s.series_uid for s in chest_xray_series(study, self.rule)}
        digest = instance_set_hash([i.sop_uid for i in study.instances if i.series_uid in series])
        return SET_CHANGED if digest != self.store.last_done_hash(ref.study_uid) else None


class Sweep:
    """``[sweep]``: ``Backfill.run`` over the last ``days`` StudyDates when ``schedule`` says.

    The first sweep runs at start-up; one that fails waits for the next interval.
    ``today`` gives the last StudyDate swept (tests replace it).
    """

    def __init__(self, backfill: Backfill, days: int, schedule: Schedule) -> None:
        self.backfill = backfill
        self.days = days
        self.schedule = schedule
        self.today: Callable[[], date] = local_today

    def step(self) -> bool:
        """When due, sweep; return True when it queued a study.

        Raises:
            TransientError, ConfigError, PermanentError: as ``Backfill.run``.
        """
        if not self.schedule.due():
            return False
        date_to = self.today()
        date_from = date_to - timedelta(days=self.days)
        queued = self.backfill.run(date_from, date_to, report=_log_swept)
        log.info(
            "sweep_finished", date_from=str(date_from), date_to=str(date_to), queued=len(queued)
        )
        return bool(queued)


def _log_swept(missed: Missed) -> None:
    # The feed should have delivered it: say so loudly enough to be noticed.
    log.warning("sweep_queued_study", study_uid=missed.ref.study_uid, why=missed.why)


def filter_rule(cfg: Config) -> FilterRule:
    """The ``[filter]`` section as the domain's rule."""
    return FilterRule(modalities=cfg.filter.modalities, body_parts=cfg.filter.body_parts)


def build_housekeeping(
    cfg: Config, orthanc: Orthanc, store: Store
) -> tuple[Callable[[], bool], ...]:
    """The periodic tasks of the daemon loop: the stability check, and the sweep if enabled."""
    grace = timedelta(seconds=cfg.orthanc.stable_age_s + cfg.orthanc.stable_margin_s)
    every = Schedule(max(cfg.orthanc.poll_interval_s, CHECK_INTERVAL_MIN_S))
    tasks: list[Callable[[], bool]] = [StabilityCheck(orthanc, store, grace, every).step]
    if cfg.sweep.enabled:
        backfill = Backfill(orthanc, store, filter_rule(cfg))
        tasks.append(Sweep(backfill, cfg.sweep.days, Schedule(cfg.sweep.interval_s)).step)
    return tuple(tasks)


# -- the command ------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"cxrd: backfill: {message}\n")
    return code


def _parse_day(option: str, text: str) -> date:
    # fromisoformat alone would also take 20260101 and 2026-W01-1.
    try:
        day = date.fromisoformat(text) if _ISO_DATE.fullmatch(text) else None
    except ValueError:
        day = None
    if day is None:
        raise ValueError(f"{option}: expected a date YYYY-MM-DD, got {text!r}")
    return day


def parse_dates(since: str, until: str | None, today: date) -> tuple[date, date]:
    """``--since``/``--until`` as dates (``--until`` defaults to ``today``).

    Raises:
        ValueError: not YYYY-MM-DD, or ``--since`` after ``--until``; the
            message names the option.
    """
    date_from = _parse_day("--since", since)
    date_to = _parse_day("--until", until) if until is not None else today
    if date_from > date_to:
        raise ValueError(f"--since {date_from} is after --until {date_to}")
    return date_from, date_to


def run_backfill(cfg: Config, since: str, until: str | None, *, dry_run: bool = False) -> int:
    """``cxrd backfill``: queue the missed CR/DX studies of a StudyDate range; the exit code.

    Prints each study queued (``would queue`` with ``dry_run``) and a total.
    Exit codes: 0 done; 1 Orthanc or the database failed midway (what was
    printed is queued); 2 bad dates or a fatal configuration problem.
    """
    try:
        date_from, date_to = parse_dates(since, until, local_today())
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    verb = "would queue" if dry_run else "queued"
    try:
        app = bootstrap.build(cfg)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        app.store.require_current_schema()
        missed = Backfill(app.orthanc, app.store, filter_rule(cfg)).run(
            date_from,
            date_to,
            dry_run=dry_run,
            report=lambda m: _say(f"{verb} {m.ref.study_uid} ({m.why})"),
        )
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except CxrdError as exc:
        return _fail(str(exc), EXIT_FAILED)
    finally:
        app.close()
    suffix = " (dry run: nothing was queued)" if dry_run else ""
    _say(f"{verb} {len(missed)} studies with StudyDate {date_from}..{date_to}{suffix}")
    return EXIT_OK
