"""The only place that builds concrete adapters and wires them into the core."""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cxr_daemon import __version__
from cxr_daemon.adapters.bedrock import build_reporter
from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.adapters.gate import FileGate, NoGate
from cxr_daemon.adapters.metrics import (
    HeartbeatMetrics,
    MetricsEndpoint,
    serve_metrics,
    step_adapters,
)
from cxr_daemon.adapters.orthanc import OrthancClient
from cxr_daemon.adapters.retry import RetryPolicy
from cxr_daemon.adapters.s3 import S3ObjectStore
from cxr_daemon.adapters.sagemaker import build_endpoints
from cxr_daemon.config import Config
from cxr_daemon.decoding import usable_cores
from cxr_daemon.domain import FilterRule
from cxr_daemon.pipeline import Pipeline
from cxr_daemon.poller import Poller
from cxr_daemon.ports import Ports, RunVersions
from cxr_daemon.sdnotify import Notifier
from cxr_daemon.worker import RetryRule, Worker

# /metrics reads Orthanc's last change while Prometheus waits (10 s by default).
SCRAPE_ORTHANC_TIMEOUT_S = 5.0


@dataclass
class App:
    """The wired daemon: adapters, core objects and the stop event they share."""

    cfg: Config
    stop: threading.Event
    store: SqlStore
    orthanc: OrthancClient
    ports: Ports
    pipeline: Pipeline
    poller: Poller
    worker: Worker
    notifier: Notifier = field(default_factory=Notifier)
    metrics_endpoint: MetricsEndpoint | None = None

    def close(self) -> None:
        """Stop serving metrics; release connections and sessions."""
        if self.metrics_endpoint:
            self.metrics_endpoint.close()
        self.orthanc.close()
        self.store.close()


def build_store(cfg: Config) -> SqlStore:
    """The database adapter alone (``cxrd db migrate`` needs nothing else)."""
    return SqlStore(cfg.database.url, cfg.database.password)


def build(cfg: Config, stop: threading.Event | None = None) -> App:
    """Build every adapter from ``cfg`` and wire the core.

    Only the daemon (``cxrd run``) hands in its stop event; it alone serves
    ``/metrics`` (when ``[metrics] enabled``), so ``cxrd status`` or
    ``reprocess`` next to a running daemon never compete for the port.

    Raises:
        ConfigError: an adapter cannot be built from this configuration, or
            the metrics port cannot be bound.
    """
    daemon = stop is not None
    stop = stop or threading.Event()
    policy = RetryPolicy(stop)
    store = build_store(cfg)
    orthanc = OrthancClient(cfg.orthanc, policy)
    segmentation, classification = build_endpoints(cfg.inference, policy)
    reporter = build_reporter(cfg.report, policy)
    objects = S3ObjectStore(cfg.s3, policy)
    # Last, once nothing else can fail: the port is bound from here on.
    endpoint = _serve_metrics(cfg, stop, store) if daemon and cfg.metrics.enabled else None
    notifier = Notifier(cfg.notify_socket, cfg.watchdog_usec)
    # Every poll, finished step, study and retry also pings the watchdog.
    metrics = HeartbeatMetrics(notifier.watchdog, endpoint.metrics if endpoint else None)
    policy.on_retry = metrics.retried
    ports = Ports(
        orthanc=orthanc,
        store=store,
        objects=objects,
        segmentation=segmentation,
        classification=classification,
        reporter=reporter,
        gate=FileGate(cfg.test_gate_dir) if cfg.test_gate_dir else NoGate(),
        metrics=metrics,
    )
    pipeline = Pipeline(
        ports,
        FilterRule(modalities=cfg.filter.modalities, body_parts=cfg.filter.body_parts),
        RunVersions(code=__version__, prompt_hash=reporter.prompt_hash),
        max_side=cfg.inference.max_side,
        render_slots=min(cfg.pipeline.workers, usable_cores()),
    )
    poller = Poller(orthanc, store, cfg.orthanc.page_size, cfg.orthanc.start_from, metrics=metrics)
    retry = RetryRule(cfg.pipeline.max_attempts, cfg.pipeline.retry_backoff_s)
    worker = Worker(store, pipeline, retry, metrics=metrics)
    return App(cfg, stop, store, orthanc, ports, pipeline, poller, worker, notifier, endpoint)


def _serve_metrics(cfg: Config, stop: threading.Event, store: SqlStore) -> MetricsEndpoint:
    """Serve /metrics, reading Orthanc with a client of its own.

    One session per thread, and quick to give up (one attempt, a short
    timeout): a scrape must answer even when Orthanc does not.
    """
    quick = dataclasses.replace(
        cfg.orthanc, timeout_s=min(cfg.orthanc.timeout_s, SCRAPE_ORTHANC_TIMEOUT_S)
    )
    orthanc = OrthancClient(quick, RetryPolicy(stop, attempts=1))
    adapters = step_adapters(cfg.inference.backend, cfg.report.backend)
    return serve_metrics(cfg.metrics, orthanc, store, adapters, on_close=orthanc.close)


def dependency_pings(cfg: Config) -> dict[str, Callable[[], str]]:
    """For ``cxrd check``: per dependency, a call that builds its adapter alone and pings it.

    Built one by one, so an adapter that cannot even be built fails its own
    line only. One attempt each: a dead dependency costs one timeout, not a
    retry policy's three. Each call raises what the adapter's ``ping`` raises.
    """
    policy = RetryPolicy(attempts=1)

    def orthanc() -> str:
        client = OrthancClient(cfg.orthanc, policy)
        try:
            return client.ping()
        finally:
            client.close()

    def database() -> str:
        store = build_store(cfg)
        try:
            return store.ping()
        finally:
            store.close()

    def model(index: int) -> str:
        return build_endpoints(cfg.inference, policy)[index].ping()

    return {
        "orthanc": orthanc,
        "database": database,
        "s3": lambda: S3ObjectStore(cfg.s3, policy).ping(),
        "segmentation": functools.partial(model, 0),
        "classification": functools.partial(model, 1),
        "bedrock": lambda: build_reporter(cfg.report, policy).ping(),
    }
