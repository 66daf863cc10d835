"""Worker: study state transitions per error kind, requeue, reclaim, idempotency."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyRef, StudyState, Trigger
from cxr_daemon.errors import ConfigError, PermanentError, TransientError
from cxr_daemon.poller import Poller
from cxr_daemon.ports import RunVersions
from cxr_daemon.worker import RetryRule, Worker
from tests.fakes import FakeOrthanc, make_study


def queue(orthanc: FakeOrthanc, poller: Poller, *studies: object) -> None:
    for s in studies:
        orthanc.add_study(s)  # type: ignore[arg-type]
    poller.prime()
    while poller.step():
        pass


def state(store: SqlStore, uid: str) -> StudyState:
    row = store.study_row(uid)
    assert row is not None
    return row.state


def test_cxr_study_is_done_with_its_instances_recorded(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A DX chest study ends done with one done run listing its instances."""
    study = make_study(1, images=3)
    queue(orthanc, poller, study)
    assert worker.step() is True
    assert state(store, study.study_uid) is StudyState.DONE
    runs = store.runs(study.study_uid)
    assert [r.outcome for r in runs] == ["done"]
    with store.raw() as cur:
        cur.execute("SELECT COUNT(*) FROM instances WHERE run_id = ?", (runs[0].run_id,))
        assert cur.fetchone()[0] == 3
    assert worker.step() is False


def test_non_cxr_study_is_skipped_with_reason(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A CT study ends skipped and its reason names the modality."""
    study = make_study(2, modality="CT")
    queue(orthanc, poller, study)
    worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.SKIPPED
    assert "CT" in row.reason


def test_transient_error_requeues_with_backoff_then_fails_when_exhausted(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Transient errors put the study back with the configured backoff, then fail it."""
    study = make_study(3)
    queue(orthanc, poller, study)
    start = datetime.now(UTC)
    for attempt in (1, 2):
        orthanc.fail_next.append(TransientError("Orthanc answered HTTP 503"))
        worker.clock = lambda a=attempt: start + timedelta(hours=a)
        assert worker.step() is True
        assert state(store, study.study_uid) is StudyState.PENDING
        worker.clock = lambda a=attempt: start + timedelta(hours=a, seconds=1)
        assert worker.step() is False  # not due yet: backoff is stored, not slept
    worker.clock = lambda: start + timedelta(hours=5)
    orthanc.fail_next.append(TransientError("Orthanc answered HTTP 503"))
    worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.FAILED
    assert row.attempts == 3
    assert "gave up after 3 attempts" in row.reason
    assert "503" in row.reason


def test_permanent_error_fails_at_once(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A permanent error fails the study on the first attempt with its message."""
    study = make_study(4)
    queue(orthanc, poller, study)
    orthanc.fail_next.append(PermanentError("Orthanc answered HTTP 400 for /studies/x"))
    worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert (row.state, row.attempts) == (StudyState.FAILED, 1)
    assert "HTTP 400" in row.reason


def test_config_error_hands_the_study_back_and_stops(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A fatal error re-raises and leaves the study pending with no attempt counted."""
    study = make_study(5)
    queue(orthanc, poller, study)
    orthanc.fail_next.append(ConfigError("Orthanc refused the credentials"))
    with pytest.raises(ConfigError):
        worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert (row.state, row.attempts) == (StudyState.PENDING, 0)


def test_unexpected_exception_counts_as_transient(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A bug in a step is caught at the study boundary and retried later, not fatal."""
    study = make_study(6)
    queue(orthanc, poller, study)
    orthanc.fail_next.append(ZeroDivisionError("boom"))  # type: ignore[arg-type]
    worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.PENDING
    assert "ZeroDivisionError" in row.reason


def test_unchanged_instance_set_is_not_processed_again(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A second StableStudy with the same instances makes no new run; new images do."""
    study = make_study(7)
    queue(orthanc, poller, study)
    worker.step()
    orthanc.add_change("StableStudy", study.orthanc_id)
    queue(orthanc, poller)
    worker.step()
    assert len(store.runs(study.study_uid)) == 1
    assert state(store, study.study_uid) is StudyState.DONE
    orthanc.studies[study.orthanc_id] = make_study(7, images=3)
    orthanc.add_change("StableStudy", study.orthanc_id)
    queue(orthanc, poller)
    worker.step()
    assert len(store.runs(study.study_uid)) == 2


def test_stable_study_while_running_requeues_after_finish(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Late images announced while a study runs send it back to pending when it finishes."""
    study = make_study(8)
    queue(orthanc, poller, study)
    claimed = store.claim(datetime.now(UTC))
    assert claimed is not None
    store.record_feed_page([StudyRef(study.study_uid, study.orthanc_id)], [], orthanc.seq)
    assert store.finish_study(study.study_uid, StudyState.DONE) is StudyState.PENDING
    assert state(store, study.study_uid) is StudyState.PENDING


def test_reclaim_hands_back_running_rows_and_interrupts_their_runs(
    worker: Worker, poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Rows left running by a dead process go back to pending; their runs are interrupted."""
    study = make_study(9)
    queue(orthanc, poller, study)
    claimed = store.claim(datetime.now(UTC))
    assert claimed is not None
    run_id = store.start_run(study.study_uid, Trigger.FEED, RunVersions(code="t"))
    assert store.reclaim_running(max_attempts=5) == 1
    assert state(store, study.study_uid) is StudyState.PENDING
    assert [r.outcome for r in store.runs(study.study_uid)] == ["interrupted"]
    assert store.runs(study.study_uid)[0].run_id == run_id
    worker.step()
    assert state(store, study.study_uid) is StudyState.DONE


def test_reclaim_does_not_count_the_interrupted_attempt_and_requeues_at_the_back(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """An outside kill costs no attempt, and the others go first after the restart."""
    first, second = make_study(10), make_study(11)
    queue(orthanc, poller, first, second)
    claimed = store.claim(datetime.now(UTC))
    assert claimed is not None
    assert claimed.study_uid == first.study_uid
    store.reclaim_running(max_attempts=5)
    row = store.study_row(first.study_uid)
    assert row is not None
    assert (row.state, row.attempts) == (StudyState.PENDING, 0)
    nxt = store.claim(datetime.now(UTC))
    assert nxt is not None
    assert nxt.study_uid == second.study_uid


def test_reclaim_fails_a_study_that_keeps_killing_the_process(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A study whose runs were interrupted 3 x max_attempts times is failed, not looped."""
    study = make_study(12)
    queue(orthanc, poller, study)
    for _ in range(6):
        assert store.claim(datetime.now(UTC)) is not None
        store.start_run(study.study_uid, Trigger.FEED, RunVersions(code="t"))
        store.reclaim_running(max_attempts=2)
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.FAILED
    assert "died 6 times while processing this study" in row.reason


def test_retry_rule_uses_last_backoff_for_later_attempts() -> None:
    """Attempts beyond the backoff list reuse its last delay; the limit ends retries."""
    rule = RetryRule(max_attempts=10, backoff_s=(5, 30))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert rule.next_attempt(1, now) == now + timedelta(seconds=5)
    assert rule.next_attempt(7, now) == now + timedelta(seconds=30)
    assert rule.next_attempt(10, now) is None
