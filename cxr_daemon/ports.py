"""The protocols the core talks to (STYLE.md §2); adapters and fakes implement them.

Every method documents what it raises, in terms of ``cxr_daemon.errors`` only:
an adapter never lets an SDK exception (requests, botocore, pymysql) through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Protocol

from cxr_daemon.domain import (
    ChangesPage,
    QueuedStudy,
    RunOutcome,
    StudyInfo,
    StudyRef,
    StudyState,
    Trigger,
)


class Orthanc(Protocol):
    """Orthanc's REST API, as far as cxrd reads it."""

    def changes(self, since: int, limit: int) -> ChangesPage:
        """One page of ``/changes`` after ``since``.

        Raises:
            TransientError: unreachable, timeout, 5xx. ConfigError: 401/403.
            PermanentError: an answer that is not the documented JSON.
        """
        ...

    def last_change(self) -> int:
        """Orthanc's current last change sequence number (same errors as ``changes``)."""
        ...

    def study(self, orthanc_id: str) -> StudyInfo:
        """The study with its series and instances.

        Raises:
            StudyGoneError: Orthanc no longer has it. Otherwise as ``changes``.
        """
        ...

    def study_uid(self, orthanc_id: str) -> str:
        """The StudyInstanceUID of an Orthanc study id (errors as ``study``)."""
        ...

    def find_study(self, study_uid: str) -> str | None:
        """The Orthanc id of a StudyInstanceUID, or None when Orthanc lacks it."""
        ...

    def find_studies(
        self, date_from: date, date_to: date, modalities: Sequence[str]
    ) -> list[StudyRef]:
        """Stable studies with a StudyDate in [date_from, date_to] and a series of ``modalities``.

        A study still being received (``IsStable`` false) is left out: the feed
        announces it. The UIDs are as Orthanc holds them, not yet validated.

        Raises:
            TransientError, ConfigError, PermanentError: as ``changes``.
        """
        ...

    def instance_tags(self, orthanc_id: str) -> Mapping[str, str]:
        """Simplified tags of one instance (errors as ``study``)."""
        ...

    def download_instance(self, orthanc_id: str, dest: Path) -> int:
        """Stream the instance's DICOM file to ``dest``; return its size in bytes."""
        ...

    def rendered_instance(self, orthanc_id: str) -> bytes:
        """Orthanc's own 8-bit rendering (``/instances/{id}/rendered``), PNG bytes."""
        ...

    def ping(self) -> str:
        """Check reachability and credentials; return Orthanc's version."""
        ...


@dataclass(frozen=True)
class RunVersions:
    """What produced a run: recorded with it for reproducibility."""

    code: str
    models: str = ""
    prompt_hash: str = ""


@dataclass(frozen=True)
class InstanceRecord:
    """One processed image of a run, as stored in the database."""

    sop_uid: str
    series_uid: str
    view: str = ""
    rendering: str = ""
    width: int = 0
    height: int = 0
    jpg_key: str = ""
    dcm_key: str = ""
    mask_key: str = ""


@dataclass(frozen=True)
class FindingRecord:
    """One finding of one image."""

    sop_uid: str
    label: str
    probability: float
    bbox: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ReportRecord:
    """The drafted report of a run."""

    text: str
    model_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str = ""
    prompt_hash: str = ""


@dataclass(frozen=True)
class RunResults:
    """Everything a finished run wrote, saved in one transaction."""

    instances: Sequence[InstanceRecord] = ()
    findings: Sequence[FindingRecord] = ()
    report: ReportRecord | None = None
    instance_set_hash: str = ""
    log_key: str = ""
    patient_id: str = ""
    models: str = ""


@dataclass(frozen=True)
class StudyRow:
    """A queue row as ``cxrd status --study`` shows it."""

    study_uid: str
    orthanc_id: str
    state: StudyState
    attempts: int
    reason: str
    updated_at: datetime | None


@dataclass(frozen=True)
class RunRow:
    """A run as ``cxrd status --study`` shows it."""

    run_id: str
    trigger: str
    outcome: str
    reason: str
    started_at: datetime
    finished_at: datetime | None


class Store(Protocol):
    """The database: schema, checkpoint, queue and run records.

    Every method raises TransientError when the database is unreachable and
    ConfigError when credentials are refused or the schema is too old.
    """

    def schema_version(self) -> int:
        """Version of the schema in the database (0 when there is none)."""
        ...

    def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema; return (before, after) versions."""
        ...

    def checkpoint(self) -> int | None:
        """The last ``/changes`` sequence fully recorded, or None before the first start."""
        ...

    def record_feed_page(
        self, stable: Sequence[StudyRef], waiting: Sequence[StudyRef], checkpoint: int
    ) -> None:
        """In one transaction: queue ``stable`` (pending), note ``waiting``, move the checkpoint."""
        ...

    def waiting_older_than(self, cutoff: datetime, limit: int) -> list[StudyRef]:
        """Up to ``limit`` studies ``waiting`` since before ``cutoff``, oldest first."""
        ...

    def promote_waiting(self, study_uid: str) -> bool:
        """Make a ``waiting`` study ``pending`` as its StableStudy would; False if not waiting."""
        ...

    def skip_waiting(self, study_uid: str, reason: str) -> bool:
        """End a ``waiting`` study as ``skipped`` with ``reason``; False if not waiting."""
        ...

    def oldest_waiting(self) -> datetime | None:
        """Since when the longest-waiting study has waited (UTC), or None when none waits."""
        ...

    def queue_studies(self, refs: Sequence[StudyRef]) -> None:
        """Make each study ``pending`` as a StableStudy would, without moving the checkpoint."""
        ...

    def reclaim_running(self, max_attempts: int) -> int:
        """Hand rows left ``running`` by a dead process back to ``pending``; return how many.

        A row already at ``max_attempts`` is ``failed`` instead, so a study that
        kills the process every time it is processed cannot loop for ever.
        """
        ...

    def claim(self, now: datetime) -> QueuedStudy | None:
        """Take the oldest due ``pending`` study and mark it ``running``; None when none is due."""
        ...

    def claim_study(self, ref: StudyRef) -> QueuedStudy:
        """Queue ``ref`` if needed and mark it ``running`` now, whatever its state (reprocess)."""
        ...

    def finish_study(
        self,
        study_uid: str,
        state: StudyState,
        reason: str = "",
        next_attempt_at: datetime | None = None,
    ) -> StudyState:
        """Leave ``running`` for ``state``; return the state actually stored.

        A study that got a new StableStudy while running goes back to
        ``pending`` instead of ``done``, so late images are not lost.
        """
        ...

    def release(self, study_uid: str) -> None:
        """Hand a claimed study back to ``pending`` without counting an attempt."""
        ...

    def interrupt_runs(self, study_uid: str) -> bool:
        """Close the study's runs left ``running`` as ``interrupted``; True if there was one."""
        ...

    def last_done_hash(self, study_uid: str) -> str | None:
        """The instance-set hash of the study's last ``done`` run, if any."""
        ...

    def start_run(self, study_uid: str, trigger: Trigger, versions: RunVersions) -> str:
        """Record a new run in state ``running``; return its run id."""
        ...

    def finish_run(
        self, run_id: str, outcome: RunOutcome, reason: str = "", results: RunResults | None = None
    ) -> None:
        """Close a run with its outcome, saving ``results`` in the same transaction."""
        ...

    def counts(self) -> dict[str, int]:
        """Number of studies in each state (every state present, zeros included)."""
        ...

    def failures(self, limit: int) -> list[StudyRow]:
        """The most recently failed studies with their reasons."""
        ...

    def study_row(self, study_uid: str) -> StudyRow | None:
        """One queue row, or None when cxrd has never seen the study."""
        ...

    def runs(self, study_uid: str) -> list[RunRow]:
        """The study's runs, oldest first."""
        ...

    def ping(self) -> str:
        """Check the connection and the schema; return a short description."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class ObjectStore(Protocol):
    """The S3 bucket (under the configured prefix, which the adapter adds)."""

    def put(
        self,
        key: str,
        body: bytes | Path,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> None:
        """Write one object (a Path is streamed from disk, never read whole).

        Raises:
            TransientError: timeouts, 5xx, SlowDown. PermanentError: other 4xx.
            ConfigError: credentials refused, bucket missing.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove one object (errors as ``put``)."""
        ...

    def uri(self, key: str) -> str:
        """``s3://bucket/prefix/key``, for people."""
        ...

    def ping(self) -> str:
        """Reach the bucket: put and delete a probe object; return a short description."""
        ...


class ModelEndpoint(Protocol):
    """One model behind the SageMaker container contract (``/ping``, ``/invocations``)."""

    name: str

    def invoke(self, body: bytes, content_type: str, accept: str) -> bytes:
        """Send one request; return the response body.

        Raises:
            PermanentError: request over 6,291,456 bytes (never sent), 4xx,
                ModelError (424). TransientError: timeout, 5xx, throttling,
                ModelNotReady. ConfigError: credentials refused, no such endpoint.
        """
        ...

    def ping(self) -> str:
        """Check the endpoint is in service; return a short description."""
        ...


@dataclass(frozen=True)
class ReportRequest:
    """What a report is drafted from: structured findings only, never PHI."""

    view: str
    image_count: int
    findings: Sequence[FindingRecord]


class Reporter(Protocol):
    """Drafts a report from findings (Bedrock, a template, or nothing)."""

    prompt_hash: str

    def draft(self, request: ReportRequest) -> ReportRecord | None:
        """Return the draft, or None for the ``none`` backend.

        Raises:
            TransientError: throttling, timeouts, 5xx. PermanentError: the
                request was refused as invalid. ConfigError: access denied.
        """
        ...

    def ping(self) -> str:
        """Check the model is reachable; return a short description."""
        ...


class StepGate(Protocol):
    """Called as the pipeline enters each step; tests use it to pause a run there."""

    def reached(self, step: str) -> None:
        """Return when the step may proceed."""
        ...


class Metrics(Protocol):
    """What the core reports for monitoring; the Prometheus adapter implements it.

    Gauges that are cheap to read from the source (feed lag, queue sizes) are
    read at scrape time by the adapter, not pushed from here.
    """

    def poll_succeeded(self) -> None:
        """A /changes page was read and recorded."""
        ...

    def study_finished(self, state: str) -> None:
        """A study left ``running`` for ``state``."""
        ...

    def step_observed(self, step: str, seconds: float) -> None:
        """A pipeline step (download, render, archive, segment, ...) took ``seconds``."""
        ...


class NullMetrics:
    """Metrics off: every observation is dropped."""

    def poll_succeeded(self) -> None:
        """Drop."""

    def study_finished(self, state: str) -> None:
        """Drop."""

    def step_observed(self, step: str, seconds: float) -> None:
        """Drop."""


@dataclass(frozen=True)
class Ports:
    """Everything the pipeline talks to, built by bootstrap (or by tests from fakes)."""

    orthanc: Orthanc
    store: Store
    objects: ObjectStore
    segmentation: ModelEndpoint
    classification: ModelEndpoint
    reporter: Reporter
    gate: StepGate
    metrics: Metrics = field(default_factory=NullMetrics)
