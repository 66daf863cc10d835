"""In-memory stand-ins for the ports, for unit tests of poller, worker and pipeline.

The store is not faked: the embedded SQLite ``SqlStore`` in a temporary file is
the real adapter, cheap enough for unit tests, so queue semantics are never
implemented twice.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_daemon import modelserver
from cxr_daemon.adapters.bedrock import TemplateReporter
from cxr_daemon.domain import (
    Change,
    ChangesPage,
    InstanceInfo,
    SeriesInfo,
    StudyInfo,
    StudyRef,
    validate_uid,
)
from cxr_daemon.errors import CxrdError, StudyGoneError
from cxr_daemon.ports import ReportRecord, ReportRequest
from cxr_daemon.sandbox.phantom import write_chest_phantom


@dataclass
class FakeOrthanc:
    """Orthanc's feed and studies, with the paging rules of the real /changes."""

    changes_log: list[Change] = field(default_factory=list)
    studies: dict[str, StudyInfo] = field(default_factory=dict)
    fail_next: list[CxrdError] = field(default_factory=list)
    seq: int = 0
    calls: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    study_dates: dict[str, date] = field(default_factory=dict)

    def add_change(self, change_type: str, orthanc_id: str, resource: str = "Study") -> int:
        """Append a change; return its seq."""
        self.seq += 1
        self.changes_log.append(Change(self.seq, change_type, resource, orthanc_id))
        return self.seq

    def add_study(self, study: StudyInfo, *, stable: bool = True) -> None:
        """Store a study and announce it as Orthanc would (NewStudy, then StableStudy)."""
        self.studies[study.orthanc_id] = study
        self.add_change("NewStudy", study.orthanc_id)
        if stable:
            self.add_change("StableStudy", study.orthanc_id)

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_next:
            raise self.fail_next.pop(0)

    def changes(self, since: int, limit: int) -> ChangesPage:
        """Changes after ``since``; ``Last`` is the page's last seq, or the global one."""
        self._maybe_fail("changes")
        after = [c for c in self.changes_log if c.seq > since]
        page = after[:limit]
        last = page[-1].seq if page else self.seq
        return ChangesPage(tuple(page), last=last, done=len(after) <= limit)

    def last_change(self) -> int:
        """The last seq."""
        self._maybe_fail("last_change")
        return self.seq

    def study(self, orthanc_id: str) -> StudyInfo:
        """A stored study, or StudyGoneError."""
        self._maybe_fail("study")
        if orthanc_id not in self.studies:
            raise StudyGoneError(f"Orthanc no longer has /studies/{orthanc_id} (HTTP 404)")
        return self.studies[orthanc_id]

    def study_uid(self, orthanc_id: str) -> str:
        """The study's UID, validated as the real adapter does."""
        return validate_uid(self.study(orthanc_id).study_uid, "StudyInstanceUID")

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc id by UID."""
        return next((s.orthanc_id for s in self.studies.values() if s.study_uid == study_uid), None)

    def instance_tags(self, orthanc_id: str) -> Mapping[str, str]:
        """No tags."""
        return {"SOPInstanceUID": orthanc_id}

    def download_instance(self, orthanc_id: str, dest: Path) -> int:
        """Copy a planted file, or write a small chest phantom with the instance's UIDs."""
        self._maybe_fail("download")
        if orthanc_id in self.files:
            dest.write_bytes(self.files[orthanc_id].read_bytes())
            return dest.stat().st_size
        study, inst = self._instance(orthanc_id)
        write_chest_phantom(
            dest,
            study_uid=study.study_uid,
            series_uid=inst.series_uid,
            sop_uid=inst.sop_uid,
            rows=96,
            cols=80,
        )
        return dest.stat().st_size

    def _instance(self, orthanc_id: str) -> tuple[StudyInfo, InstanceInfo]:
        for study in self.studies.values():
            for inst in study.instances:
                if inst.orthanc_id == orthanc_id:
                    return study, inst
        raise StudyGoneError(f"Orthanc no longer has /instances/{orthanc_id} (HTTP 404)")

    def rendered_instance(self, orthanc_id: str) -> bytes:
        """A mid-grey PNG, as Orthanc's /rendered would give for any image."""
        self._maybe_fail("render")
        self.calls.append(f"rendered:{orthanc_id}")
        out = io.BytesIO()
        Image.new("L", (80, 96), 128).save(out, format="PNG")
        return out.getvalue()

    def ping(self) -> str:
        """Always up."""
        return "fake Orthanc"

    def set_study_date(self, orthanc_id: str, day: date) -> None:
        """Give a stored study a StudyDate (studies without one never match find_studies)."""
        self.study_dates[orthanc_id] = day

    def find_studies(
        self, date_from: date, date_to: date, modalities: Sequence[str]
    ) -> list[StudyRef]:
        """Stable studies dated in the range with a series of one of ``modalities``."""
        self._maybe_fail("find")
        wanted = {m.upper() for m in modalities}
        return [
            StudyRef(study.study_uid, study.orthanc_id)
            for study in self.studies.values()
            if study.is_stable
            and study.orthanc_id in self.study_dates
            and date_from <= self.study_dates[study.orthanc_id] <= date_to
            and (not wanted or any(s.modality.upper() in wanted for s in study.series))
        ]


def make_study(
    n: int,
    *,
    modality: str = "DX",
    body_part: str = "CHEST",
    images: int = 2,
    extra_series: tuple[tuple[str, str], ...] = (),
) -> StudyInfo:
    """A study with one series of ``modality`` (plus ``extra_series`` (modality, part))."""
    study_uid = f"1.2.826.0.1.{n}"
    specs = [(modality, body_part), *extra_series]
    series: list[SeriesInfo] = []
    instances: list[InstanceInfo] = []
    for s_idx, (mod, part) in enumerate(specs, start=1):
        series_uid = f"{study_uid}.{s_idx}"
        ids = tuple(f"inst-{n}-{s_idx}-{i}" for i in range(images))
        series.append(SeriesInfo(f"series-{n}-{s_idx}", series_uid, mod, part, ids))
        instances += [
            InstanceInfo(iid, f"{series_uid}.{i}", series_uid) for i, iid in enumerate(ids)
        ]
    return StudyInfo(f"study-{n}", study_uid, f"PID-{n}", tuple(series), tuple(instances))


@dataclass
class FakeObjectStore:
    """A bucket in a dict: key -> (body bytes, content type, metadata)."""

    objects: dict[str, tuple[bytes, str, dict[str, str]]] = field(default_factory=dict)
    fail_next: list[CxrdError] = field(default_factory=list)

    def put(
        self, key: str, body: bytes | Path, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """Store the object (a Path is read)."""
        if self.fail_next:
            raise self.fail_next.pop(0)
        data = body.read_bytes() if isinstance(body, Path) else body
        self.objects[key] = (data, content_type, dict(metadata))

    def delete(self, key: str) -> None:
        """Remove the object."""
        self.objects.pop(key, None)

    def uri(self, key: str) -> str:
        """s3://fake/<key>."""
        return f"s3://fake/{key}"

    def ping(self) -> str:
        """Always reachable."""
        return "fake bucket"

    def json(self, key: str) -> object:
        """A stored JSON object, decoded."""
        return json.loads(self.objects[key][0])


@dataclass
class FakeModel:
    """A model endpoint answering with the reference model server's functions in-process."""

    name: str
    answers: list[bytes | CxrdError] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)

    def invoke(self, body: bytes, content_type: str, accept: str) -> bytes:
        """Answer a planted answer first, else the reference model's."""
        self.requests.append(body)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, CxrdError):
                raise answer
            return answer
        with Image.open(io.BytesIO(body)) as image:
            pixels = np.asarray(image.convert("L"))
        if self.name == "segmentation":
            out = io.BytesIO()
            Image.fromarray(modelserver.segment(pixels)).save(out, format="PNG")
            return out.getvalue()
        return json.dumps(modelserver.classify(pixels)).encode()

    def ping(self) -> str:
        """In service."""
        return f"fake {self.name}"


@dataclass
class RecordingReporter:
    """The template reporter, keeping every request it was given (to look for PHI)."""

    requests: list[ReportRequest] = field(default_factory=list)
    prompt_hash: str = "template_v1"

    def draft(self, request: ReportRequest) -> ReportRecord | None:
        """Record, then draft from the template."""
        self.requests.append(request)
        return TemplateReporter().draft(request)

    def ping(self) -> str:
        """Always ready."""
        return "recording reporter"
