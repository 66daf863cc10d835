"""``cxrd reprocess``: one study, now, as a new run, whatever its queue state."""

from __future__ import annotations

from cxr_daemon.bootstrap import App
from cxr_daemon.domain import StudyRef, Trigger, validate_uid
from cxr_daemon.errors import PermanentError
from cxr_daemon.worker import Processed


def reprocess_study(app: App, study_uid: str) -> Processed:
    """Claim the study (queuing it if cxrd never saw it) and run the pipeline on it.

    Raises:
        InvalidUidError: ``study_uid`` is not a DICOM UID.
        PermanentError: Orthanc does not hold the study.
        ConfigError: schema too old, credentials refused.
    """
    validate_uid(study_uid, "StudyInstanceUID")
    app.store.require_current_schema()
    orthanc_id = app.orthanc.find_study(study_uid)
    if orthanc_id is None:
        raise PermanentError(f"Orthanc has no study {study_uid}")
    queued = app.store.claim_study(StudyRef(study_uid, orthanc_id))
    return app.worker.process(queued, Trigger.REPROCESS)
