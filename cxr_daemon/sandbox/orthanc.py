"""A private, throwaway Orthanc (the real Debian binary) on free loopback ports.

Used by `cxrd demo` and the integration tests. Orthanc 1.10 cannot bind HTTP to loopback
only, so `RemoteAccessAllowed: false` plus authentication keep other hosts out of the REST
API; its DICOM port accepts any calling AET, like a PACS in a lab would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from cxr_daemon.sandbox.processes import Supervised, find_program, free_loopback_ports, tail

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterable

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0
# Orthanc compresses REST answers on the fly unless told not to (~25x slower, FACTS.md).
_IDENTITY = {"Accept-Encoding": "identity"}


class _NotReadyError(Exception):
    """Internal: the condition polled for does not hold yet (tenacity retries on it)."""


class OrthancProcess(Supervised):
    """A private Orthanc: its own config, storage, index and log under `workdir`.

    The HTTP and DICOM ports are chosen once, at construction, and kept across restarts,
    so clients configured with `url` keep working after `restart()`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        stable_age_s: int = 1,
        username: str = "cxrd",
        password: str = "cxrd-test",  # noqa: S107 - a throwaway sandbox account
        dicomweb: bool = True,
    ) -> None:
        super().__init__()
        self._workdir = Path(workdir)
        self._stable_age_s = stable_age_s
        self._auth = (username, password)
        self._dicomweb = dicomweb
        self._http_port, self._dicom_port = free_loopback_ports(2)

    @property
    def url(self) -> str:
        """Base URL of the REST API (loopback)."""
        return f"http://127.0.0.1:{self._http_port}"

    @property
    def http_port(self) -> int:
        """HTTP port, stable across restarts."""
        return self._http_port

    @property
    def dicom_port(self) -> int:
        """DICOM (C-STORE SCP) port, stable across restarts."""
        return self._dicom_port

    @property
    def aet(self) -> str:
        """Orthanc's own AE title (the called AET for C-STORE)."""
        return "ORTHANC"

    @property
    def auth(self) -> tuple[str, str]:
        """(username, password) for HTTP basic authentication."""
        return self._auth

    @property
    def log_path(self) -> Path:
        """Orthanc's stdout/stderr, appended across restarts."""
        return self._workdir / "orthanc.log"

    @property
    def config_path(self) -> Path:
        """The generated configuration file."""
        return self._workdir / "config.json"

    def _config(self) -> dict[str, Any]:
        """Orthanc configuration for this instance."""
        config: dict[str, Any] = {
            "Name": f"cxrd-sandbox-{self._http_port}",
            "HttpPort": self._http_port,
            "DicomPort": self._dicom_port,
            "StorageDirectory": str(self._workdir / "storage"),
            "IndexDirectory": str(self._workdir / "index"),
            "StableAge": self._stable_age_s,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self._auth[0]: self._auth[1]},
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            # Any calling AET may store or echo, as a modality in a lab would.
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "SaveJobs": False,
        }
        if self._dicomweb:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        return config

    def start(self) -> None:
        """Write the configuration, spawn Orthanc and wait until its REST API answers.

        Raises:
            FileNotFoundError: the Orthanc binary (or the DICOMweb plugin) is not installed.
            RuntimeError: Orthanc exited or did not answer within 30 s; the message holds
                the end of Orthanc's log.
        """
        if self.running:
            return
        binary = find_program("Orthanc")
        if self._dicomweb and not DICOMWEB_PLUGIN.is_file():
            raise FileNotFoundError(f"DICOMweb plugin missing ({DICOMWEB_PLUGIN})")
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self._config(), indent=2), encoding="utf-8")
        with self.log_path.open("ab") as log:
            proc = self._spawn([binary, str(self.config_path)], log, self._workdir)
        try:
            self._wait_ready(proc)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Poll `GET /system` until it answers 200, Orthanc exits, or the timeout passes."""
        session = requests.Session()
        session.auth = self._auth
        session.headers.update(_IDENTITY)

        def probe() -> None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {proc.returncode} at start:\n{tail(self.log_path)}"
                )
            try:
                answer = session.get(f"{self.url}/system", timeout=2)
            except requests.RequestException as exc:
                raise _NotReadyError(str(exc)) from exc
            if answer.status_code != 200:
                raise _NotReadyError(f"GET /system: HTTP {answer.status_code}")

        retrying = Retrying(
            stop=stop_after_delay(START_TIMEOUT_S),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            retry=retry_if_exception_type(_NotReadyError),
        )
        try:
            with session:
                retrying(probe)
        except RetryError as exc:
            raise RuntimeError(
                f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s "
                f"({exc.last_attempt.exception()}):\n"
                f"{tail(self.log_path)}"
            ) from exc


def _stable_ids(session: requests.Session, url: str, uids: Iterable[str]) -> dict[str, str]:
    """Map each StudyInstanceUID to its Orthanc ID once all are known and stable."""
    found: dict[str, str] = {}
    for uid in uids:
        answer = session.post(f"{url}/tools/lookup", data=uid, timeout=10)
        answer.raise_for_status()
        studies = [hit["ID"] for hit in answer.json() if hit.get("Type") == "Study"]
        if not studies:
            raise _NotReadyError(f"study {uid} not in Orthanc yet")
        study = session.get(f"{url}/studies/{studies[0]}", timeout=10)
        study.raise_for_status()
        if not study.json().get("IsStable", False):
            raise _NotReadyError(f"study {uid} not stable yet")
        found[uid] = studies[0]
    return found


def wait_until_stable(
    url: str, auth: tuple[str, str], study_instance_uids: Iterable[str], timeout_s: float = 60
) -> dict[str, str]:
    """Wait until every study exists in Orthanc and `/studies/{id}` reports `IsStable`.

    Returns {StudyInstanceUID: Orthanc study ID}.

    Raises:
        TimeoutError: some study is missing or not stable after `timeout_s`.
        requests.HTTPError: Orthanc answered an error (e.g. 401 for wrong credentials).
        requests.ConnectionError: Orthanc is not reachable.
    """
    uids = list(study_instance_uids)
    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_exponential(multiplier=0.05, max=0.5),
        retry=retry_if_exception_type(_NotReadyError),
    )
    with requests.Session() as session:
        session.auth = auth
        session.headers.update(_IDENTITY)
        try:
            return retrying(_stable_ids, session, url.rstrip("/"), uids)
        except RetryError as exc:
            raise TimeoutError(f"after {timeout_s} s: {exc.last_attempt.exception()}") from exc
