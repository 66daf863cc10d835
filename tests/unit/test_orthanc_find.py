"""Orthanc adapter, /tools/find (responses): the query sent, the answer read, error mapping."""

from __future__ import annotations

import json
from datetime import date

import pytest
import responses

from cxr_daemon.adapters.orthanc import OrthancClient
from cxr_daemon.adapters.retry import RetryPolicy
from cxr_daemon.config import OrthancConfig
from cxr_daemon.domain import StudyRef
from cxr_daemon.errors import ConfigError, PermanentError, TransientError

URL = "http://orthanc.test:8042"
JAN1, JAN31 = date(2026, 1, 1), date(2026, 1, 31)


@pytest.fixture
def client() -> OrthancClient:
    cfg = OrthancConfig(url=URL, username="cxrd", password="pw", timeout_s=5)
    return OrthancClient(cfg, RetryPolicy(attempts=3, initial_s=0.001, max_wait_s=0.002))


def study(orthanc_id: str, uid: str, *, stable: bool = True) -> dict[str, object]:
    return {
        "ID": orthanc_id,
        "IsStable": stable,
        "Type": "Study",
        "MainDicomTags": {"StudyInstanceUID": uid, "StudyDate": "20260105"},
        "Series": ["x"],
    }


@responses.activate
def test_find_posts_study_date_range_and_modalities_and_reads_refs(client: OrthancClient) -> None:
    """Level Study, a StudyDate range, ModalitiesInStudy CR\\DX, Expand; refs come back."""
    responses.post(f"{URL}/tools/find", json=[study("a", "1.2.3"), study("b", "1.2.4")])
    refs = client.find_studies(JAN1, JAN31, ("CR", "DX"))
    assert refs == [StudyRef("1.2.3", "a"), StudyRef("1.2.4", "b")]
    sent = json.loads(responses.calls[0].request.body)
    assert sent == {
        "Level": "Study",
        "Query": {"StudyDate": "20260101-20260131", "ModalitiesInStudy": "CR\\DX"},
        "Expand": True,
    }
    assert responses.calls[0].request.headers["Authorization"].startswith("Basic ")


@responses.activate
def test_find_leaves_out_studies_still_being_received(client: OrthancClient) -> None:
    """A study with IsStable false is not returned: the feed announces it when stable."""
    responses.post(
        f"{URL}/tools/find", json=[study("a", "1.2.3", stable=False), study("b", "1.2.4")]
    )
    assert client.find_studies(JAN1, JAN1, ("DX",)) == [StudyRef("1.2.4", "b")]
    sent = json.loads(responses.calls[0].request.body)
    assert sent["Query"] == {"StudyDate": "20260101-20260101", "ModalitiesInStudy": "DX"}


@responses.activate
def test_find_without_modalities_sends_no_modality_constraint(client: OrthancClient) -> None:
    """An empty modality list means any modality: no ModalitiesInStudy key is sent."""
    responses.post(f"{URL}/tools/find", json=[])
    assert client.find_studies(JAN1, JAN31, ()) == []
    assert "ModalitiesInStudy" not in json.loads(responses.calls[0].request.body)["Query"]


@responses.activate
@pytest.mark.parametrize(
    "answer",
    [{"not": "a list"}, [{"ID": "a", "IsStable": True}], ["a"]],
    ids=["object", "no-main-dicom-tags", "ids-not-expanded"],
)
def test_find_malformed_answer_is_permanent(client: OrthancClient, answer: object) -> None:
    """An answer that is not a list of expanded studies raises PermanentError."""
    responses.post(f"{URL}/tools/find", json=answer)
    with pytest.raises(PermanentError):
        client.find_studies(JAN1, JAN31, ("CR", "DX"))


@responses.activate
@pytest.mark.parametrize(
    ("status", "error"),
    [(401, ConfigError), (403, ConfigError), (400, PermanentError), (503, TransientError)],
)
def test_find_http_errors_are_mapped(
    client: OrthancClient, status: int, error: type[Exception]
) -> None:
    """401/403 -> ConfigError, other 4xx -> PermanentError, 5xx -> TransientError (retried)."""
    responses.post(f"{URL}/tools/find", status=status)
    with pytest.raises(error):
        client.find_studies(JAN1, JAN31, ("CR", "DX"))
    assert len(responses.calls) == (3 if status == 503 else 1)
