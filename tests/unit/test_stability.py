"""The stability check (DESIGN feed item 7), its schedule, its place in the daemon loop, status."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta

import pytest
from structlog.testing import capture_logs

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyInfo, StudyRef, StudyState, utcnow
from cxr_daemon.errors import InvalidUidError, TransientError
from cxr_daemon.poller import Poller
from cxr_daemon.stability import Schedule, StabilityCheck
from cxr_daemon.status import summary
from cxr_daemon.worker import Daemon, Worker
from tests.fakes import FakeOrthanc, make_study

GRACE = timedelta(seconds=90)  # StableAge 60 + margin 30, the defaults


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def later(seconds: float = 3600) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def wait_for(orthanc: FakeOrthanc, store: SqlStore, study: StudyInfo) -> StudyRef:
    """Record ``study`` as waiting, as the poller does for its NewStudy."""
    orthanc.studies[study.orthanc_id] = study
    ref = StudyRef(study.study_uid, study.orthanc_id)
    store.record_feed_page([], [ref], orthanc.seq)
    return ref


def check(
    orthanc: FakeOrthanc, store: SqlStore, *, at: datetime | None = None, clock: Clock | None = None
) -> StabilityCheck:
    return StabilityCheck(
        orthanc,
        store,
        GRACE,
        Schedule(5, clock or Clock()),
        clock=(lambda: at) if at else utcnow,
    )


def state(store: SqlStore, uid: str) -> tuple[StudyState, str]:
    row = store.study_row(uid)
    assert row is not None
    return row.state, row.reason


def test_waiting_study_stable_past_grace_is_queued_as_if_stable_study_came(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A study waiting past StableAge + margin that Orthanc reports stable becomes pending."""
    ref = wait_for(orthanc, store, make_study(1))
    with capture_logs() as logs:
        assert check(orthanc, store, at=later()).step() is True
    assert state(store, ref.study_uid)[0] is StudyState.PENDING
    assert [e["log_level"] for e in logs if e["event"] == "stable_study_recovered"] == ["warning"]


def test_waiting_study_younger_than_grace_is_not_looked_up(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Inside StableAge + margin the normal StableStudy is expected: Orthanc is not asked."""
    ref = wait_for(orthanc, store, make_study(1))
    assert check(orthanc, store, at=later(60)).step() is False
    assert "study" not in orthanc.calls
    assert state(store, ref.study_uid)[0] is StudyState.WAITING


def test_not_yet_stable_stays_waiting_and_is_queued_once_stable(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A study still receiving images stays waiting; a later check queues it once stable."""
    study = make_study(1)
    ref = wait_for(orthanc, store, dataclasses.replace(study, is_stable=False))
    clock = Clock()
    stability = check(orthanc, store, at=later(), clock=clock)
    assert stability.step() is False
    assert state(store, ref.study_uid)[0] is StudyState.WAITING
    orthanc.studies[study.orthanc_id] = study
    clock.now += 5
    assert stability.step() is True
    assert state(store, ref.study_uid)[0] is StudyState.PENDING


def test_study_deleted_while_waiting_is_skipped_with_reason(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Orthanc answering 404 ends the waiting row skipped, the reason saying it was deleted."""
    ref = wait_for(orthanc, store, make_study(1))
    del orthanc.studies[ref.orthanc_id]
    assert check(orthanc, store, at=later()).step() is False
    got, reason = state(store, ref.study_uid)
    assert got is StudyState.SKIPPED
    assert "deleted from Orthanc before it became stable" in reason
    assert "404" in reason


def test_unreadable_waiting_study_is_queued_for_the_pipeline_to_fail_visibly(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A permanent lookup error does not leave the study waiting for ever: it is queued."""
    ref = wait_for(orthanc, store, make_study(1))
    orthanc.fail_next.append(InvalidUidError("SOPInstanceUID 'x' is not a DICOM UID"))
    assert check(orthanc, store, at=later()).step() is True
    assert state(store, ref.study_uid)[0] is StudyState.PENDING


def test_transient_error_leaves_the_study_waiting_for_the_next_check(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Orthanc down: the error goes to the loop, the row stays waiting, the next check retries."""
    ref = wait_for(orthanc, store, make_study(1))
    clock = Clock()
    stability = check(orthanc, store, at=later(), clock=clock)
    orthanc.fail_next.append(TransientError("Orthanc unreachable"))
    with pytest.raises(TransientError):
        stability.step()
    assert state(store, ref.study_uid)[0] is StudyState.WAITING
    assert stability.step() is False  # not due again before the interval
    clock.now += 5
    assert stability.step() is True


def test_stable_study_arriving_first_wins_and_nothing_is_queued_twice(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """If the StableStudy was recorded meanwhile, the check leaves the pending row alone."""
    ref = wait_for(orthanc, store, make_study(1))
    store.record_feed_page([ref], [], orthanc.seq)
    assert check(orthanc, store, at=later()).step() is False
    assert store.counts()["pending"] == 1
    assert store.promote_waiting(ref.study_uid) is False


def test_check_runs_at_start_then_at_most_once_per_interval(
    orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """The first step checks at once (start-up); the next only after the interval."""
    clock = Clock()
    stability = check(orthanc, store, at=later(), clock=clock)
    assert stability.step() is False
    ref = wait_for(orthanc, store, make_study(1))
    clock.now += 4.9
    assert stability.step() is False
    assert state(store, ref.study_uid)[0] is StudyState.WAITING
    clock.now += 0.1
    assert stability.step() is True


def test_batch_bounds_lookups_per_check_oldest_first(orthanc: FakeOrthanc, store: SqlStore) -> None:
    """One check looks up at most `batch` studies, the longest-waiting first."""
    refs = [wait_for(orthanc, store, make_study(n)) for n in range(3)]
    stability = check(orthanc, store, at=later())
    stability.batch = 2
    assert stability.step() is True
    states = [state(store, r.study_uid)[0] for r in refs]
    assert states == [StudyState.PENDING, StudyState.PENDING, StudyState.WAITING]


def test_new_study_for_a_done_study_waits_again(orthanc: FakeOrthanc, store: SqlStore) -> None:
    """A done study deleted and sent again (a new NewStudy) waits again, so a lost
    StableStudy is recovered for it too; a pending one is left pending."""
    ref = wait_for(orthanc, store, make_study(1))
    store.promote_waiting(ref.study_uid)
    claimed = store.claim(utcnow())
    assert claimed is not None
    store.finish_study(ref.study_uid, StudyState.DONE)
    store.record_feed_page([], [ref], orthanc.seq)
    assert state(store, ref.study_uid)[0] is StudyState.WAITING
    assert check(orthanc, store, at=later()).step() is True
    store.record_feed_page([], [ref], orthanc.seq)
    assert state(store, ref.study_uid)[0] is StudyState.PENDING


def test_once_daemon_recovers_a_study_whose_stable_study_never_came(
    orthanc: FakeOrthanc, store: SqlStore, worker: Worker
) -> None:
    """`run --once`: NewStudy only, no StableStudy; the check queues it and it ends done once."""
    study = make_study(1)
    orthanc.add_study(study, stable=False)
    poller = Poller(orthanc, store, page_size=10, start_from="beginning")
    poller.prime()
    stability = StabilityCheck(orthanc, store, timedelta(0), Schedule(5))
    daemon = Daemon(poller, worker, threading.Event(), 0, housekeeping=[stability.step])
    daemon.run(once=True)
    assert state(store, study.study_uid)[0] is StudyState.DONE
    assert [r.outcome for r in store.runs(study.study_uid)] == ["done"]


def test_once_daemon_raises_a_housekeeping_error(
    orthanc: FakeOrthanc, store: SqlStore, worker: Worker
) -> None:
    """With --once, a failing periodic task fails the run like a feed error does."""
    poller = Poller(orthanc, store, page_size=10, start_from="beginning")
    poller.prime()

    def broken() -> bool:
        raise TransientError("Orthanc unreachable")

    with pytest.raises(TransientError):
        Daemon(poller, worker, threading.Event(), 0, housekeeping=[broken]).run(once=True)


def test_status_reports_the_oldest_wait(orthanc: FakeOrthanc, store: SqlStore) -> None:
    """status has oldest_waiting_s: null with nothing waiting, else the age of the oldest."""
    assert summary(store, orthanc)["oldest_waiting_s"] is None
    wait_for(orthanc, store, make_study(1))
    data = summary(store, orthanc)
    assert data["counts"]["waiting"] == 1
    assert 0 <= data["oldest_waiting_s"] < 60
