"""structlog set-up: JSON lines for journald, or a console renderer on a terminal.

The standard library's loggers (urllib3, botocore, ...) go through the same
processor chain via ``ProcessorFormatter``, so every line has one shape.
Logs go to stderr: stdout belongs to command output (``cxrd status --json``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Keys that may carry PHI. Values under them never reach a log line: the
# pipeline should not bind them at all, and this is the net under that rule.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "birth_date",
        "accession",
        "accession_number",
        "accessionnumber",
        "other_patient_ids",
    }
)


# structlog caches a logger's processor chain on first use (faster in the
# daemon). Tests turn this off so that capture_logs sees every logger.
cache_loggers = True


def drop_phi(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the value of any PHI-named key with a marker."""
    for key in list(event_dict):
        if key.lower().replace("-", "_") in PHI_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger.

    ``fmt`` is "json", "console", or "auto" (console on a terminal, else JSON).
    """
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    tail: list[Any] = [] if console else [structlog.processors.dict_tracebacks]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=cache_loggers,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries stay at WARNING unless cxrd itself is at DEBUG.
    quiet = logging.DEBUG if level == "debug" else logging.WARNING
    for name in ("urllib3", "botocore", "boto3", "s3transfer"):
        logging.getLogger(name).setLevel(quiet)
