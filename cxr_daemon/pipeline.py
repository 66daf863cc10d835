"""What happens to one claimed study: ``Pipeline.process``.

lookup -> select the chest X-ray images -> per image: download (to a temporary
file), render to 8-bit (Orthanc's ``/rendered`` when no local decoder can),
archive JPEG + DICOM, then segment and classify at once -> result.json ->
report -> run log. Images go to the models one after the other; the next
image is prepared (downloaded, rendered, archived) while the models look at
the current one, so a study waits for its model calls plus one preparation.

Talks to the world only through ports (STYLE.md §2); ``imaging``, ``encoding``
and ``modelio`` are pure computation. Every run is recorded: started before
the first step that writes, closed with its outcome and reason whatever
happens, with its ``metadata/log_<UTC>.json`` written (best effort on
failure). The exception, if any, goes on to the worker, which sets the queue
state by kind.
"""

from __future__ import annotations

import contextvars
import io
import json
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import structlog
from PIL import Image

from cxr_daemon import encoding, imaging, modelio
from cxr_daemon.domain import (
    FilterRule,
    InstanceInfo,
    QueuedStudy,
    RunOutcome,
    StudyInfo,
    StudyLayout,
    Trigger,
    chest_xray_series,
    instance_set_hash,
    skip_reason,
)
from cxr_daemon.errors import (
    CxrdError,
    InvalidDicomError,
    NotChestXrayError,
    PermanentError,
    SkipStudyError,
    TransientError,
    UndecodablePixelDataError,
)
from cxr_daemon.journal import RunJournal
from cxr_daemon.ports import (
    FindingRecord,
    InstanceRecord,
    Ports,
    ReportRecord,
    ReportRequest,
    RunResults,
    RunVersions,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")
JSON = "application/json"
REPORT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RunSummary:
    """What a processed study produced, for the log line and ``cxrd reprocess``."""

    study_uid: str
    run_id: str | None
    outcome: RunOutcome
    reason: str = ""
    instances: int = 0
    findings: tuple[FindingRecord, ...] = ()
    s3_prefix: str = ""
    report_first_line: str = ""


@dataclass
class ImageResult:
    """One processed image."""

    record: InstanceRecord
    model: str
    findings: list[FindingRecord] = field(default_factory=list)


@dataclass(frozen=True)
class _Prepared:
    """One image ready for the models: the model input and how it was made."""

    png: bytes
    size: tuple[int, int]
    rendering: str
    view: str


@dataclass(frozen=True)
class _RunContext:
    """What the steps of one run share.

    The S3 layout, the journal, the objects' metadata, the temporary folder,
    and the run's helper threads.

    At most two helpers are busy at once: the next image's preparation and
    this image's classification.
    """

    layout: StudyLayout
    journal: RunJournal
    meta: dict[str, str]
    folder: Path
    helpers: ThreadPoolExecutor

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn(*args)`` on a helper, in a copy of this context.

        The copied context keeps the study's log context (study_uid, run_id)
        on the helper's log lines.
        """
        return self.helpers.submit(contextvars.copy_context().run, fn, *args)


def outcome_of(error: BaseException) -> RunOutcome:
    """The run outcome an exception means: skipped for skip errors, else failed."""
    return RunOutcome.SKIPPED if isinstance(error, SkipStudyError) else RunOutcome.FAILED


class Pipeline:
    """Processes one study through the ports."""

    def __init__(
        self,
        ports: Ports,
        rule: FilterRule,
        versions: RunVersions,
        max_side: int = 1024,
        render_slots: int = 1,
    ) -> None:
        self.ports = ports
        self.rule = rule
        self.versions = versions
        self.max_side = max_side
        # Full-size images decoded at once across all studies in flight. The
        # decoders release the GIL, so one slot per core keeps every core busy;
        # more would only add decoded images to peak memory.
        self.render_slots = threading.BoundedSemaphore(render_slots)

    def process(self, queued: QueuedStudy, trigger: Trigger) -> RunSummary:
        """Process ``queued``; return the run's summary.

        Raises:
            SkipStudyError: not a chest X-ray, or gone from Orthanc.
            PermanentError, TransientError, ConfigError: the run failed.
        """
        self.ports.gate.reached("lookup")
        study = self.ports.orthanc.study(queued.orthanc_id)
        if study.study_uid != queued.study_uid:
            raise PermanentError(
                f"Orthanc study {queued.orthanc_id} now holds StudyInstanceUID "
                f"{study.study_uid}, not {queued.study_uid}",
                step="lookup",
            )
        selected = self._selected_instances(study)
        digest = instance_set_hash([i.sop_uid for i in selected])
        if trigger is Trigger.FEED and self.ports.store.last_done_hash(study.study_uid) == digest:
            log.info("study_unchanged", instances=len(selected))
            return RunSummary(study.study_uid, None, RunOutcome.DONE, "unchanged since last run")
        layout = StudyLayout(study.study_uid)
        run_id = self.ports.store.start_run(study.study_uid, trigger, self.versions)
        journal = RunJournal(
            run_id, study.study_uid, trigger.value, on_step=self.ports.metrics.step_observed
        )
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            try:
                results = self._run(study, selected, layout, journal, digest)
            except Exception as exc:
                self._record_failure(layout, journal, exc)
                raise
            self.ports.store.finish_run(run_id, RunOutcome.DONE, results=results)
        log.info("run_steps", durations_s=journal.durations(), instances=len(selected))
        return self._summary(study, run_id, layout, results)

    def _selected_instances(self, study: StudyInfo) -> list[InstanceInfo]:
        """The study's chest X-ray images, or NotChestXrayError with the reason."""
        reason = skip_reason(study, self.rule)
        if reason:
            raise NotChestXrayError(reason, study_uid=study.study_uid, step="filter")
        series = {s.series_uid for s in chest_xray_series(study, self.rule)}
        selected = [i for i in study.instances if i.series_uid in series]
        if not selected:
            raise NotChestXrayError(
                "chest X-ray series hold no instances", study_uid=study.study_uid, step="filter"
            )
        return selected

    def _run(
        self,
        study: StudyInfo,
        selected: list[InstanceInfo],
        layout: StudyLayout,
        journal: RunJournal,
        digest: str,
    ) -> RunResults:
        meta = {"run-id": journal.run_id, "code-version": self.versions.code}
        # The helpers stop (waiting for what they run) before the folder goes.
        with (
            tempfile.TemporaryDirectory(prefix="cxrd-") as tmp,
            ThreadPoolExecutor(2, thread_name_prefix="study") as helpers,
        ):
            images = self._images(selected, _RunContext(layout, journal, meta, Path(tmp), helpers))
        findings = [f for image in images for f in image.findings]
        model = self._write_result(images, layout, journal, meta)
        report = self._report(images, findings, layout, journal, meta)
        models = f"segmentation={self.ports.segmentation.name}; classification={model}"
        self.ports.gate.reached("record")
        log_key = self._write_log(layout, journal, RunOutcome.DONE, models=models)
        return RunResults(
            instances=[image.record for image in images],
            findings=findings,
            report=report,
            instance_set_hash=digest,
            log_key=log_key,
            patient_id=study.patient_id,
            models=models,
        )

    # -- images ---------------------------------------------------------

    def _images(self, selected: list[InstanceInfo], run: _RunContext) -> list[ImageResult]:
        """Each image through the models in turn.

        The next image is downloaded, rendered and archived while the models
        look at this one.
        """
        results: list[ImageResult] = []
        upcoming = run.submit(self._prepare, selected[0], run)
        for index, inst in enumerate(selected):
            prepared = upcoming.result()
            if index + 1 < len(selected):
                upcoming = run.submit(self._prepare, selected[index + 1], run)
            results.append(self._analyse(inst, prepared, run))
        return results

    def _prepare(self, inst: InstanceInfo, run: _RunContext) -> _Prepared:
        """Download, render, encode and archive one image: all that precedes the models."""
        sop, journal, layout = inst.sop_uid, run.journal, run.layout
        dicom_path = run.folder / f"{sop}.dcm"
        with journal.step("download", sop):
            self.ports.orthanc.download_instance(inst.orthanc_id, dicom_path)
        with journal.step("render", sop), self.render_slots:
            pixels, rendering, view = self._render(inst, dicom_path)
            jpg = encoding.encode_jpeg(pixels)
            png, size = encoding.model_input_png(pixels, self.max_side)
            del pixels  # the full-size image is not needed past this point
        with journal.step("archive", sop):
            self.ports.objects.put(layout.jpg(sop), jpg, "image/jpeg", run.meta)
            self.ports.objects.put(layout.dcm(sop), dicom_path, "application/dicom", run.meta)
        dicom_path.unlink()
        return _Prepared(png, size, rendering, view)

    def _analyse(self, inst: InstanceInfo, prepared: _Prepared, run: _RunContext) -> ImageResult:
        """Both models on one prepared image, and the mask archived."""
        sop, png, size, layout = inst.sop_uid, prepared.png, prepared.size, run.layout
        # Both models take the same input: ask them at once, so a study waits
        # for the slower of the two calls rather than their sum.
        classified = run.submit(self._classify, png, size, sop, run.journal)
        with run.journal.step("segment", sop):
            mask = self.ports.segmentation.invoke(png, "image/png", "image/png")
            modelio.check_mask(mask, size)
            self.ports.objects.put(layout.mask(sop), mask, "image/png", run.meta)
        model, findings = classified.result()
        record = InstanceRecord(
            sop, inst.series_uid, prepared.view, prepared.rendering, size[0], size[1],
            layout.jpg(sop), layout.dcm(sop), layout.mask(sop),
        )  # fmt: skip
        return ImageResult(record, model, findings)

    def _classify(
        self, png: bytes, size: tuple[int, int], sop: str, journal: RunJournal
    ) -> tuple[str, list[FindingRecord]]:
        with journal.step("classify", sop):
            answer = self.ports.classification.invoke(png, "image/png", JSON)
            return modelio.parse_classification(answer, size, sop)

    def _render(self, inst: InstanceInfo, path: Path) -> tuple[np.ndarray, str, str]:
        """8-bit pixels, how they were made ("pydicom" | "orthanc"), and the view."""
        ds = imaging.read_dicom(path)
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        try:
            return imaging.render_8bit(ds).pixels, "pydicom", view
        except UndecodablePixelDataError as exc:
            log.warning("render_fallback_orthanc", sop_uid=inst.sop_uid, reason=str(exc))
            local_error = str(exc)
        try:
            png = self.ports.orthanc.rendered_instance(inst.orthanc_id)
            with Image.open(io.BytesIO(png)) as rendered:
                return np.asarray(rendered.convert("L")), "orthanc", view
        except (TransientError, PermanentError, OSError) as exc:
            raise InvalidDicomError(
                f"{local_error}; Orthanc could not render it either: {exc}", step="render"
            ) from None

    # -- study-level outputs ---------------------------------------------

    def _write_result(
        self, images: list[ImageResult], layout: StudyLayout, journal: RunJournal,
        meta: dict[str, str],
    ) -> str:  # fmt: skip
        model = ", ".join(sorted({image.model for image in images}))
        document = {
            "study_uid": layout.study_uid,
            "run_id": journal.run_id,
            "model": model,
            "instances": [
                {
                    "sop_uid": image.record.sop_uid,
                    "view": image.record.view,
                    "input_size": [image.record.width, image.record.height],
                    "findings": [
                        {"label": f.label, "probability": f.probability,
                         "bbox": list(f.bbox) if f.bbox else None}
                        for f in image.findings
                    ],
                }
                for image in images
            ],
        }  # fmt: skip
        with journal.step("result"):
            self.ports.objects.put(layout.result, _json(document), JSON, meta)
        return model

    def _report(
        self, images: list[ImageResult], findings: list[FindingRecord], layout: StudyLayout,
        journal: RunJournal, meta: dict[str, str],
    ) -> ReportRecord | None:  # fmt: skip
        views = sorted({i.record.view for i in images if i.record.view})
        request = ReportRequest(
            view=", ".join(views) or "unknown",
            image_count=len(images),
            findings=modelio.strongest(findings),
        )
        with journal.step("report"):
            report = self.ports.reporter.draft(request)
            if report is not None:
                document = {
                    "run_id": journal.run_id,
                    "text": report.text,
                    "model_id": report.model_id,
                    "input_tokens": report.input_tokens,
                    "output_tokens": report.output_tokens,
                    "stop_reason": report.stop_reason,
                    "prompt_hash": report.prompt_hash,
                }
                self.ports.objects.put(layout.report, _json(document), JSON, meta)
        return report

    def _write_log(
        self, layout: StudyLayout, journal: RunJournal, outcome: RunOutcome,
        error: str = "", models: str = "",
    ) -> str:  # fmt: skip
        versions = {"code": self.versions.code, "models": models or self.versions.models,
                    "prompt_hash": self.versions.prompt_hash}  # fmt: skip
        key = layout.log(journal.started)
        meta = {"run-id": journal.run_id, "code-version": self.versions.code}
        document = journal.document(outcome.value, versions, error)
        self.ports.objects.put(key, _json(document), JSON, meta)
        return key

    def _record_failure(self, layout: StudyLayout, journal: RunJournal, exc: Exception) -> None:
        """Close the run as failed/skipped; write its log if S3 lets us."""
        outcome = outcome_of(exc)
        reason = str(exc) if isinstance(exc, CxrdError) else f"unexpected error: {exc!r}"
        log_key = ""
        try:
            log_key = self._write_log(layout, journal, outcome, reason)
        except CxrdError as log_error:
            log.warning("run_log_not_written", error=str(log_error))
        self.ports.store.finish_run(
            journal.run_id, outcome, reason, RunResults(log_key=log_key) if log_key else None
        )

    def _summary(
        self, study: StudyInfo, run_id: str, layout: StudyLayout, results: RunResults
    ) -> RunSummary:
        notable = tuple(f for f in results.findings if f.probability >= REPORT_THRESHOLD)
        first_line = results.report.text.strip().splitlines()[0] if results.report else ""
        return RunSummary(
            study.study_uid, run_id, RunOutcome.DONE, instances=len(results.instances),
            findings=notable, s3_prefix=self.ports.objects.uri(layout.root + "/"),
            report_first_line=first_line,
        )  # fmt: skip


def _json(document: object) -> bytes:
    return json.dumps(document, indent=2, sort_keys=False).encode()
