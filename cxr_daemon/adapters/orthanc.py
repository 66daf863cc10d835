"""The ``Orthanc`` port over Orthanc's REST API (requests, one Session).

Error mapping, in one place (``_raise_for``):

- connection refused/reset, timeouts, HTTP 429 and 5xx -> ``TransientError``
- HTTP 401/403 -> ``ConfigError`` (wrong credentials are not an outage)
- HTTP 404 on a resource -> ``StudyGoneError`` (deleted after it was announced)
- other 4xx, a body that is not the documented JSON -> ``PermanentError``
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import requests

from cxr_daemon.adapters.retry import RetryPolicy
from cxr_daemon.config import OrthancConfig
from cxr_daemon.domain import (
    Change,
    ChangesPage,
    InstanceInfo,
    SeriesInfo,
    StudyInfo,
    StudyRef,
    validate_uid,
)
from cxr_daemon.errors import (
    ConfigError,
    PermanentError,
    StudyGoneError,
    TransientError,
)

T = TypeVar("T")
CHUNK = 1 << 20


class OrthancClient:
    """Read-only client of one Orthanc server."""

    def __init__(
        self,
        cfg: OrthancConfig,
        policy: RetryPolicy,
        session: requests.Session | None = None,
    ) -> None:
        self.base = cfg.url.rstrip("/")
        self.timeout = (min(cfg.timeout_s, 10.0), cfg.timeout_s)
        self.policy = policy
        self.session = session or requests.Session()
        if cfg.username:
            self.session.auth = (cfg.username, cfg.password)
        # Orthanc gzips on the fly when asked; for DICOM files that costs ~25x
        # the transfer time on loopback (FACTS.md), so ask for the raw bytes.
        self.session.headers["Accept-Encoding"] = "identity"

    # -- feed ---------------------------------------------------------------

    def changes(self, since: int, limit: int) -> ChangesPage:
        """One page of ``/changes`` after ``since``."""
        body = self._json("changes", "/changes", params={"since": since, "limit": limit})
        return _page(body)

    def last_change(self) -> int:
        """Orthanc's current ``Last`` sequence number."""
        return _page(self._json("changes", "/changes", params={"last": ""})).last

    # -- studies ------------------------------------------------------------

    def study(self, orthanc_id: str) -> StudyInfo:
        """The study, its series and instances, with validated UIDs."""
        study = self._json("lookup", f"/studies/{orthanc_id}")
        series = self._json("lookup", f"/studies/{orthanc_id}/series")
        instances = self._json("lookup", f"/studies/{orthanc_id}/instances")
        return _study_info(study, series, instances)

    def study_uid(self, orthanc_id: str) -> str:
        """StudyInstanceUID of an Orthanc study id."""
        study = self._json("lookup", f"/studies/{orthanc_id}")
        return validate_uid(_field(study, "MainDicomTags", "StudyInstanceUID"), "StudyInstanceUID")

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc id of a StudyInstanceUID, or None."""
        validate_uid(study_uid, "StudyInstanceUID")
        found = self._json("lookup", "/tools/lookup", data=study_uid)
        if not isinstance(found, list):
            raise PermanentError("Orthanc /tools/lookup did not answer a list", step="lookup")
        for item in found:
            if isinstance(item, dict) and item.get("Type") == "Study":
                return str(item["ID"])
        return None

    def find_studies(
        self, date_from: date, date_to: date, modalities: Sequence[str]
    ) -> list[StudyRef]:
        """``POST /tools/find`` on StudyDate and ModalitiesInStudy; stable studies only.

        Orthanc (1.10 included) matches ``ModalitiesInStudy`` against the
        Modality of each series, a backslash separating the values.
        """
        query: dict[str, str] = {"StudyDate": f"{date_from:%Y%m%d}-{date_to:%Y%m%d}"}
        if modalities:
            query["ModalitiesInStudy"] = "\\".join(modalities)
        body = {"Level": "Study", "Query": query, "Expand": True}
        found = self._json("find", "/tools/find", data=json.dumps(body))
        if not isinstance(found, list):
            raise PermanentError("Orthanc /tools/find did not answer a list", step="find")
        refs = []
        for study in found:
            ref = StudyRef(
                study_uid=_field(study, "MainDicomTags", "StudyInstanceUID"),
                orthanc_id=_field(study, "ID"),
            )
            if study.get("IsStable", True):
                refs.append(ref)
        return refs

    def instance_tags(self, orthanc_id: str) -> Mapping[str, str]:
        """Simplified tags of one instance (only string values are kept)."""
        tags = self._json("lookup", f"/instances/{orthanc_id}/simplified-tags")
        if not isinstance(tags, dict):
            raise PermanentError("Orthanc simplified-tags is not an object", step="lookup")
        return {k: v for k, v in tags.items() if isinstance(v, str)}

    def download_instance(self, orthanc_id: str, dest: Path) -> int:
        """Stream ``/instances/{id}/file`` to ``dest`` in 1 MiB chunks."""

        def fetch() -> int:
            with self._request(
                "GET", f"/instances/{orthanc_id}/file", "download", stream=True
            ) as r:
                size = 0
                with dest.open("wb") as out:
                    for chunk in r.iter_content(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
                return size

        return self.policy.call("download", lambda: _guard("download", fetch))

    def rendered_instance(self, orthanc_id: str) -> bytes:
        """Orthanc's own 8-bit rendering of the instance, PNG."""

        def fetch() -> bytes:
            path = f"/instances/{orthanc_id}/rendered"
            headers = {"Accept": "image/png"}
            with self._request("GET", path, "render", headers=headers) as r:
                return r.content

        return self.policy.call("render", lambda: _guard("render", fetch))

    def ping(self) -> str:
        """``/system``: reachable and credentials accepted."""
        system = self._json("ping", "/system")
        return f"Orthanc {system.get('Version', '?')} at {self.base}"

    def close(self) -> None:
        """Close the HTTP session."""
        self.session.close()

    # -- plumbing -----------------------------------------------------------

    def _json(self, step: str, path: str, **kwargs: Any) -> Any:
        def fetch() -> Any:
            method = "POST" if "data" in kwargs else "GET"
            with self._request(method, path, step, **kwargs) as r:
                try:
                    return r.json()
                except ValueError:
                    raise PermanentError(
                        f"Orthanc answered {path} with something that is not JSON", step=step
                    ) from None

        return self.policy.call(step, lambda: _guard(step, fetch))

    def _request(self, method: str, path: str, step: str, **kwargs: Any) -> requests.Response:
        response = self.session.request(method, self.base + path, timeout=self.timeout, **kwargs)
        if response.status_code >= 400:
            response.close()
            _raise_for(response.status_code, path, step)
        return response


def _guard(step: str, fn: Callable[[], T]) -> T:
    """Run ``fn``, translating requests' exceptions to cxrd errors."""
    try:
        return fn()
    except requests.Timeout:
        raise TransientError(f"Orthanc timed out ({step})", step=step) from None
    except requests.ConnectionError as exc:
        raise TransientError(f"Orthanc unreachable ({step}): {_short(exc)}", step=step) from None
    except requests.RequestException as exc:
        raise TransientError(f"Orthanc request failed ({step}): {_short(exc)}", step=step) from None


def _raise_for(status: int, path: str, step: str) -> None:
    if status in (401, 403):
        raise ConfigError(
            f"Orthanc refused the credentials (HTTP {status}): check orthanc.username/password",
            step=step,
            status=status,
        )
    if status == 404:
        raise StudyGoneError(f"Orthanc no longer has {path} (HTTP 404)", step=step, status=status)
    if status == 429 or status >= 500:
        raise TransientError(f"Orthanc answered HTTP {status} for {path}", step=step, status=status)
    raise PermanentError(f"Orthanc answered HTTP {status} for {path}", step=step, status=status)


def _short(exc: Exception) -> str:
    """The innermost cause ("Connection refused"), not urllib3's wrapping of it."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause).split("(Caused by")[0].strip()
    return text.rsplit(": ", 1)[-1][:200] if ": " in text else text[:200]


def _field(obj: Any, *keys: str) -> str:
    """A nested string field, or PermanentError naming the missing key."""
    value = obj
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise PermanentError(f"Orthanc answer lacks {'.'.join(keys)}", step="lookup")
        value = value[key]
    return str(value)


def _page(body: Any) -> ChangesPage:
    try:
        changes = tuple(
            Change(
                seq=int(c["Seq"]),
                change_type=str(c["ChangeType"]),
                resource_type=str(c.get("ResourceType", "")),
                orthanc_id=str(c.get("ID", "")),
            )
            for c in body["Changes"]
        )
        return ChangesPage(changes=changes, last=int(body["Last"]), done=bool(body["Done"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(
            f"Orthanc /changes answer is malformed ({type(exc).__name__}: {exc})", step="changes"
        ) from None


def _study_info(study: Any, series: Any, instances: Any) -> StudyInfo:
    if not isinstance(series, list) or not isinstance(instances, list):
        raise PermanentError("Orthanc study series/instances are not lists", step="lookup")
    series_uid_of: dict[str, str] = {}
    series_info = []
    for s in series:
        uid = validate_uid(_field(s, "MainDicomTags", "SeriesInstanceUID"), "SeriesInstanceUID")
        series_uid_of[str(s["ID"])] = uid
        tags = s["MainDicomTags"]
        series_info.append(
            SeriesInfo(
                orthanc_id=str(s["ID"]),
                series_uid=uid,
                modality=str(tags.get("Modality", "")),
                body_part=str(tags.get("BodyPartExamined", "")),
                instance_ids=tuple(str(i) for i in s.get("Instances", [])),
            )
        )
    instance_info = tuple(
        InstanceInfo(
            orthanc_id=str(i["ID"]),
            sop_uid=validate_uid(_field(i, "MainDicomTags", "SOPInstanceUID"), "SOPInstanceUID"),
            series_uid=series_uid_of.get(str(i.get("ParentSeries", "")), ""),
        )
        for i in instances
    )
    return StudyInfo(
        orthanc_id=_field(study, "ID"),
        study_uid=validate_uid(
            _field(study, "MainDicomTags", "StudyInstanceUID"), "StudyInstanceUID"
        ),
        patient_id=str(study.get("PatientMainDicomTags", {}).get("PatientID", "")),
        series=tuple(series_info),
        instances=instance_info,
        is_stable=bool(study.get("IsStable", True)),
    )
