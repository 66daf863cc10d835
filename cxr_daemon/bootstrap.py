"""The only place that builds concrete adapters and wires them into the core."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cxr_daemon import __version__
from cxr_daemon.adapters.bedrock import build_reporter
from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.adapters.gate import FileGate, NoGate
from cxr_daemon.adapters.orthanc import OrthancClient
from cxr_daemon.adapters.retry import RetryPolicy
from cxr_daemon.adapters.s3 import S3ObjectStore
from cxr_daemon.adapters.sagemaker import build_endpoints
from cxr_daemon.config import Config
from cxr_daemon.domain import FilterRule
from cxr_daemon.pipeline import Pipeline
from cxr_daemon.poller import Poller
from cxr_daemon.ports import Ports, RunVersions
from cxr_daemon.worker import RetryRule, Worker


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

    def close(self) -> None:
        """Release connections and sessions."""
        self.orthanc.close()
        self.store.close()


def build_store(cfg: Config) -> SqlStore:
    """The database adapter alone (``cxrd db migrate`` needs nothing else)."""
    return SqlStore(cfg.database.url, cfg.database.password)


def build(cfg: Config, stop: threading.Event | None = None) -> App:
    """Build every adapter from ``cfg`` and wire the core.

    Raises:
        ConfigError: an adapter cannot be built from this configuration.
    """
    stop = stop or threading.Event()
    policy = RetryPolicy(stop)
    store = build_store(cfg)
    orthanc = OrthancClient(cfg.orthanc, policy)
    segmentation, classification = build_endpoints(cfg.inference, policy)
    reporter = build_reporter(cfg.report, policy)
    ports = Ports(
        orthanc=orthanc,
        store=store,
        objects=S3ObjectStore(cfg.s3, policy),
        segmentation=segmentation,
        classification=classification,
        reporter=reporter,
        gate=FileGate(cfg.test_gate_dir) if cfg.test_gate_dir else NoGate(),
    )
    pipeline = Pipeline(
        ports,
        FilterRule(modalities=cfg.filter.modalities, body_parts=cfg.filter.body_parts),
        RunVersions(code=__version__, prompt_hash=reporter.prompt_hash),
        max_side=cfg.inference.max_side,
    )
    poller = Poller(orthanc, store, cfg.orthanc.page_size, cfg.orthanc.start_from)
    retry = RetryRule(cfg.pipeline.max_attempts, cfg.pipeline.retry_backoff_s)
    worker = Worker(store, pipeline, retry)
    return App(cfg, stop, store, orthanc, ports, pipeline, poller, worker)
