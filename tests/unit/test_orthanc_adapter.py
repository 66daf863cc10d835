"""Orthanc adapter over HTTP (responses): parsing, auth, streaming, error mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import responses

from cxr_daemon.adapters.orthanc import OrthancClient
from cxr_daemon.adapters.retry import RetryPolicy
from cxr_daemon.config import OrthancConfig
from cxr_daemon.errors import (
    ConfigError,
    InvalidUidError,
    PermanentError,
    StudyGoneError,
    TransientError,
)

URL = "http://orthanc.test:8042"


@pytest.fixture
def client() -> OrthancClient:
    cfg = OrthancConfig(url=URL, username="cxrd", password="pw", timeout_s=5)
    return OrthancClient(cfg, RetryPolicy(attempts=3, initial_s=0.001, max_wait_s=0.002))


@responses.activate
def test_changes_page_is_parsed_with_auth_and_params(client: OrthancClient) -> None:
    """/changes is asked with since/limit and basic auth; Last and Done drive paging."""
    responses.get(
        f"{URL}/changes",
        match=[responses.matchers.query_param_matcher({"since": "5", "limit": "2"})],
        json={
            "Changes": [
                {"Seq": 6, "ChangeType": "NewStudy", "ResourceType": "Study", "ID": "a"},
                {"Seq": 7, "ChangeType": "StableStudy", "ResourceType": "Study", "ID": "a"},
            ],
            "Done": False,
            "Last": 7,
        },
    )
    page = client.changes(5, 2)
    assert [c.seq for c in page.changes] == [6, 7]
    assert (page.last, page.done) == (7, False)
    assert responses.calls[0].request.headers["Authorization"].startswith("Basic ")
    assert responses.calls[0].request.headers["Accept-Encoding"] == "identity"


@responses.activate
def test_study_lookup_builds_series_and_instances(client: OrthancClient) -> None:
    """A study's series (modality, body part) and instances (SOP UID, series) are read."""
    responses.get(
        f"{URL}/studies/s1",
        json={
            "ID": "s1",
            "IsStable": True,
            "MainDicomTags": {"StudyInstanceUID": "1.2.3"},
            "PatientMainDicomTags": {"PatientID": "P1"},
        },
    )
    responses.get(
        f"{URL}/studies/s1/series",
        json=[
            {
                "ID": "se1",
                "MainDicomTags": {
                    "SeriesInstanceUID": "1.2.3.1",
                    "Modality": "DX",
                    "BodyPartExamined": "CHEST",
                },
                "Instances": ["i1"],
            }
        ],
    )
    responses.get(
        f"{URL}/studies/s1/instances",
        json=[
            {"ID": "i1", "ParentSeries": "se1", "MainDicomTags": {"SOPInstanceUID": "1.2.3.1.1"}}
        ],
    )
    study = client.study("s1")
    assert study.study_uid == "1.2.3"
    assert study.patient_id == "P1"
    assert study.series[0].modality == "DX"
    assert study.instances[0].series_uid == "1.2.3.1"


@responses.activate
def test_download_streams_the_file_to_disk(client: OrthancClient, tmp_path: Path) -> None:
    """The DICOM file is written to the destination and its size returned."""
    body = b"\0" * 128 + b"DICM" + b"x" * 5_000_000
    responses.get(f"{URL}/instances/i1/file", body=body)
    dest = tmp_path / "i1.dcm"
    assert client.download_instance("i1", dest) == len(body)
    assert dest.read_bytes() == body


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, ConfigError),
        (403, ConfigError),
        (404, StudyGoneError),
        (400, PermanentError),
        (500, TransientError),
        (503, TransientError),
        (429, TransientError),
    ],
)
@responses.activate
def test_http_status_mapping(client: OrthancClient, status: int, error: type[Exception]) -> None:
    """Each HTTP status maps to its error kind."""
    responses.get(f"{URL}/studies/s1", status=status)
    with pytest.raises(error):
        client.study_uid("s1")


@responses.activate
def test_transient_errors_are_retried_three_times_then_raised(client: OrthancClient) -> None:
    """A persistent 503 is tried exactly three times (one retry layer)."""
    responses.get(f"{URL}/changes", status=503)
    with pytest.raises(TransientError):
        client.changes(0, 10)
    assert len(responses.calls) == 3


@responses.activate
def test_transient_then_success_recovers(client: OrthancClient) -> None:
    """A 502 followed by a good answer is retried and succeeds."""
    responses.get(f"{URL}/changes", status=502)
    responses.get(f"{URL}/changes", json={"Changes": [], "Done": True, "Last": 3})
    assert client.changes(0, 10).last == 3


@responses.activate
def test_connection_refused_is_transient(client: OrthancClient) -> None:
    """An unreachable Orthanc is a transient error naming the step."""
    responses.get(f"{URL}/changes", body=requests.ConnectionError("refused"))
    with pytest.raises(TransientError, match="unreachable"):
        client.changes(0, 10)


@responses.activate
def test_malformed_json_is_rejected_with_a_reason(client: OrthancClient) -> None:
    """A body that is not JSON, or JSON without Last, is a permanent error saying so."""
    responses.get(f"{URL}/changes", body="<html>proxy error</html>")
    with pytest.raises(PermanentError, match="not JSON"):
        client.changes(0, 10)
    responses.replace(responses.GET, f"{URL}/changes", json={"Changes": []})
    with pytest.raises(PermanentError, match="malformed"):
        client.changes(0, 10)


@responses.activate
def test_invalid_study_uid_from_orthanc_is_rejected(client: OrthancClient) -> None:
    """A StudyInstanceUID with path characters is refused before it can become a key."""
    responses.get(
        f"{URL}/studies/s1", json={"ID": "s1", "MainDicomTags": {"StudyInstanceUID": "1.2/../3"}}
    )
    with pytest.raises(InvalidUidError):
        client.study_uid("s1")


@responses.activate
def test_find_study_uses_tools_lookup(client: OrthancClient) -> None:
    """/tools/lookup resolves a StudyInstanceUID to Orthanc's id, or None."""
    responses.post(f"{URL}/tools/lookup", json=[{"ID": "s9", "Type": "Study", "Path": "/x"}])
    assert client.find_study("1.2.3") == "s9"
    responses.replace(responses.POST, f"{URL}/tools/lookup", json=[])
    assert client.find_study("1.2.3") is None
