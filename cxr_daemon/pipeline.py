"""What happens to one claimed study: ``Pipeline.process``.

Talks only to ports (STYLE.md §2). Every run is recorded: started before the
first step that does work, closed with its outcome and reason whatever
happens, and the exception (if any) goes on to the worker, which decides the
study's queue state from its kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from cxr_daemon.domain import (
    FilterRule,
    QueuedStudy,
    RunOutcome,
    StudyInfo,
    Trigger,
    chest_xray_series,
    instance_set_hash,
    skip_reason,
)
from cxr_daemon.errors import (
    CxrdError,
    NotChestXrayError,
    PermanentError,
    SkipStudyError,
)
from cxr_daemon.ports import InstanceRecord, Ports, RunResults, RunVersions

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """What a processed study produced, for the log line and ``cxrd reprocess``."""

    study_uid: str
    run_id: str | None
    outcome: RunOutcome
    reason: str = ""
    instances: int = 0


def outcome_of(error: BaseException) -> RunOutcome:
    """The run outcome an exception means: skipped for skip errors, else failed."""
    return RunOutcome.SKIPPED if isinstance(error, SkipStudyError) else RunOutcome.FAILED


class Pipeline:
    """Processes one study through the ports."""

    def __init__(self, ports: Ports, rule: FilterRule, versions: RunVersions) -> None:
        self.ports = ports
        self.rule = rule
        self.versions = versions

    def process(self, queued: QueuedStudy, trigger: Trigger) -> RunSummary:
        """Process ``queued``; return the run's summary.

        Raises:
            SkipStudyError: not a chest X-ray, or gone from Orthanc (run skipped).
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
        run_id = self.ports.store.start_run(study.study_uid, trigger, self.versions)
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            try:
                results = self._run(study, selected, digest)
            except CxrdError as exc:
                self.ports.store.finish_run(run_id, outcome_of(exc), str(exc))
                raise
            except Exception as exc:
                self.ports.store.finish_run(run_id, RunOutcome.FAILED, f"unexpected error: {exc}")
                raise
            self.ports.store.finish_run(run_id, RunOutcome.DONE, results=results)
        return RunSummary(study.study_uid, run_id, RunOutcome.DONE, instances=len(selected))

    def _selected_instances(self, study: StudyInfo) -> list[InstanceRecord]:
        """The study's chest X-ray images, or NotChestXrayError with the reason."""
        reason = skip_reason(study, self.rule)
        if reason:
            raise NotChestXrayError(reason, study_uid=study.study_uid, step="filter")
        series = {s.series_uid for s in chest_xray_series(study, self.rule)}
        selected = [
            InstanceRecord(sop_uid=i.sop_uid, series_uid=i.series_uid)
            for i in study.instances
            if i.series_uid in series
        ]
        if not selected:
            raise NotChestXrayError(
                "chest X-ray series hold no instances", study_uid=study.study_uid, step="filter"
            )
        return selected

    def _run(self, study: StudyInfo, selected: list[InstanceRecord], digest: str) -> RunResults:
        """The steps after selection. Records the instance list."""
        self.ports.gate.reached("record")
        return RunResults(instances=selected, instance_set_hash=digest, patient_id=study.patient_id)
