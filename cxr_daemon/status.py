"""What ``cxrd status`` reports, as plain data (DESIGN "Commands")."""

from __future__ import annotations

from typing import Any

from cxr_daemon.domain import utcnow
from cxr_daemon.errors import ConfigError, CxrdError
from cxr_daemon.ports import Orthanc, Store

FAILURES_SHOWN = 10


def summary(store: Store, orthanc: Orthanc) -> dict[str, Any]:
    """Checkpoint, Orthanc's last change, lag, counts by state, oldest wait, recent failures.

    Orthanc being unreachable is reported in the data (``orthanc_error``),
    not raised: status is what an operator runs when something is down.
    """
    checkpoint = store.checkpoint()
    data: dict[str, Any] = {"checkpoint": checkpoint, "orthanc_last": None, "lag": None}
    try:
        data["orthanc_last"] = orthanc.last_change()
    except ConfigError:
        raise
    except CxrdError as exc:
        data["orthanc_error"] = str(exc)
    if data["orthanc_last"] is not None and checkpoint is not None:
        data["lag"] = max(data["orthanc_last"] - checkpoint, 0)
    data["counts"] = store.counts()
    oldest = store.oldest_waiting()
    # Seen (NewStudy) but not yet stable: large values mean StableStudy changes are lost.
    data["oldest_waiting_s"] = (
        round(max((utcnow() - oldest).total_seconds(), 0.0), 1) if oldest else None
    )
    data["failures"] = [
        {"study_uid": f.study_uid, "attempts": f.attempts, "reason": f.reason}
        for f in store.failures(FAILURES_SHOWN)
    ]
    return data


def study_status(store: Store, study_uid: str) -> dict[str, Any] | None:
    """One study's state and runs, or None when cxrd has never seen it."""
    row = store.study_row(study_uid)
    if row is None:
        return None
    return {
        "study_uid": row.study_uid,
        "state": row.state.value,
        "attempts": row.attempts,
        "reason": row.reason,
        "runs": [
            {
                "run_id": r.run_id,
                "trigger": r.trigger,
                "outcome": r.outcome,
                "reason": r.reason,
                "started_at": r.started_at.isoformat(),
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            }
            for r in store.runs(study_uid)
        ],
    }
