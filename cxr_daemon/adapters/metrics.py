"""The ``Metrics`` port on prometheus-client, and the gauges read when Prometheus scrapes.

Counted as it happens (the core reports through the port):

- ``cxrd_studies_finished_total{state}``: a study left ``running`` for
  ``done``, ``skipped``, ``failed``, or ``pending`` (a transient error, retried later)
- ``cxrd_retries_total{step}``: an adapter call retried after a transient error
- ``cxrd_step_duration_seconds{step,adapter}``: pipeline step latency
- ``cxrd_last_successful_poll_timestamp_seconds``: a ``/changes`` page was read and recorded

Read from the source at scrape time (``FeedCollector``), so they are never stale:

- ``cxrd_feed_checkpoint``, ``cxrd_orthanc_last_change``, ``cxrd_feed_lag_changes``
- ``cxrd_queue_studies{state}``
- ``cxrd_scrape_source_up{source}``: 1 when ``orthanc`` / ``database`` answered this scrape

Plus prometheus-client's ``process_*`` (CPU, memory, start time) and ``python_*``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cxr_daemon import __version__
from cxr_daemon.errors import ConfigError, CxrdError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from wsgiref.simple_server import WSGIServer

    from cxr_daemon.config import MetricsConfig
    from cxr_daemon.ports import Orthanc, Store

log = structlog.get_logger(__name__)

# From a 20 ms local render to a model call near its 70 s timeout.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Prometheus gives up on a scrape after 10 s by default: answer well before.
SCRAPE_READ_TIMEOUT_S = 5.0
FINISHED_STATES = ("done", "skipped", "failed", "pending")


def step_adapters(inference_backend: str, report_backend: str) -> dict[str, str]:
    """Which adapter does the I/O of each pipeline step (the ``adapter`` label)."""
    return {
        "download": "orthanc",
        "render": "local",
        "archive": "s3",
        "segment": inference_backend,
        "classify": inference_backend,
        "result": "s3",
        "report": report_backend,
    }


class PrometheusMetrics:
    """The ``Metrics`` port, recording into one private registry."""

    def __init__(
        self, registry: CollectorRegistry, adapters: Mapping[str, str] | None = None
    ) -> None:
        self._adapters = dict(adapters or {})
        self._finished = Counter(
            "cxrd_studies_finished",
            "Studies that left running, by the state stored (pending: retried later).",
            ["state"],
            registry=registry,
        )
        for state in FINISHED_STATES:  # rate() needs a zero to start from
            self._finished.labels(state)
        self._retries = Counter(
            "cxrd_retries",
            "Adapter calls retried after a transient error, by step.",
            ["step"],
            registry=registry,
        )
        self._steps = Histogram(
            "cxrd_step_duration_seconds",
            "Pipeline step latency, by step and the adapter doing its I/O.",
            ["step", "adapter"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self._last_poll = Gauge(
            "cxrd_last_successful_poll_timestamp_seconds",
            "Unix time of the last /changes page read and recorded (0: none yet).",
            registry=registry,
        )
        info = Gauge(
            "cxrd_build_info", "cxrd's version (always 1).", ["version"], registry=registry
        )
        info.labels(__version__).set(1)

    def poll_succeeded(self) -> None:
        """Stamp the time of the last good poll."""
        self._last_poll.set_to_current_time()

    def study_finished(self, state: str) -> None:
        """Count one study by the state it was left in."""
        self._finished.labels(state).inc()

    def step_observed(self, step: str, seconds: float) -> None:
        """Observe one step's latency."""
        self._steps.labels(step, self._adapters.get(step, "other")).observe(seconds)

    def retried(self, step: str) -> None:
        """Count one retry (``RetryPolicy.on_retry``)."""
        self._retries.labels(step).inc()


class HeartbeatMetrics:
    """The ``Metrics`` port bootstrap hands the core: every observation is also a heartbeat.

    The core reports each poll, each finished step and (through
    ``RetryPolicy.on_retry``) each retry; each of those proves the process is
    making progress, so each pings systemd's watchdog. The core stays free of
    systemd: it sees a ``Metrics`` port, not a watchdog.
    """

    def __init__(self, beat: Callable[[], None], metrics: PrometheusMetrics | None = None) -> None:
        self._beat = beat
        self._metrics = metrics

    def poll_succeeded(self) -> None:
        """Beat; record the poll."""
        self._beat()
        if self._metrics:
            self._metrics.poll_succeeded()

    def study_finished(self, state: str) -> None:
        """Beat; count the study."""
        self._beat()
        if self._metrics:
            self._metrics.study_finished(state)

    def step_observed(self, step: str, seconds: float) -> None:
        """Beat; observe the step."""
        self._beat()
        if self._metrics:
            self._metrics.step_observed(step, seconds)

    def retried(self, step: str) -> None:
        """Beat; count the retry."""
        self._beat()
        if self._metrics:
            self._metrics.retried(step)


@dataclass(frozen=True)
class FeedReading:
    """One scrape's reading; ``None`` where the source did not answer."""

    checkpoint: int | None = None
    counts: Mapping[str, int] | None = None
    orthanc_last: int | None = None


class FeedCollector(Collector):
    """Feed lag and queue sizes, read from Orthanc and the database at each scrape."""

    def __init__(
        self, orthanc: Orthanc, store: Store, timeout_s: float = SCRAPE_READ_TIMEOUT_S
    ) -> None:
        self._orthanc = orthanc
        self._store = store
        self._timeout_s = timeout_s
        # Always the same reading thread: the HTTP server runs each scrape in a
        # new thread, and the MySQL store keeps one connection per thread, so
        # reading from the scrape threads would open a connection per scrape.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrd-metrics")
        self._lock = threading.Lock()
        self._inflight: Future[FeedReading] | None = None

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: registering must not read Orthanc or the database."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The gauges; a source that did not answer is left out and marked down."""
        reading = self.read()
        up = GaugeMetricFamily(
            "cxrd_scrape_source_up",
            "1 when the source answered this scrape, else 0.",
            labels=["source"],
        )
        up.add_metric(["orthanc"], float(reading.orthanc_last is not None))
        up.add_metric(["database"], float(reading.counts is not None))
        metrics: list[Metric] = [up]
        if reading.checkpoint is not None:
            metrics.append(
                _gauge("cxrd_feed_checkpoint", "Last /changes seq recorded.", reading.checkpoint)
            )
        if reading.orthanc_last is not None:
            metrics.append(
                _gauge(
                    "cxrd_orthanc_last_change", "Orthanc's last change seq.", reading.orthanc_last
                )
            )
        if reading.checkpoint is not None and reading.orthanc_last is not None:
            lag = reading.orthanc_last - reading.checkpoint
            metrics.append(
                _gauge("cxrd_feed_lag_changes", "Orthanc changes not yet read by cxrd.", lag)
            )
        if reading.counts is not None:
            queue = GaugeMetricFamily(
                "cxrd_queue_studies", "Studies in the queue, by state.", labels=["state"]
            )
            for state, count in sorted(reading.counts.items()):
                queue.add_metric([state], count)
            metrics.append(queue)
        return metrics

    def read(self) -> FeedReading:
        """Read both sources on the reading thread, waiting at most ``timeout_s``."""
        with self._lock:
            # A read still stuck from an earlier scrape is waited on, not doubled.
            if self._inflight is None or self._inflight.done():
                self._inflight = self._reader.submit(self._read_sources)
            inflight = self._inflight
        try:
            return inflight.result(timeout=self._timeout_s)
        except TimeoutError:
            log.warning("metrics_read_timed_out", timeout_s=self._timeout_s)
            return FeedReading()

    def _read_sources(self) -> FeedReading:
        checkpoint: int | None = None
        counts: dict[str, int] | None = None
        last: int | None = None
        try:
            checkpoint = self._store.checkpoint()
            counts = self._store.counts()
        except CxrdError as exc:
            log.info("metrics_source_down", source="database", error=str(exc))
        try:
            last = self._orthanc.last_change()
        except CxrdError as exc:
            log.info("metrics_source_down", source="orthanc", error=str(exc))
        return FeedReading(checkpoint, counts, last)

    def close(self) -> None:
        """Stop the reading thread (a read in progress finishes on its own timeout)."""
        self._reader.shutdown(wait=False, cancel_futures=True)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _ProcessCollector(ProcessCollector):
    """``process_*`` without ``/proc/stat``, which the unit's ``ProcSubset=pid`` hides.

    The stock collector reads the boot time there and, failing, exports
    nothing; the same value is the wall clock minus the time since boot.
    """

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class MetricsEndpoint:
    """The running ``/metrics`` server and what it serves."""

    metrics: PrometheusMetrics
    feed: FeedCollector
    server: WSGIServer
    thread: threading.Thread
    url: str
    on_close: Callable[[], None]

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.feed.close()
        self.on_close()


def serve_metrics(
    cfg: MetricsConfig,
    orthanc: Orthanc,
    store: Store,
    adapters: Mapping[str, str],
    on_close: Callable[[], None] = lambda: None,
) -> MetricsEndpoint:
    """Build the registry and serve it on ``cfg.host:cfg.port``.

    ``orthanc`` should be a client of its own with a short timeout: it is
    read from the metrics thread while the daemon uses its own.
    ``on_close`` runs when the endpoint closes (or fails to open).

    Raises:
        ConfigError: the address cannot be bound (in use, not local, no permission).
    """
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, adapters)
    feed = FeedCollector(orthanc, store)
    registry.register(feed)
    _ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    try:
        server, thread = start_http_server(cfg.port, addr=cfg.host, registry=registry)
    except OSError as exc:
        feed.close()
        on_close()
        raise ConfigError(
            f"metrics: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
        ) from None
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{server.server_port}/metrics"
    log.info("metrics_listening", url=url)
    return MetricsEndpoint(metrics, feed, server, thread, url, on_close)
