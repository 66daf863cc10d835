"""Several workers at once, and outcomes kept through a database outage."""

from __future__ import annotations

import threading

import pytest

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyState
from cxr_daemon.errors import ConfigError, TransientError
from cxr_daemon.poller import Poller
from cxr_daemon.pool import WorkerPool
from cxr_daemon.worker import Daemon, Worker
from tests.fakes import FakeOrthanc, make_study


def test_pooled_once_processes_every_study_exactly_once(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, store: SqlStore
) -> None:
    """`--once` with 4 workers: the feed is drained, then every study is done once."""
    for n in range(12):
        orthanc.add_study(make_study(n, images=1))
    poller.prime()
    Daemon(poller, worker, threading.Event(), 0.01, workers=4).run(once=True)
    assert store.counts()["done"] == 12
    for n in range(12):
        assert len(store.runs(make_study(n).study_uid)) == 1


def test_a_fatal_error_in_a_pool_thread_stops_the_pool_and_is_raised() -> None:
    """A ConfigError in one worker sets the stop event and comes out of join()."""
    stop = threading.Event()

    def step() -> bool:
        raise ConfigError("Orthanc refused the credentials")

    pool = WorkerPool(step, 3, stop, 0.01)
    pool.start()
    with pytest.raises(ConfigError):
        pool.join()
    assert stop.is_set()


def test_halt_ends_idle_threads_without_setting_stop() -> None:
    """halt() ends the loops (the daemon stopped for its own reason); stop stays clear."""
    stop = threading.Event()
    pool = WorkerPool(lambda: False, 2, stop, 30.0)
    pool.start()
    pool.halt()
    pool.join()
    assert not pool.alive()
    assert not stop.is_set()


class FlakyStore(SqlStore):
    """The real store whose next finish_study calls fail as if the database were gone."""

    failures = 0

    def finish_study(self, *args: object, **kwargs: object) -> StudyState:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise TransientError("database unavailable: Lost connection")
        return super().finish_study(*args, **kwargs)  # type: ignore[arg-type]


def test_outcome_lost_to_a_db_outage_is_recorded_once_the_db_is_back(
    orthanc: FakeOrthanc, store: SqlStore, worker: Worker, poller: Poller
) -> None:
    """finish_study failing leaves the study running; the next step records it (done run kept
    or study requeued), so nothing stays running and nothing is lost."""
    study = make_study(1, images=1)
    orthanc.add_study(study)
    poller.prime()
    while poller.step():
        pass
    store.__class__ = FlakyStore
    store.failures = 1  # type: ignore[attr-defined]
    with pytest.raises(TransientError):
        worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.RUNNING
    assert worker.unrecorded
    worker.step()  # the database is back: the outcome is recorded, then the queue worked
    assert not worker.unrecorded
    worker.step()
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.DONE
    outcomes = [r.outcome for r in store.runs(study.study_uid)]
    assert outcomes.count("done") == 1
    assert "running" not in outcomes
