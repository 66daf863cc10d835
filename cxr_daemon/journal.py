"""The record of one run: each step with start, end and outcome, for the run's log file.

``metadata/log_<UTC>.json`` is built from it; step durations also go to the
structured log, so a slow step is visible in journald and in S3 alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from cxr_daemon.domain import utcnow

log = structlog.get_logger(__name__)


@dataclass
class RunJournal:
    """Steps and errors of one run, in order."""

    run_id: str
    study_uid: str
    trigger: str
    started: datetime = field(default_factory=utcnow)
    steps: list[dict[str, Any]] = field(default_factory=list)
    on_step: Callable[[str, float], None] = lambda _step, _seconds: None

    @contextmanager
    def step(self, name: str, sop_uid: str = "") -> Iterator[None]:
        """Time a step; record its outcome and error (the error is re-raised)."""
        entry: dict[str, Any] = {"step": name, "start": utcnow().isoformat()}
        if sop_uid:
            entry["sop_uid"] = sop_uid
        began = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            entry.update(outcome="error", error=f"{type(exc).__name__}: {exc}")
            raise
        else:
            entry["outcome"] = "ok"
        finally:
            entry["end"] = utcnow().isoformat()
            entry["duration_s"] = round(time.perf_counter() - began, 4)
            self.steps.append(entry)
            self.on_step(name, entry["duration_s"])
            log.debug("step_finished", **{k: v for k, v in entry.items() if k != "start"})

    def durations(self) -> dict[str, float]:
        """Total seconds per step name."""
        totals: dict[str, float] = {}
        for entry in self.steps:
            totals[entry["step"]] = totals.get(entry["step"], 0.0) + entry["duration_s"]
        return {k: round(v, 4) for k, v in totals.items()}

    def document(self, outcome: str, versions: dict[str, str], error: str = "") -> dict[str, Any]:
        """The JSON document of ``metadata/log_<UTC>.json``."""
        return {
            "run_id": self.run_id,
            "study_uid": self.study_uid,
            "trigger": self.trigger,
            "started_at": self.started.isoformat(),
            "finished_at": utcnow().isoformat(),
            "outcome": outcome,
            "versions": versions,
            "steps": self.steps,
            "durations_s": self.durations(),
            "errors": [error] if error else [],
        }
