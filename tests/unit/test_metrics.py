"""The Prometheus adapter: counters from the core, gauges read at scrape time, the endpoint."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from prometheus_client import CollectorRegistry

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.adapters.metrics import (
    FeedCollector,
    HeartbeatMetrics,
    PrometheusMetrics,
    serve_metrics,
    step_adapters,
)
from cxr_daemon.adapters.retry import RetryPolicy
from cxr_daemon.config import MetricsConfig
from cxr_daemon.domain import FilterRule, StudyRef
from cxr_daemon.errors import ConfigError, TransientError
from cxr_daemon.pipeline import Pipeline
from cxr_daemon.poller import Poller
from cxr_daemon.ports import Ports, RunVersions
from cxr_daemon.sandbox.processes import free_loopback_ports
from cxr_daemon.worker import RetryRule, Worker
from tests.fakes import FakeOrthanc, make_study


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def prom(registry: CollectorRegistry) -> PrometheusMetrics:
    return PrometheusMetrics(registry, step_adapters("http", "template"))


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_core_reports_polls_steps_and_finished_studies(
    registry: CollectorRegistry,
    prom: PrometheusMetrics,
    ports: Ports,
    orthanc: FakeOrthanc,
    store: SqlStore,
) -> None:
    """A poll, a processed two-image study and its steps show up in the registry."""
    wired = dataclasses.replace(ports, metrics=prom)
    pipeline = Pipeline(wired, FilterRule(), RunVersions(code="test"), max_side=64)
    worker = Worker(store, pipeline, RetryRule(3, (5,)), metrics=prom)
    poller = Poller(orthanc, store, page_size=10, start_from="beginning", metrics=prom)
    orthanc.add_study(make_study(1, images=2))
    poller.prime()
    before = time.time()
    poller.step()
    assert (value(registry, "cxrd_last_successful_poll_timestamp_seconds") or 0) >= before
    assert worker.step()
    assert value(registry, "cxrd_studies_finished_total", state="done") == 1
    assert value(registry, "cxrd_studies_finished_total", state="failed") == 0
    count = "cxrd_step_duration_seconds_count"
    assert value(registry, count, step="download", adapter="orthanc") == 2
    assert value(registry, count, step="segment", adapter="http") == 2
    assert value(registry, count, step="report", adapter="template") == 1


def test_retries_are_counted_by_step(registry: CollectorRegistry, prom: PrometheusMetrics) -> None:
    """RetryPolicy.on_retry wired to the adapter counts each retry under the step's name."""
    policy = RetryPolicy(attempts=3, initial_s=0, max_wait_s=0)
    policy.on_retry = prom.retried
    failures = [TransientError("busy"), TransientError("busy")]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert policy.call("model.invoke", flaky) == "ok"
    assert value(registry, "cxrd_retries_total", step="model.invoke") == 2


def test_heartbeat_beats_on_every_observation(prom: PrometheusMetrics) -> None:
    """Each poll, step, finished study and retry is a heartbeat, recorded or not."""
    beats: list[int] = []
    for recorder in (prom, None):
        beats.clear()
        metrics = HeartbeatMetrics(lambda: beats.append(1), recorder)
        metrics.poll_succeeded()
        metrics.step_observed("render", 0.1)
        metrics.study_finished("done")
        metrics.retried("download")
        assert len(beats) == 4


def test_feed_collector_reads_lag_and_queue_at_scrape_time(
    registry: CollectorRegistry, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """Lag is Orthanc's last change minus the checkpoint; queue gauges follow the store."""
    collector = FeedCollector(orthanc, store)
    registry.register(collector)
    try:
        store.record_feed_page([StudyRef("1.2.3", "a")], [StudyRef("1.2.4", "b")], 3)
        for _ in range(10):
            orthanc.add_change("NewSeries", "x")
        assert value(registry, "cxrd_feed_checkpoint") == 3
        assert value(registry, "cxrd_orthanc_last_change") == 10
        assert value(registry, "cxrd_feed_lag_changes") == 7
        assert value(registry, "cxrd_queue_studies", state="pending") == 1
        assert value(registry, "cxrd_queue_studies", state="waiting") == 1
        assert value(registry, "cxrd_queue_studies", state="failed") == 0
        assert value(registry, "cxrd_scrape_source_up", source="orthanc") == 1
        store.record_feed_page([], [], 10)
        assert value(registry, "cxrd_feed_lag_changes") == 0
    finally:
        collector.close()


def test_orthanc_down_leaves_lag_out_but_the_scrape_answers(
    registry: CollectorRegistry, orthanc: FakeOrthanc, store: SqlStore
) -> None:
    """An Orthanc error marks it down and drops the lag; queue gauges are still served."""
    collector = FeedCollector(orthanc, store)
    registry.register(collector)
    try:
        store.record_feed_page([], [], 5)
        orthanc.fail_next.append(TransientError("Orthanc unreachable"))
        assert value(registry, "cxrd_scrape_source_up", source="orthanc") == 0
        orthanc.fail_next.append(TransientError("Orthanc unreachable"))
        assert value(registry, "cxrd_feed_lag_changes") is None
        assert value(registry, "cxrd_feed_checkpoint") == 5
        assert value(registry, "cxrd_queue_studies", state="done") == 0
    finally:
        collector.close()


class BlockedStore:
    """A store whose reads hang until released (a database that stopped answering)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def checkpoint(self) -> int:
        self.release.wait(30)
        return 1

    def counts(self) -> dict[str, int]:
        return {"pending": 0}


def test_hung_source_is_reported_down_within_the_timeout(
    registry: CollectorRegistry, orthanc: FakeOrthanc
) -> None:
    """A read stuck in the database is not waited for past timeout_s; both sources read down."""
    store = BlockedStore()
    collector = FeedCollector(orthanc, store, timeout_s=0.2)  # type: ignore[arg-type]
    registry.register(collector)
    try:
        began = time.monotonic()
        assert value(registry, "cxrd_scrape_source_up", source="database") == 0
        assert time.monotonic() - began < 5
        store.release.set()
    finally:
        store.release.set()
        collector.close()


@pytest.fixture
def endpoint(orthanc: FakeOrthanc, store: SqlStore) -> Iterator[tuple[str, list[str]]]:
    """/metrics served on a free loopback port; the URL and a record of on_close calls."""
    closed: list[str] = []
    (port,) = free_loopback_ports(1)
    served = serve_metrics(
        MetricsConfig(enabled=True, host="127.0.0.1", port=port),
        orthanc,
        store,
        step_adapters("http", "template"),
        on_close=lambda: closed.append("orthanc"),
    )
    try:
        yield served.url, closed
    finally:
        served.close()
    assert closed == ["orthanc"]


def test_endpoint_serves_the_text_format(endpoint: tuple[str, list[str]], store: SqlStore) -> None:
    """GET /metrics answers the exposition format with cxrd's, process and python metrics."""
    url, _ = endpoint
    store.record_feed_page([], [], 0)
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200
    body = answer.text
    for name in (
        "cxrd_studies_finished_total",
        "cxrd_queue_studies",
        "cxrd_feed_lag_changes",
        "cxrd_build_info",
        "process_start_time_seconds",
        "python_info",
    ):
        assert f"\n{name}" in body, name


def test_port_in_use_is_a_config_error(orthanc: FakeOrthanc, store: SqlStore) -> None:
    """A metrics port already bound stops cxrd with one line naming host and port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        closed: list[str] = []
        with pytest.raises(ConfigError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            serve_metrics(
                MetricsConfig(enabled=True, port=port),
                orthanc,
                store,
                {},
                on_close=lambda: closed.append("x"),
            )
        assert closed == ["x"]


def test_process_metrics_need_no_proc_stat(registry: CollectorRegistry) -> None:
    """process_start_time_seconds is computed without /proc/stat (hidden by ProcSubset=pid)."""
    from cxr_daemon.adapters.metrics import _ProcessCollector  # noqa: PLC0415

    _ProcessCollector(registry=registry, proc="/proc")
    started = value(registry, "process_start_time_seconds")
    assert started is not None
    assert time.time() - 24 * 3600 < started <= time.time()
