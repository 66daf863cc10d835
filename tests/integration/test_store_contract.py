"""One contract for the Store port, run on SQLite and on a real MariaDB."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.adapters.db_schema import SCHEMA_VERSION
from cxr_daemon.domain import RunOutcome, StudyRef, StudyState, Trigger
from cxr_daemon.errors import ConfigError
from cxr_daemon.ports import FindingRecord, InstanceRecord, ReportRecord, RunResults, RunVersions

pytestmark = pytest.mark.integration
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "mariadb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'cxrd.db'}"
    return str(request.getfixturevalue("mysql_url"))


@pytest.fixture
def store(url: str) -> Iterator[SqlStore]:
    s = SqlStore(url)
    s.migrate()
    yield s
    s.close()


def refs(*ns: int) -> list[StudyRef]:
    return [StudyRef(f"1.2.3.{n}", f"orthanc-{n}") for n in ns]


def test_migrate_is_idempotent_and_run_check_passes(url: str) -> None:
    """migrate goes 0 -> current once; a second migrate changes nothing."""
    s = SqlStore(url)
    with pytest.raises(ConfigError, match="cxrd db migrate"):
        s.require_current_schema()
    assert s.migrate() == (0, SCHEMA_VERSION)
    assert s.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    s.require_current_schema()
    s.close()


def test_feed_page_queues_and_moves_checkpoint_together(store: SqlStore) -> None:
    """A recorded page queues its studies once each and stores the new checkpoint."""
    assert store.checkpoint() is None
    store.record_feed_page(refs(1, 2), refs(3), 40)
    store.record_feed_page(refs(2), [], 41)
    assert store.checkpoint() == 41
    counts = store.counts()
    assert (counts["pending"], counts["waiting"]) == (2, 1)


def test_a_failing_page_records_nothing(store: SqlStore) -> None:
    """If the transaction fails midway, neither queue rows nor checkpoint change."""
    store.record_feed_page(refs(1), [], 10)
    bad = [StudyRef("1.2.3.9", "x" * 200)]  # orthanc_id longer than its column on MySQL
    try:
        store.record_feed_page([*refs(5), *bad], [], 20)
    except Exception:  # noqa: BLE001 - SQLite accepts it, MySQL refuses; either is fine
        assert store.checkpoint() == 10
        assert store.study_row("1.2.3.5") is None
    else:
        assert store.checkpoint() == 20


def test_claim_oldest_due_first_and_backoff_respected(store: SqlStore) -> None:
    """Claims come oldest first; a study with a future next attempt is not claimed."""
    store.record_feed_page(refs(1), [], 1)
    store.record_feed_page(refs(2), [], 2)
    first = store.claim(datetime.now(UTC))
    assert first is not None
    assert first.study_uid == "1.2.3.1"
    assert first.attempts == 1
    later = datetime.now(UTC) + timedelta(minutes=5)
    store.finish_study(first.study_uid, StudyState.PENDING, "503", next_attempt_at=later)
    second = store.claim(datetime.now(UTC))
    assert second is not None
    assert second.study_uid == "1.2.3.2"
    assert store.claim(datetime.now(UTC)) is None
    again = store.claim(later + timedelta(seconds=1))
    assert again is not None
    assert (again.study_uid, again.attempts) == ("1.2.3.1", 2)


def test_concurrent_claims_never_hand_out_a_study_twice(store: SqlStore) -> None:
    """Four threads claiming at once get distinct studies (SKIP LOCKED / one writer)."""
    store.record_feed_page(refs(*range(20)), [], 1)
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all() -> None:
        while (q := store.claim(datetime.now(UTC))) is not None:
            with lock:
                claimed.append(q.study_uid)

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == sorted(r.study_uid for r in refs(*range(20)))


def test_run_results_are_saved_with_the_run(store: SqlStore) -> None:
    """finish_run stores outcome, instances, findings, report and patient ID together."""
    store.record_feed_page(refs(1), [], 1)
    store.claim(datetime.now(UTC))
    run_id = store.start_run("1.2.3.1", Trigger.FEED, RunVersions("1.0", "seg:1", "p:ab"))
    results = RunResults(
        instances=[
            InstanceRecord(
                "1.2.3.1.1.1", "1.2.3.1.1", "PA", "pydicom", 800, 1024, "k.jpg", "k.dcm", "k.png"
            )
        ],
        findings=[FindingRecord("1.2.3.1.1.1", "Effusion", 0.72, (1, 2, 30, 40))],
        report=ReportRecord("No acute findings.", "template", 0, 0, "end_turn", "p:ab"),
        instance_set_hash="h" * 64,
        patient_id="PID-1",
    )
    store.finish_run(run_id, RunOutcome.DONE, results=results)
    store.finish_study("1.2.3.1", StudyState.DONE)
    assert store.last_done_hash("1.2.3.1") == "h" * 64
    (run,) = store.runs("1.2.3.1")
    assert (run.outcome, run.trigger) == ("done", "feed")
    with store.raw() as cur:
        cur.execute(
            store.db.sql("SELECT label, probability, bbox FROM findings WHERE run_id = ?"),
            (run_id,),
        )
        assert cur.fetchall()[0] == ("Effusion", 0.72, "[1, 2, 30, 40]")
        cur.execute(
            store.db.sql("SELECT patient_id FROM studies WHERE study_uid = ?"), ("1.2.3.1",)
        )
        assert cur.fetchone()[0] == "PID-1"


def test_claim_study_takes_any_state_for_reprocess(store: SqlStore) -> None:
    """claim_study marks a done (or unknown) study running now, as reprocess needs."""
    store.record_feed_page(refs(1), [], 1)
    q = store.claim(datetime.now(UTC))
    assert q is not None
    store.finish_study(q.study_uid, StudyState.DONE)
    again = store.claim_study(refs(1)[0])
    assert again.study_uid == "1.2.3.1"
    row = store.study_row("1.2.3.1")
    assert row is not None
    assert row.state is StudyState.RUNNING
    fresh = store.claim_study(StudyRef("1.2.3.77", "o77"))
    assert fresh.attempts == 1


def test_timestamps_round_trip_as_utc(store: SqlStore) -> None:
    """Run start and end come back timezone-aware UTC and in order."""
    store.record_feed_page(refs(1), [], 1)
    run_id = store.start_run("1.2.3.1", Trigger.REPROCESS, RunVersions("1"))
    store.finish_run(run_id, RunOutcome.FAILED, "x")
    (run,) = store.runs("1.2.3.1")
    assert run.started_at.tzinfo is not None
    assert run.finished_at is not None
    assert run.finished_at >= run.started_at
    assert abs((run.started_at - datetime.now(UTC)).total_seconds()) < 120


def test_waiting_older_than_is_oldest_first_bounded_by_cutoff_and_limit(store: SqlStore) -> None:
    """Only rows waiting since before the cutoff come back, oldest first, at most `limit`."""
    store.record_feed_page([], refs(1), 1)
    store.record_feed_page([], refs(2), 2)
    store.record_feed_page(refs(3), [], 3)  # pending, never returned
    past = datetime.now(UTC) - timedelta(minutes=5)
    future = datetime.now(UTC) + timedelta(minutes=5)
    assert store.waiting_older_than(past, 10) == []
    assert store.waiting_older_than(future, 10) == refs(1, 2)
    assert store.waiting_older_than(future, 1) == refs(1)


def test_promote_waiting_queues_it_once_keeping_its_place(store: SqlStore) -> None:
    """A promoted waiting row is claimed before later-queued ones; promoting twice is a no-op."""
    store.record_feed_page([], refs(1), 1)
    store.record_feed_page(refs(2), [], 2)
    assert store.promote_waiting("1.2.3.1") is True
    assert store.promote_waiting("1.2.3.1") is False
    assert store.promote_waiting("1.2.3.404") is False
    first = store.claim(datetime.now(UTC))
    assert first is not None
    assert first.study_uid == "1.2.3.1"
    assert store.promote_waiting("1.2.3.1") is False  # running is never touched


def test_skip_waiting_records_the_reason_only_for_waiting_rows(store: SqlStore) -> None:
    """skip_waiting ends a waiting row skipped with its reason; a pending row is left alone."""
    store.record_feed_page(refs(2), refs(1), 1)
    assert store.skip_waiting("1.2.3.1", "deleted from Orthanc before it became stable") is True
    assert store.skip_waiting("1.2.3.2", "x") is False
    row = store.study_row("1.2.3.1")
    assert row is not None
    assert (row.state, row.reason) == (
        StudyState.SKIPPED,
        "deleted from Orthanc before it became stable",
    )
    pending = store.study_row("1.2.3.2")
    assert pending is not None
    assert pending.state is StudyState.PENDING


def test_oldest_waiting_is_the_longest_wait_or_none(store: SqlStore) -> None:
    """oldest_waiting is None with nothing waiting, else the first waiting row's time (UTC)."""
    assert store.oldest_waiting() is None
    before = datetime.now(UTC) - timedelta(seconds=1)
    store.record_feed_page([], refs(1), 1)
    store.record_feed_page([], refs(2), 2)
    oldest = store.oldest_waiting()
    assert oldest is not None
    assert oldest.tzinfo is not None
    assert before <= oldest <= datetime.now(UTC) + timedelta(seconds=1)
    store.promote_waiting("1.2.3.1")
    store.promote_waiting("1.2.3.2")
    assert store.oldest_waiting() is None


def test_queue_studies_queues_new_and_finished_keeps_checkpoint(store: SqlStore) -> None:
    """queue_studies makes new and done studies pending, flags running ones; checkpoint unmoved."""
    store.record_feed_page(refs(1, 2), [], 7)
    done = store.claim(datetime.now(UTC))
    assert done is not None
    store.finish_study(done.study_uid, StudyState.DONE)
    running = store.claim(datetime.now(UTC))
    assert running is not None
    store.queue_studies(refs(1, 2, 3))
    assert store.checkpoint() == 7
    assert (store.counts()["pending"], store.counts()["running"]) == (2, 1)
    assert store.finish_study(running.study_uid, StudyState.DONE) is StudyState.PENDING


def test_new_study_for_a_finished_study_makes_it_wait_again(store: SqlStore) -> None:
    """A NewStudy for a done/skipped study (deleted and sent again) waits again; pending stays."""
    store.record_feed_page(refs(1), refs(2), 1)
    store.skip_waiting("1.2.3.2", "deleted")
    store.record_feed_page([], refs(1, 2), 2)
    states = {uid: store.study_row(uid).state for uid in ("1.2.3.1", "1.2.3.2")}  # type: ignore[union-attr]
    assert states == {"1.2.3.1": StudyState.PENDING, "1.2.3.2": StudyState.WAITING}
    assert store.waiting_older_than(datetime.now(UTC) + timedelta(seconds=1), 10) == refs(2)
