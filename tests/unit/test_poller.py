"""The feed: paging, checkpoint moves, rewind (DESIGN feed items 1, 2, 5)."""

from __future__ import annotations

import dataclasses

import pytest
from structlog.testing import capture_logs

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.errors import TransientError
from cxr_daemon.poller import Poller
from tests.fakes import FakeOrthanc, make_study


def drain(poller: Poller) -> int:
    pages = 1
    while poller.step():
        pages += 1
    return pages


def test_paging_reads_every_page_and_queues_each_stable_study(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Seven studies (14 changes) at page size 3 take five pages and are all queued."""
    for n in range(7):
        orthanc.add_study(make_study(n))
    poller.prime()
    assert drain(poller) == 5
    assert store.checkpoint() == orthanc.seq == 14
    assert store.counts()["pending"] == 7


def test_page_without_stable_study_still_moves_checkpoint(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A page of only NewInstance/NewSeries changes moves the checkpoint and queues nothing."""
    poller.prime()
    for _ in range(3):
        orthanc.add_change("NewInstance", "i", resource="Instance")
    assert poller.step() is False
    assert store.checkpoint() == 3
    assert store.counts()["pending"] == 0


def test_new_study_is_recorded_waiting_then_stable_makes_it_pending(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """NewStudy records the study as waiting; its StableStudy moves it to pending."""
    study = make_study(1)
    orthanc.add_study(study, stable=False)
    poller.prime()
    drain(poller)
    assert store.counts()["waiting"] == 1
    orthanc.add_change("StableStudy", study.orthanc_id)
    drain(poller)
    assert store.counts()["waiting"] == 0
    assert store.counts()["pending"] == 1


def test_last_below_checkpoint_rewinds_to_zero_loudly(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Orthanc's Last below the checkpoint (index replaced) rewinds to 0 with an error line."""
    store.record_feed_page([], [], 500)
    orthanc.add_study(make_study(1))
    with capture_logs() as logs:
        assert poller.step() is True
    assert store.checkpoint() == 0
    rewound = [e for e in logs if e["event"] == "orthanc_feed_rewound"]
    assert rewound
    assert rewound[0]["log_level"] == "error"
    assert rewound[0]["checkpoint"] == 500
    drain(poller)
    assert store.counts()["pending"] == 1
    assert store.checkpoint() == orthanc.seq
    assert store.counts()["pending"] == 1


def test_start_from_now_skips_history(orthanc: FakeOrthanc, store: SqlStore) -> None:
    """First start with start_from=now begins at Orthanc's Last: history is left to backfill."""
    orthanc.add_study(make_study(1))
    poller = Poller(orthanc, store, page_size=10, start_from="now")
    assert poller.prime() == orthanc.seq
    drain(poller)
    assert store.counts()["pending"] == 0
    assert poller.prime() == orthanc.seq  # a later start keeps the stored checkpoint


def test_feed_error_records_nothing(poller: Poller, orthanc: FakeOrthanc, store: SqlStore) -> None:
    """An Orthanc error while reading a page leaves checkpoint and queue untouched."""
    orthanc.add_study(make_study(1))
    poller.prime()
    orthanc.fail_next.append(TransientError("down"))
    with pytest.raises(TransientError):
        poller.step()
    assert store.checkpoint() == 0
    assert store.counts()["pending"] == 0


def test_study_deleted_before_lookup_is_dropped_not_blocking(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A StableStudy whose study is gone (404) is logged and the page still commits."""
    orthanc.add_study(make_study(1))
    orthanc.add_study(make_study(2))
    del orthanc.studies["study-1"]
    poller.prime()
    drain(poller)
    assert store.checkpoint() == orthanc.seq
    assert store.counts()["pending"] == 1
    assert store.counts()["pending"] == 1


def test_study_with_an_invalid_uid_is_rejected_with_a_reason_and_the_page_commits(
    poller: Poller, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """A StudyInstanceUID with path characters is logged as rejected; the feed moves on."""
    orthanc.add_study(dataclasses.replace(make_study(1), study_uid="1.2/../3"))
    orthanc.add_study(make_study(2))
    poller.prime()
    with capture_logs() as logs:
        drain(poller)
    rejected = [e for e in logs if e["event"] == "study_rejected"]
    assert rejected
    assert "not a DICOM UID" in rejected[0]["reason"]
    assert store.checkpoint() == orthanc.seq
    assert store.counts()["pending"] == 1
