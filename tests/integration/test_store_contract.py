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
