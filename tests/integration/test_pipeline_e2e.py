"""The whole pipeline on real servers: every shared real CXR through Orthanc, S3, models, DB."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import requests
from PIL import Image

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyLayout, StudyState
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom
from tests.support.converse import FakeConverse
from tests.support.daemon import cxrd, write_config

pytestmark = pytest.mark.integration
SHARED_CXRS = [
    "cxr/gdcm_DX_J2K_0Padding.dcm",
    "cxr/nih_cxr_nccid_sample.dcm",
    "cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm",
    "cxr/siim_acr_sample_txv.dcm",
    "cxr/wg04_RG1_J2KI.dcm",
]


def study_uids_in_orthanc(orthanc: OrthancProcess) -> list[str]:
    answer = requests.get(
        f"{orthanc.url}/studies", params={"expand": ""}, auth=orthanc.auth, timeout=10
    )
    answer.raise_for_status()
    return [s["MainDicomTags"]["StudyInstanceUID"] for s in answer.json()]


def s3_objects(s3_server: str, bucket: str) -> dict[str, tuple[bytes, str, dict[str, str]]]:
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            obj = client.get_object(Bucket=bucket, Key=item["Key"])
            found[item["Key"]] = (obj["Body"].read(), obj["ContentType"], obj["Metadata"])
    return found


def rows(store: SqlStore, sql: str) -> list[tuple[object, ...]]:
    with store.raw() as cur:
        cur.execute(sql)
        return [tuple(r) for r in cur.fetchall()]


def test_every_shared_cxr_is_processed_into_the_layout_and_reprocess_adds_a_run(
    orthanc: OrthancProcess,
    mysql_url: str,
    s3_server: str,
    bucket: str,
    shared_data: object,
    make_config: Callable[..., Path],
) -> None:
    """Each real CXR C-STOREd ends done with every S3 key, right types, mask = model input
    size, DB rows matching S3; `cxrd reprocess` adds a second run and keeps one study row."""
    files = [shared_data(name) for name in SHARED_CXRS]  # type: ignore[operator]
    send_files(files, host="127.0.0.1", port=orthanc.dicom_port)
    uids = study_uids_in_orthanc(orthanc)
    assert len(uids) == len(files)
    wait_until_stable(orthanc.url, orthanc.auth, uids, timeout_s=60)
    config = make_config()
    run = cxrd("run", "--once", config=config)
    assert run.returncode == 0, run.stderr[-3000:]

    store = SqlStore(mysql_url)
    objects = s3_objects(s3_server, bucket)
    try:
        for uid in uids:
            row = store.study_row(uid)
            assert row is not None
            assert row.state is StudyState.DONE, (uid, row.reason)
        instances = rows(store, "SELECT sop_uid, width, height, jpg_key, dcm_key, mask_key, "
                                "rendering FROM instances")  # fmt: skip
        assert len(instances) == len(files)
        for sop, width, height, jpg, dcm, mask, rendering in instances:
            assert rendering == "pydicom", sop
            assert objects[f"test/{jpg}"][1] == "image/jpeg"
            assert objects[f"test/{dcm}"][1] == "application/dicom"
            assert objects[f"test/{mask}"][1] == "image/png"
            with Image.open(io.BytesIO(objects[f"test/{mask}"][0])) as png:
                assert png.size == (width, height)
                assert max(png.size) <= 512
        for uid in uids:
            layout = StudyLayout(uid)
            result = json.loads(objects[f"test/{layout.result}"][0])
            report = json.loads(objects[f"test/{layout.report}"][0])
            (run_id,) = [r.run_id for r in store.runs(uid)]
            assert result["run_id"] == report["run_id"] == run_id
            db_findings = rows(store, f"SELECT COUNT(*) FROM findings WHERE run_id = '{run_id}'")
            assert db_findings[0][0] == sum(len(i["findings"]) for i in result["instances"])
            (log_key,) = rows(store, f"SELECT log_key FROM runs WHERE run_id = '{run_id}'")[0]
            assert objects[f"test/{log_key}"][1] == "application/json"
            assert all(meta["run-id"] == run_id for key, (_, _, meta) in objects.items()
                       if key.startswith(f"test/{layout.root}/"))  # fmt: skip

        again = cxrd("reprocess", uids[0], config=config)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"study {uids[0]}: done" in again.stdout
        assert f"s3://{bucket}/test/studies/{uids[0]}/" in again.stdout
        assert "report: " in again.stdout
        assert [r.trigger for r in store.runs(uids[0])] == ["feed", "reprocess"]
        assert rows(store, f"SELECT COUNT(*) FROM studies WHERE study_uid = '{uids[0]}'") == [(1,)]
    finally:
        store.close()
    _print_step_timings(run.stderr)


def _print_step_timings(stderr: str) -> None:
    """Per-step durations of the run, for the closing note (shown with -s / in CI logs)."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if '"run_steps"' in line:
            for step, seconds in json.loads(line)["durations_s"].items():
                totals[step] = totals.get(step, 0.0) + seconds
    print("step timings (s, summed over studies):", json.dumps(totals))


def test_reprocess_of_unknown_or_invalid_study_fails_with_a_reason(
    orthanc: OrthancProcess, mysql_url: str, tmp_path: Path
) -> None:
    """reprocess exits non-zero saying Orthanc lacks the study, or that the UID is invalid."""
    config = write_config(tmp_path / "cxrd.toml", orthanc, mysql_url)
    assert cxrd("db", "migrate", config=config).returncode == 0
    missing = cxrd("reprocess", "1.2.3.4.5", config=config)
    assert missing.returncode == 1
    assert "Orthanc has no study 1.2.3.4.5" in missing.stderr
    invalid = cxrd("reprocess", "1.2/../3", config=config)
    assert invalid.returncode == 1
    assert "not a DICOM UID" in invalid.stderr


def test_no_phi_in_logs_or_bedrock_request(
    orthanc: OrthancProcess,
    mysql_url: str,
    tmp_path: Path,
    make_config: Callable[..., Path],
) -> None:
    """Planted PatientName/ID/BirthDate/AccessionNumber appear in no log line and no
    byte sent to Bedrock (Converse through a local fake), though the study is processed."""
    phi = {"patient_name": "Qwertyuiop^Zanzibar", "patient_id": "PHI-PID-90210",
           "birth_date": "19020304", "accession": "ACCPHI777"}  # fmt: skip
    uid = str(new_uid())
    path = write_chest_phantom(tmp_path / "phi.dcm", study_uid=uid, rows=512, cols=448, **phi)
    send_files([path], host="127.0.0.1", port=orthanc.dicom_port)
    wait_until_stable(orthanc.url, orthanc.auth, [uid], timeout_s=60)
    with FakeConverse() as bedrock:
        extra = (f'[report]\nbackend = "bedrock"\nendpoint_url = "{bedrock.url}"\n'
                 'region = "us-east-1"\n')  # fmt: skip
        # Migrated below: the config is valid only once its second [report] is gone.
        config = make_config(extra=extra, migrate=False)
        # Debug level: library loggers (botocore, urllib3) talk the most there.
        config.write_text(
            config.read_text()
            .replace('[report]\nbackend = "template"\n', "")
            .replace('level = "info"', 'level = "debug"')
        )
        assert cxrd("db", "migrate", config=config).returncode == 0
        run = cxrd("run", "--once", config=config)
        assert run.returncode == 0, run.stderr[-3000:]
        assert len(bedrock.bodies) == 1
        sent = bedrock.bodies[0].decode()
    store = SqlStore(mysql_url)
    try:
        row = store.study_row(uid)
        assert row is not None
        assert row.state is StudyState.DONE, row.reason
    finally:
        store.close()
    assert "Findings" in sent or "findings" in sent
    assert '"level": "debug"' in run.stderr
    for value in phi.values():
        for part in value.split("^"):
            assert part not in run.stderr, part
            assert part not in sent, part
