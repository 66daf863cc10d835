"""Backfill and sweep: what is queued, idempotency, dates, and the sweep's schedule."""

from __future__ import annotations

import dataclasses
from datetime import date
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cxr_daemon import config
from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.backfill import (
    NEVER_PROCESSED,
    SET_CHANGED,
    Backfill,
    Missed,
    Sweep,
    build_housekeeping,
    parse_dates,
    run_backfill,
)
from cxr_daemon.domain import FilterRule, InstanceInfo, StudyInfo, StudyRef, StudyState
from cxr_daemon.errors import TransientError
from cxr_daemon.stability import Schedule
from cxr_daemon.worker import Worker
from tests.fakes import FakeOrthanc, make_study

JAN = (date(2026, 1, 1), date(2026, 1, 31))


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(orthanc: FakeOrthanc, study: StudyInfo, day: date = date(2026, 1, 10)) -> StudyInfo:
    """A study Orthanc holds (dated ``day``) that the feed never announced."""
    orthanc.studies[study.orthanc_id] = study
    orthanc.set_study_date(study.orthanc_id, day)
    return study


@pytest.fixture
def backfill(orthanc: FakeOrthanc, store: SqlStore) -> Backfill:
    return Backfill(orthanc, store, FilterRule())


def uids(missed: list[Missed]) -> list[tuple[str, str]]:
    return sorted((m.ref.study_uid, m.why) for m in missed)


def drain(worker: Worker) -> None:
    while worker.step():
        pass


def test_never_seen_cxr_studies_in_range_are_queued(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill
) -> None:
    """CR/DX studies dated in range that cxrd never saw are queued; others are not."""
    dx = put(orthanc, make_study(1))
    cr = put(orthanc, make_study(2, modality="CR"), date(2026, 1, 31))
    put(orthanc, make_study(3), date(2026, 2, 1))  # out of range
    put(orthanc, make_study(4, modality="CT"))  # not CR/DX
    reported: list[Missed] = []
    missed = backfill.run(*JAN, report=reported.append)
    assert uids(missed) == [(dx.study_uid, NEVER_PROCESSED), (cr.study_uid, NEVER_PROCESSED)]
    assert reported == missed
    assert store.counts()["pending"] == 2


def test_second_backfill_queues_nothing_pending_or_done(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill, worker: Worker
) -> None:
    """Idempotent: queued studies are not queued again, nor once they are done and unchanged."""
    put(orthanc, make_study(1))
    put(orthanc, make_study(2))
    assert len(backfill.run(*JAN)) == 2
    assert backfill.run(*JAN) == []
    drain(worker)
    assert store.counts()["done"] == 2
    assert backfill.run(*JAN) == []
    assert store.counts()["pending"] == 0


def test_done_study_whose_instance_set_changed_is_queued_again(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill, worker: Worker
) -> None:
    """Late images (a changed CXR instance set) make a done study queued, with the reason."""
    study = put(orthanc, make_study(1))
    backfill.run(*JAN)
    drain(worker)
    late = InstanceInfo("inst-late", f"{study.study_uid}.1.99", f"{study.study_uid}.1")
    series = dataclasses.replace(
        study.series[0], instance_ids=(*study.series[0].instance_ids, "inst-late")
    )
    put(orthanc, dataclasses.replace(study, series=(series,), instances=(*study.instances, late)))
    assert uids(backfill.run(*JAN)) == [(study.study_uid, SET_CHANGED)]
    drain(worker)
    assert [r.outcome for r in store.runs(study.study_uid)] == ["done", "done"]


def test_images_outside_the_cxr_selection_do_not_count_as_a_change(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill, worker: Worker
) -> None:
    """A new non-CXR series in a done study leaves its CXR instance set unchanged: not queued."""
    put(orthanc, make_study(1))
    backfill.run(*JAN)
    drain(worker)
    put(orthanc, make_study(1, extra_series=(("SR", ""),)))
    assert backfill.run(*JAN) == []


def test_dry_run_reports_but_queues_nothing(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill
) -> None:
    """--dry-run reports each study it would queue and leaves the database untouched."""
    study = put(orthanc, make_study(1))
    reported: list[Missed] = []
    missed = backfill.run(*JAN, dry_run=True, report=reported.append)
    assert uids(reported) == [(study.study_uid, NEVER_PROCESSED)]
    assert missed == reported
    assert store.study_row(study.study_uid) is None


@pytest.mark.parametrize("end", [StudyState.WAITING, StudyState.SKIPPED, StudyState.FAILED])
def test_waiting_skipped_and_failed_studies_are_left_alone(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill, end: StudyState
) -> None:
    """Waiting is the stability check's; skipped and failed ended with a reason (reprocess)."""
    study = put(orthanc, make_study(1))
    ref = StudyRef(study.study_uid, study.orthanc_id)
    store.record_feed_page([], [ref], 0)
    if end is StudyState.SKIPPED:
        store.skip_waiting(ref.study_uid, "deleted")
    elif end is StudyState.FAILED:
        store.promote_waiting(ref.study_uid)
        store.claim_study(ref)
        store.finish_study(ref.study_uid, StudyState.FAILED, "bad")
    assert backfill.run(*JAN) == []
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is end


def test_invalid_uid_is_rejected_not_queued(orthanc: FakeOrthanc, backfill: Backfill) -> None:
    """A StudyInstanceUID that cannot be a queue key is logged and skipped."""
    put(orthanc, dataclasses.replace(make_study(1), study_uid="1.2.bad/../x"))
    with capture_logs() as logs:
        assert backfill.run(*JAN) == []
    assert [e["event"] for e in logs] == ["study_rejected"]


def test_each_day_is_queued_before_the_next_is_searched(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill
) -> None:
    """An error on a later day keeps the earlier days' studies queued."""
    put(orthanc, make_study(1), date(2026, 1, 1))
    calls = 0
    real_find = orthanc.find_studies

    def find(day_from: date, day_to: date, modalities: tuple[str, ...]) -> list[StudyRef]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TransientError("Orthanc unreachable")
        return real_find(day_from, day_to, modalities)

    orthanc.find_studies = find  # type: ignore[method-assign]
    with pytest.raises(TransientError):
        backfill.run(*JAN)
    assert store.counts()["pending"] == 1


# -- the sweep's schedule ------------------------------------------------------


def sweep(backfill: Backfill, clock: Clock, days: int = 7) -> Sweep:
    s = Sweep(backfill, days, Schedule(3600, clock))
    s.today = lambda: date(2026, 1, 10)
    return s


def test_sweep_runs_at_start_then_every_interval(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill
) -> None:
    """The first step sweeps (start-up); Orthanc is not searched again before interval_s."""
    clock = Clock()
    swept = sweep(backfill, clock)
    put(orthanc, make_study(1), date(2026, 1, 9))
    assert swept.step() is True
    put(orthanc, make_study(2), date(2026, 1, 9))
    searches = orthanc.calls.count("find")
    clock.now += 3599
    assert swept.step() is False
    assert orthanc.calls.count("find") == searches
    clock.now += 1
    assert swept.step() is True
    assert store.counts()["pending"] == 2
    clock.now += 3600
    assert swept.step() is False  # nothing new: searched, queued nothing


def test_sweep_covers_the_last_n_days(orthanc: FakeOrthanc, backfill: Backfill) -> None:
    """days = 2 searches StudyDates from today - 2 to today, one search per day."""
    inside = put(orthanc, make_study(1), date(2026, 1, 8))
    put(orthanc, make_study(2), date(2026, 1, 7))
    with capture_logs() as logs:
        assert sweep(backfill, Clock(), days=2).step() is True
    assert orthanc.calls.count("find") == 3
    queued = [e for e in logs if e["event"] == "sweep_queued_study"]
    assert [e["study_uid"] for e in queued] == [inside.study_uid]
    assert queued[0]["log_level"] == "warning"


def test_failed_sweep_waits_for_the_next_interval(
    orthanc: FakeOrthanc, store: SqlStore, backfill: Backfill
) -> None:
    """A sweep that fails is not retried on the next pass (it cannot take the loop over)."""
    clock = Clock()
    swept = sweep(backfill, clock)
    put(orthanc, make_study(1), date(2026, 1, 9))
    orthanc.fail_next.append(TransientError("Orthanc unreachable"))
    with pytest.raises(TransientError):
        swept.step()
    assert swept.step() is False
    clock.now += 3600
    assert swept.step() is True
    assert store.counts()["pending"] == 1


def test_housekeeping_has_the_sweep_only_when_enabled(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """The stability check always runs; the sweep only with [sweep] enabled = true."""
    off = config.parse({"s3": {"bucket": "b"}}, Path("x.toml"))
    on = config.parse({"s3": {"bucket": "b"}, "sweep": {"enabled": True}}, Path("x.toml"))
    assert len(build_housekeeping(off, orthanc, store)) == 1
    assert len(build_housekeeping(on, orthanc, store)) == 2


# -- the command's dates ----------------------------------------------------------


def test_dates_default_until_to_today() -> None:
    """--until defaults to today; both ends are inclusive dates."""
    today = date(2026, 3, 1)
    assert parse_dates("2026-01-01", None, today) == (date(2026, 1, 1), today)
    assert parse_dates("2026-01-01", "2026-01-01", today) == (date(2026, 1, 1),) * 2


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        ("2026-13-01", None, "--since: expected a date YYYY-MM-DD, got '2026-13-01'"),
        ("20260101", None, "--since: expected a date YYYY-MM-DD, got '20260101'"),
        ("2026-01-01", "2026-W01-1", "--until: expected a date YYYY-MM-DD"),
        ("2026-02-01", "2026-01-01", "--since 2026-02-01 is after --until 2026-01-01"),
    ],
)
def test_bad_dates_are_refused_with_the_option_named(
    since: str, until: str | None, message: str
) -> None:
    """Malformed or reversed dates raise ValueError naming the option."""
    with pytest.raises(ValueError, match=message):
        parse_dates(since, until, date(2026, 3, 1))


def test_run_backfill_exits_2_on_a_bad_date_before_touching_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command prints one line and exits 2; no database or Orthanc is built."""
    cfg = config.parse(
        {"s3": {"bucket": "b"}, "database": {"url": "sqlite:///nonexistent/dir/x.db"}},
        Path("x.toml"),
    )
    assert run_backfill(cfg, "yesterday", None) == 2
    err = capsys.readouterr().err
    assert err == "cxrd: backfill: --since: expected a date YYYY-MM-DD, got 'yesterday'\n"
