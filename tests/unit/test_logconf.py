"""Logging: JSON lines with UTC timestamps, stdlib routed, PHI keys redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from cxr_daemon import logconf


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logconf.configure("json", "info", stream=out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_has_utc_timestamp_level_event_and_bound_context(stream: io.StringIO) -> None:
    """A structlog call becomes one JSON object with timestamp, level, event and context."""
    log = structlog.get_logger("cxr_daemon.test")
    with structlog.contextvars.bound_contextvars(study_uid="1.2.3", run_id="abc"):
        log.info("study_finished", state="done")
    (entry,) = lines(stream)
    assert entry["event"] == "study_finished"
    assert entry["level"] == "info"
    assert entry["study_uid"] == "1.2.3"
    assert entry["run_id"] == "abc"
    assert str(entry["timestamp"]).endswith("Z")


def test_stdlib_loggers_go_through_the_same_chain(stream: io.StringIO) -> None:
    """A warning from a library logger (botocore) is a JSON line of the same shape."""
    logging.getLogger("botocore.hooks").warning("retry budget %s", "exhausted")
    (entry,) = lines(stream)
    assert entry["event"] == "retry budget exhausted"
    assert entry["level"] == "warning"
    assert "timestamp" in entry


def test_library_debug_noise_is_filtered(stream: io.StringIO) -> None:
    """urllib3's info chatter does not reach the log at level info."""
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTP connection")
    assert stream.getvalue() == ""


def test_phi_keys_are_redacted(stream: io.StringIO) -> None:
    """Values under patient_id/patient_name/birth_date/accession never reach the output."""
    structlog.get_logger("x").info(
        "oops",
        patient_id="PID-123",
        PatientName="Doe^Jane",
        birth_date="19700101",
        accession_number="ACC9",
    )
    text = stream.getvalue()
    for secret in ("PID-123", "Doe^Jane", "19700101", "ACC9"):
        assert secret not in text
    assert json.loads(text)["patient_id"] == "[redacted]"


def test_exceptions_are_structured(stream: io.StringIO) -> None:
    """log.exception renders the traceback as a structured field, still one line."""
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        structlog.get_logger("x").exception("study_crashed")
    (entry,) = lines(stream)
    assert entry["exception"][0]["exc_type"] == "ZeroDivisionError"  # type: ignore[index]
