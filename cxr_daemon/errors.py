"""The one exception tree of cxrd (STYLE.md §3).

Every error the core sees is one of four kinds, and the kind alone decides what
happens to the study in hand:

- ``ConfigError``: the daemon cannot work as configured (bad key, credentials
  refused, schema too old). Fatal: ``cxrd`` stops with one line, exit code 2.
- ``TransientError``: it may work in a moment (timeout, 5xx, throttling, DB
  connection lost). The study goes back to ``pending`` with a stored backoff.
- ``PermanentError``: trying again cannot help (invalid UID, undecodable DICOM,
  4xx, oversize request). The study is ``failed`` at once with the message.
- ``SkipStudyError``: nothing to do for this study (not a chest X-ray, or it
  left Orthanc). It is ``skipped`` with the message.

Adapters translate SDK exceptions into these at the boundary; ``str(error)`` is
what lands in the queue row's ``last_error``, so messages are written for the
person reading ``cxrd status``.
"""

from __future__ import annotations


class CxrdError(Exception):
    """Root of every error cxrd raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        study_uid: str | None = None,
        step: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.study_uid = study_uid
        self.step = step
        self.status = status


class ConfigError(CxrdError):
    """Fatal: configuration, credentials or schema make running pointless."""


class TransientError(CxrdError):
    """Retry later: the dependency may answer correctly in a moment."""


class PermanentError(CxrdError):
    """Fail the study now: the same input will fail the same way again."""


class SkipStudyError(CxrdError):
    """Skip the study with a reason: there is nothing to process."""


class NotChestXrayError(SkipStudyError):
    """Skip the study: it is not a chest X-ray per the ``[filter]`` section."""


class StudyGoneError(SkipStudyError):
    """Skip the study: Orthanc no longer holds it (deleted after it was queued)."""


class InvalidDicomError(PermanentError):
    """The DICOM object cannot be turned into a trustworthy image."""


class InvalidUidError(PermanentError):
    """A UID is not digits-and-dots or is longer than 64 characters."""


class UndecodablePixelDataError(InvalidDicomError):
    """The header is sound but no local decoder can decode the pixel data.

    The pipeline then asks Orthanc to render the image (``/rendered``) and
    records that it did; any other ``InvalidDicomError`` fails the study.
    """
