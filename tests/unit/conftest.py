"""Unit-test fixtures: the embedded SQLite store and the fake Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_daemon import logconf
from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.adapters.gate import NoGate
from cxr_daemon.domain import FilterRule
from cxr_daemon.pipeline import Pipeline
from cxr_daemon.poller import Poller
from cxr_daemon.ports import Ports, RunVersions
from cxr_daemon.worker import RetryRule, Worker
from tests.fakes import FakeModel, FakeObjectStore, FakeOrthanc, RecordingReporter

logconf.cache_loggers = False  # capture_logs must see module-level loggers


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    s = SqlStore(f"sqlite://{tmp_path / 'cxrd.db'}")
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def orthanc() -> FakeOrthanc:
    return FakeOrthanc()


@pytest.fixture
def poller(orthanc: FakeOrthanc, store: SqlStore) -> Poller:
    return Poller(orthanc, store, page_size=3, start_from="beginning")


@pytest.fixture
def bucket() -> FakeObjectStore:
    return FakeObjectStore()


@pytest.fixture
def ports(orthanc: FakeOrthanc, store: SqlStore, bucket: FakeObjectStore) -> Ports:
    return Ports(
        orthanc=orthanc,
        store=store,
        objects=bucket,
        segmentation=FakeModel("segmentation"),
        classification=FakeModel("classification"),
        reporter=RecordingReporter(),
        gate=NoGate(),
    )


@pytest.fixture
def pipeline(ports: Ports) -> Pipeline:
    return Pipeline(ports, FilterRule(), RunVersions(code="test"), max_side=64)


@pytest.fixture
def worker(store: SqlStore, pipeline: Pipeline) -> Worker:
    return Worker(store, pipeline, RetryRule(max_attempts=3, backoff_s=(5, 30)))
