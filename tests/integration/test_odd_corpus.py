"""Bad input: every odd file Orthanc accepts ends skipped or failed with a specific reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from tests.support.daemon import cxrd

pytestmark = pytest.mark.integration

# file -> (expected state, a piece of the reason). None: Orthanc refuses the file.
EXPECTED: dict[str, tuple[str, str] | None] = {
    "fodicom_HasFragmentSequence.dcm": ("skipped", "series are XA/"),
    "highdicom_seg_image_cr_binary.dcm": ("skipped", "series are SEG/"),
    "openrem_DX-Im-GE_XR220-1.dcm": ("skipped", "DX/ABDOMEN"),
    "openrem_DX-RDSR-Canon_CXDI.dcm": ("skipped", "series are SR/"),
    "orthanc_HelloWorld.pdf": None,
    "orthanc_Issue56-NoPixelData.dcm": ("skipped", "DX/EXTREMITY"),
    "orthanc_MR1_JPLY_jpeg_extended.dcm": ("skipped", "series are MR/"),
    "orthanc_PR000000_GSPS.dcm": ("skipped", "series are PR/"),
    "orthanc_SR_IM0.dcm": ("skipped", "series are SR/"),
    "orthanc_oob-monochrome-65535.dcm": ("skipped", "series are ?/"),
    "orthanc_sample-pdf.dcm": ("skipped", "series are OT/"),
    "pydicom_DICOMDIR": None,
    "pydicom_ExplVR_BigEndNoMeta.dcm": ("skipped", "series are RTPLAN/"),
    "pydicom_MR_truncated.dcm": None,
    "pydicom_badVR.dcm": ("skipped", "series are RTDOSE/"),
    "pydicom_meta_missing_tsyntax.dcm": None,
    "pydicom_no_meta.dcm": None,
    "pydicom_waveform_ecg.dcm": ("skipped", "series are ECG/"),
    "pydicomdata_emri_small_RLE.dcm": ("skipped", "series are MR/"),
    # The SIIM CXR relabelled MONOCHROME1: a sound file; honouring its header
    # renders a negative, which is what the header asks for.
    "txv_Fake_MONOHR1.dcm": ("done", ""),
    "wg04_RG3_JPLL.dcm": ("skipped", "CR/EXTREMITY"),
    "wg04_RG3_RLE.dcm": ("skipped", "CR/EXTREMITY"),
}


def upload(orthanc: OrthancProcess, path: Path) -> str | None:
    """REST upload as Orthanc Explorer would; the StudyInstanceUID, or None if refused."""
    answer = requests.post(f"{orthanc.url}/instances", data=path.read_bytes(),
                           auth=orthanc.auth, timeout=30)  # fmt: skip
    if answer.status_code >= 400:
        return None
    study = requests.get(f"{orthanc.url}/studies/{answer.json()['ParentStudy']}",
                         auth=orthanc.auth, timeout=10).json()  # fmt: skip
    return str(study["MainDicomTags"]["StudyInstanceUID"])


def test_every_accepted_odd_file_ends_with_a_specific_reason_and_good_work_goes_on(
    orthanc: OrthancProcess,
    mysql_url: str,
    shared_data: object,
    make_config: Callable[..., Path],
) -> None:
    """Each odd file: refused by Orthanc, or its study skipped/failed with a reason (never a
    traceback); a good CXR sent afterwards is done."""
    uids: dict[str, str] = {}
    for name, expected in EXPECTED.items():
        uid = upload(orthanc, shared_data(f"odd/{name}"))  # type: ignore[operator]
        assert (uid is None) == (expected is None), name
        if uid is not None:
            uids[name] = uid
    good = upload(orthanc, shared_data("cxr/nih_cxr_nccid_sample.dcm"))  # type: ignore[operator]
    assert good is not None
    wait_until_stable(orthanc.url, orthanc.auth, [*uids.values(), good], timeout_s=60)
    config = make_config()
    run = cxrd("run", "--once", config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    store = SqlStore(mysql_url)
    try:
        seen = {}
        for name, uid in uids.items():
            row = store.study_row(uid)
            assert row is not None, name
            seen[name] = (row.state.value, row.reason)
        for name, (state, reason) in seen.items():
            want_state, want_reason = EXPECTED[name]  # type: ignore[misc]
            assert state == want_state, (name, state, reason)
            assert want_reason in reason, (name, reason)
        good_row = store.study_row(good)
        assert good_row is not None
        assert good_row.state.value == "done"
    finally:
        store.close()


# Odd files relabelled as chest DX, so the filter lets them through and the
# image checks must catch them: file -> (state, a piece of the reason).
DISGUISED: dict[str, tuple[str, str]] = {
    "orthanc_oob-monochrome-65535.dcm": ("failed", "65535"),
    "orthanc_Issue56-NoPixelData.dcm": ("failed", "PixelData"),
    "fodicom_HasFragmentSequence.dcm": ("failed", "frames"),
    "pydicomdata_emri_small_RLE.dcm": ("failed", "frames"),
    "orthanc_SR_IM0.dcm": ("failed", "PixelData"),
    "pydicom_badVR.dcm": ("failed", ""),
    "orthanc_MR1_JPLY_jpeg_extended.dcm": ("done", ""),  # 12-bit JPEG: imagecodecs decodes it
}


def disguise(source: Path, dest: Path) -> Path:
    """The file with Modality DX, BodyPartExamined CHEST and fresh UIDs, else untouched."""
    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.uid import generate_uid  # noqa: PLC0415

    ds = dcmread(source, force=True)
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest)
    return dest


def test_malformed_files_posing_as_chest_dx_fail_with_a_reason_and_never_reach_a_model(
    orthanc: OrthancProcess,
    mysql_url: str,
    model: object,
    shared_data: object,
    tmp_path: Path,
    make_config: Callable[..., Path],
) -> None:
    """Lying headers, missing pixels and multi-frame objects labelled chest DX fail with a
    specific reason before any model call; what Orthanc can render is done."""
    uids = {}
    for name in DISGUISED:
        path = disguise(shared_data(f"odd/{name}"), tmp_path / name)  # type: ignore[operator]
        uid = upload(orthanc, path)
        assert uid is not None, name
        uids[name] = uid
    wait_until_stable(orthanc.url, orthanc.auth, list(uids.values()), timeout_s=60)
    config = make_config(model_url=model.url)  # type: ignore[attr-defined]
    run = cxrd("run", "--once", config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    store = SqlStore(mysql_url)
    try:
        seen = {name: store.study_row(uid) for name, uid in uids.items()}
    finally:
        store.close()
    for name, (want_state, want_reason) in DISGUISED.items():
        row = seen[name]
        assert row is not None, name
        assert row.state.value == want_state, (name, row.state, row.reason)
        assert want_reason in row.reason, (name, row.reason)
        if want_state == "failed":
            assert row.reason, name
    done = sum(1 for v in DISGUISED.values() if v[0] == "done")
    assert model.invocations("segmentation") == done  # type: ignore[attr-defined]
