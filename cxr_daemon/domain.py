"""Pure values of cxrd: no I/O, stdlib only (STYLE.md §2)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from cxr_daemon.errors import InvalidUidError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LEN = 64


class StudyState(StrEnum):
    """Queue state of a study (DESIGN "The feed and the queue")."""

    WAITING = "waiting"
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class RunOutcome(StrEnum):
    """Outcome of one run of the pipeline over a study."""

    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class Trigger(StrEnum):
    """What started a run."""

    FEED = "feed"
    REPROCESS = "reprocess"


class ChangeType(StrEnum):
    """The Orthanc change types the feed acts on."""

    STABLE_STUDY = "StableStudy"
    NEW_STUDY = "NewStudy"


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def validate_uid(uid: str, what: str = "UID") -> str:
    """Return ``uid`` if it is a syntactically valid DICOM UID.

    Raises:
        InvalidUidError: not digits and dots, or longer than 64 characters.
    """
    if len(uid) > UID_MAX_LEN:
        raise InvalidUidError(f"{what} is {len(uid)} characters long, DICOM allows at most 64")
    if not _UID_RE.fullmatch(uid):
        raise InvalidUidError(f"{what} {uid!r} is not a DICOM UID (digits and dots only)")
    return uid


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's ``/changes`` feed."""

    seq: int
    change_type: str
    resource_type: str
    orthanc_id: str


@dataclass(frozen=True)
class ChangesPage:
    """One page of ``/changes``: its entries, ``Last`` and ``Done``."""

    changes: tuple[Change, ...]
    last: int
    done: bool


@dataclass(frozen=True)
class StudyRef:
    """A study as the queue knows it."""

    study_uid: str
    orthanc_id: str


@dataclass(frozen=True)
class SeriesInfo:
    """The series-level tags the filter and the pipeline need."""

    orthanc_id: str
    series_uid: str
    modality: str
    body_part: str
    instance_ids: tuple[str, ...]


@dataclass(frozen=True)
class InstanceInfo:
    """The instance-level identity of one image."""

    orthanc_id: str
    sop_uid: str
    series_uid: str


@dataclass(frozen=True)
class StudyInfo:
    """A study as Orthanc describes it, with its series and instances."""

    orthanc_id: str
    study_uid: str
    patient_id: str
    series: tuple[SeriesInfo, ...]
    instances: tuple[InstanceInfo, ...]
    is_stable: bool = True


@dataclass(frozen=True)
class QueuedStudy:
    """A claimed queue row: what a worker processes."""

    study_uid: str
    orthanc_id: str
    attempts: int


@dataclass(frozen=True)
class FilterRule:
    """Which studies are chest X-rays (config ``[filter]``)."""

    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)


@dataclass(frozen=True)
class QueueCounts:
    """Number of studies in each state."""

    by_state: dict[str, int] = field(default_factory=dict)


def chest_xray_series(study: StudyInfo, rule: FilterRule) -> tuple[SeriesInfo, ...]:
    """Return the series of ``study`` that the filter accepts as chest X-ray.

    An empty ``BodyPartExamined`` is accepted when the modality matches:
    many CR/DX devices leave it blank (seen in the shared real CXRs), and a
    study is then judged by its modality alone. A present, different body
    part (ABDOMEN, EXTREMITY) is rejected.
    """
    modalities = {m.upper() for m in rule.modalities}
    parts = {p.upper() for p in rule.body_parts}
    return tuple(
        s
        for s in study.series
        if s.modality.upper() in modalities
        and (not parts or not s.body_part.strip() or s.body_part.strip().upper() in parts)
    )


def skip_reason(study: StudyInfo, rule: FilterRule) -> str | None:
    """Say why ``study`` is not a chest X-ray, or return None if it is one."""
    if chest_xray_series(study, rule):
        return None
    if not study.series:
        return "study has no series"
    found = ", ".join(
        sorted({f"{s.modality or '?'}/{s.body_part.strip() or '-'}" for s in study.series})
    )
    wanted = "/".join(rule.modalities)
    parts = "/".join(rule.body_parts) or "any"
    return f"not a chest X-ray: series are {found} (modality/body part); wanted {wanted} of {parts}"


def instance_set_hash(sop_uids: list[str] | tuple[str, ...]) -> str:
    """Hash of the sorted SOPInstanceUIDs: equal sets mean nothing new arrived."""
    digest = hashlib.sha256("\n".join(sorted(sop_uids)).encode("ascii"))
    return digest.hexdigest()


@dataclass(frozen=True)
class StudyLayout:
    """S3 keys of one study (DESIGN "Storage layout"), relative to the configured prefix.

    Built only from validated UIDs: a UID with a path character never gets here.
    """

    study_uid: str

    def __post_init__(self) -> None:
        validate_uid(self.study_uid, "StudyInstanceUID")

    @property
    def root(self) -> str:
        """``studies/{StudyInstanceUID}``."""
        return f"studies/{self.study_uid}"

    def jpg(self, sop_uid: str) -> str:
        """The 8-bit rendering sent to the models."""
        return f"{self.root}/input/original/{validate_uid(sop_uid, 'SOPInstanceUID')}.jpg"

    def dcm(self, sop_uid: str) -> str:
        """The DICOM file as stored in Orthanc."""
        return f"{self.root}/input/dicom/{validate_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def mask(self, sop_uid: str) -> str:
        """The segmentation mask."""
        return f"{self.root}/segmentation/masks/{validate_uid(sop_uid, 'SOPInstanceUID')}_mask.png"

    @property
    def result(self) -> str:
        """Per-instance findings of the run."""
        return f"{self.root}/classification/result.json"

    @property
    def report(self) -> str:
        """The draft report."""
        return f"{self.root}/report/report.json"

    def log(self, started: datetime) -> str:
        """The run's log, named by its UTC start."""
        return f"{self.root}/metadata/log_{started.astimezone(UTC):%Y%m%dT%H%M%SZ}.json"


RECONNECT_CAP_S = 30.0


def reconnect_delay(base_s: float, failures: int) -> float:
    """Wait before trying a dependency again after ``failures`` failures in a row.

    Doubles from ``base_s`` and stops at 30 s, so a long outage is retried
    twice a minute and a short one is noticed within a few seconds.
    """
    return float(min(max(base_s, 0.1) * 2.0 ** min(failures, 10), RECONNECT_CAP_S))
