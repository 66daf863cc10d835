"""Pipeline over fakes: S3 layout, model contract checks, fallback, run log, PHI."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit
from structlog.testing import capture_logs

from cxr_daemon import pipeline as pipeline_module
from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import FilterRule, StudyLayout, StudyState
from cxr_daemon.errors import TransientError
from cxr_daemon.pipeline import Pipeline
from cxr_daemon.poller import Poller
from cxr_daemon.ports import Ports, RunVersions
from cxr_daemon.sandbox.phantom import write_chest_phantom
from cxr_daemon.worker import RetryRule, Worker
from tests.fakes import FakeModel, FakeObjectStore, FakeOrthanc, RecordingReporter, make_study

PHI = {
    "PatientName": "Zzyzx^Quilliam",
    "PatientID": "PHI-ID-777-UNIQUE",
    "PatientBirthDate": "19111111",
    "AccessionNumber": "ACC-PHI-4242",
}


def queue_and_run(orthanc: FakeOrthanc, poller: Poller, worker: Worker, study: object) -> None:
    orthanc.add_study(study)  # type: ignore[arg-type]
    poller.prime()
    while poller.step():
        pass
    assert worker.step() is True


def test_every_key_of_the_layout_is_written_with_its_content_type(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, bucket: FakeObjectStore,
    store: SqlStore,
) -> None:  # fmt: skip
    """A two-image study writes jpg, dcm, mask per image, result, report and one log."""
    study = make_study(1, images=2)
    queue_and_run(orthanc, poller, worker, study)
    layout = StudyLayout(study.study_uid)
    types = {key: ctype for key, (_, ctype, _) in bucket.objects.items()}
    for inst in study.instances:
        assert types[layout.jpg(inst.sop_uid)] == "image/jpeg"
        assert types[layout.dcm(inst.sop_uid)] == "application/dicom"
        assert types[layout.mask(inst.sop_uid)] == "image/png"
    assert types[layout.result] == "application/json"
    assert types[layout.report] == "application/json"
    logs = [k for k in types if "/metadata/log_" in k]
    assert len(logs) == 1
    assert len(types) == 3 * 2 + 3
    (run,) = store.runs(study.study_uid)
    assert all(meta["run-id"] == run.run_id for _, _, meta in bucket.objects.values())
    assert all(meta["code-version"] == "test" for _, _, meta in bucket.objects.values())


def test_mask_matches_model_input_size_and_db_matches_s3(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, bucket: FakeObjectStore,
    store: SqlStore,
) -> None:  # fmt: skip
    """Each mask has the model input's size; instance rows carry the keys that exist."""
    study = make_study(2, images=1)
    queue_and_run(orthanc, poller, worker, study)
    with store.raw() as cur:
        cur.execute(
            "SELECT sop_uid, width, height, jpg_key, dcm_key, mask_key, rendering FROM instances"
        )
        (sop, width, height, jpg, dcm, mask, rendering) = cur.fetchone()
    assert rendering == "pydicom"
    assert max(width, height) == 64  # max_side of the fixture, aspect kept (80x96 phantom)
    with Image.open(io.BytesIO(bucket.objects[mask][0])) as png:
        assert png.size == (width, height)
    assert {jpg, dcm, mask} <= set(bucket.objects)
    result = bucket.json(StudyLayout(study.study_uid).result)
    assert result["instances"][0]["sop_uid"] == sop  # type: ignore[index]
    with store.raw() as cur:
        cur.execute("SELECT COUNT(*) FROM findings")
        assert cur.fetchone()[0] == len(result["instances"][0]["findings"])  # type: ignore[index]


def test_run_log_lists_steps_with_times_and_versions(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, bucket: FakeObjectStore
) -> None:
    """metadata/log_<UTC>.json has each step with start, end, outcome, and the versions."""
    study = make_study(3, images=1)
    queue_and_run(orthanc, poller, worker, study)
    (key,) = [k for k in bucket.objects if "/metadata/log_" in k]
    doc = bucket.json(key)
    assert doc["outcome"] == "done"  # type: ignore[index]
    steps = {s["step"] for s in doc["steps"]}  # type: ignore[index]
    assert {"download", "render", "archive", "segment", "classify", "result", "report"} <= steps
    assert all(s["outcome"] == "ok" and s["start"] <= s["end"] for s in doc["steps"])  # type: ignore[index]
    assert doc["versions"]["code"] == "test"  # type: ignore[index]
    assert doc["versions"]["prompt_hash"] == ""  # type: ignore[index]
    assert "classification=cxrd-reference:1" in doc["versions"]["models"]  # type: ignore[index]


def test_wrong_size_mask_fails_the_study_and_logs_the_reason(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, bucket: FakeObjectStore,
    store: SqlStore, ports: Ports,
) -> None:  # fmt: skip
    """A model breaking the contract fails the study at once; the run log says why."""
    out = io.BytesIO()
    Image.new("L", (7, 7)).save(out, format="PNG")
    assert isinstance(ports.segmentation, FakeModel)
    ports.segmentation.answers.append(out.getvalue())
    study = make_study(4, images=1)
    queue_and_run(orthanc, poller, worker, study)
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.FAILED
    assert "segmentation contract broken: mask is 7x7" in row.reason
    (run,) = store.runs(study.study_uid)
    assert run.outcome == "failed"
    (key,) = [k for k in bucket.objects if "/metadata/log_" in k]
    assert "mask is 7x7" in bucket.json(key)["errors"][0]  # type: ignore[index]


def test_s3_outage_sends_the_study_back_to_pending(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, bucket: FakeObjectStore,
    store: SqlStore,
) -> None:  # fmt: skip
    """A transient S3 error leaves the study pending for a later attempt, the run failed."""
    bucket.fail_next.append(TransientError("S3 answered 503 SlowDown"))
    study = make_study(5, images=1)
    queue_and_run(orthanc, poller, worker, study)
    row = store.study_row(study.study_uid)
    assert row is not None
    assert (row.state, row.reason) == (StudyState.PENDING, "S3 answered 503 SlowDown")
    assert [r.outcome for r in store.runs(study.study_uid)] == ["failed"]


def test_undecodable_pixels_fall_back_to_orthanc_rendering(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, store: SqlStore, tmp_path: Path
) -> None:
    """A sound header whose pixel stream no local decoder reads is rendered by Orthanc."""
    study = make_study(6, images=1)
    inst = study.instances[0]
    path = write_chest_phantom(
        tmp_path / "j.dcm",
        transfer_syntax=JPEGBaseline8Bit,
        bits_stored=8,
        rows=96,
        cols=80,
        sop_uid=inst.sop_uid,
    )
    ds = dcmread(path)
    ds.PixelData = ds.PixelData[:40] + b"\x00" * (len(ds.PixelData) - 40)  # corrupt the stream
    ds.save_as(path)
    orthanc.files[inst.orthanc_id] = path
    with capture_logs() as logs:
        queue_and_run(orthanc, poller, worker, study)
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.DONE, row.reason
    assert f"rendered:{inst.orthanc_id}" in orthanc.calls
    assert any(e["event"] == "render_fallback_orthanc" for e in logs)
    with store.raw() as cur:
        cur.execute("SELECT rendering FROM instances")
        assert cur.fetchone()[0] == "orthanc"


def test_lying_header_fails_with_a_specific_reason(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, store: SqlStore, tmp_path: Path
) -> None:
    """Rows x Columns larger than the pixel data fails the study, nothing sent to a model."""
    study = make_study(7, images=1)
    path = write_chest_phantom(tmp_path / "lie.dcm", rows=96, cols=80)
    ds = dcmread(path)
    ds.Rows = 4000
    ds.save_as(path)
    orthanc.files[study.instances[0].orthanc_id] = path
    queue_and_run(orthanc, poller, worker, study)
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.FAILED
    assert "PixelData holds 15360 bytes, 4000x80 at 16 bits needs 640000" in row.reason


def test_no_phi_in_logs_report_request_or_json_documents(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, bucket: FakeObjectStore,
    ports: Ports, tmp_path: Path,
) -> None:  # fmt: skip
    """Planted name, ID, birth date and accession reach no log line, prompt or JSON object."""
    study = make_study(8, images=1)
    inst = study.instances[0]
    orthanc.files[inst.orthanc_id] = write_chest_phantom(
        tmp_path / "phi.dcm", rows=96, cols=80, sop_uid=inst.sop_uid,
        patient_name=PHI["PatientName"], patient_id=PHI["PatientID"],
        birth_date=PHI["PatientBirthDate"], accession=PHI["AccessionNumber"],
    )  # fmt: skip
    with capture_logs() as logs:
        queue_and_run(orthanc, poller, worker, study)
    texts = [json.dumps(logs, default=str)]
    texts += [body.decode() for key, (body, _, _) in bucket.objects.items()
              if key.endswith(".json")]  # fmt: skip
    assert isinstance(ports.reporter, RecordingReporter)
    assert ports.reporter.requests, "the reporter was asked for a draft"
    texts += [repr(r) for r in ports.reporter.requests]
    for value in PHI.values():
        assert all(value not in text for text in texts), value
    assert any(b"Zzyzx" in body for key, (body, _, _) in bucket.objects.items()
               if key.endswith(".dcm")), "the archived DICOM itself keeps its header"  # fmt: skip


@pytest.mark.parametrize("max_side", [32, 1024])
def test_model_input_never_exceeds_max_side(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, ports: Ports, max_side: int
) -> None:
    """The PNG sent to both models has its longest side <= max_side, and is never upscaled."""
    worker.pipeline.max_side = max_side
    queue_and_run(orthanc, poller, worker, make_study(9, images=1))
    assert isinstance(ports.segmentation, FakeModel)
    with Image.open(io.BytesIO(ports.segmentation.requests[0])) as png:
        assert max(png.size) == min(max_side, 96)


def test_next_image_is_prepared_while_the_models_look_at_this_one(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, ports: Ports, store: SqlStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The second image's download starts before the first image's segmentation answers."""
    second_download = threading.Event()
    download = orthanc.download_instance

    def counting_download(orthanc_id: str, dest: Path) -> int:
        if orthanc.calls.count("download") == 1:
            second_download.set()
        return download(orthanc_id, dest)

    monkeypatch.setattr(orthanc, "download_instance", counting_download)
    seen_during_first_call: list[bool] = []
    segment = ports.segmentation.invoke

    def segmentation(body: bytes, content_type: str, accept: str) -> bytes:
        if not seen_during_first_call:
            # Without prefetching this wait would time out: nothing else runs.
            seen_during_first_call.append(second_download.wait(timeout=10))
        return segment(body, content_type, accept)

    monkeypatch.setattr(ports.segmentation, "invoke", segmentation)
    study = make_study(7, images=2)
    queue_and_run(orthanc, poller, worker, study)
    assert seen_during_first_call == [True]
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.DONE


def test_a_failing_second_image_fails_the_run_after_the_first_image_is_analysed(
    orthanc: FakeOrthanc, poller: Poller, worker: Worker, ports: Ports, store: SqlStore,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Prefetching changes no outcome: the broken image's reason is the run's reason."""
    study = make_study(8, images=2)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    orthanc.files[study.instances[1].orthanc_id] = broken
    queue_and_run(orthanc, poller, worker, study)
    row = store.study_row(study.study_uid)
    assert row is not None
    assert row.state is StudyState.FAILED
    assert "not a DICOM file" in (row.reason or "")
    assert len(ports.segmentation.requests) == 1  # type: ignore[attr-defined]


def test_render_slots_bound_the_full_size_images_decoded_at_once(
    orthanc: FakeOrthanc, poller: Poller, ports: Ports, store: SqlStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Four studies in flight, two slots: two renders do run at once, never three."""
    render = pipeline_module.imaging.render_8bit
    lock, active, peak = threading.Lock(), [0], [0]
    first_two = threading.Barrier(2, timeout=10)
    renders: list[int] = [0]
    third_got_a_slot: list[bool] = []
    tried = threading.Event()

    def counting_render(ds: object) -> object:
        with lock:
            active[0] += 1
            renders[0] += 1
            peak[0] = max(peak[0], active[0])
            meet = renders[0] <= 2
        try:
            # The first two renders wait for each other (passes only if both run
            # at once); then, while both still hold their slot, a third may not
            # get one. The other one waits until that has been tried.
            if meet and first_two.wait() == 0:
                taken = pipeline.render_slots.acquire(blocking=False)
                if taken:
                    pipeline.render_slots.release()
                third_got_a_slot.append(taken)
                tried.set()
            elif meet:
                tried.wait(timeout=10)
            return render(ds)  # type: ignore[arg-type]
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(pipeline_module.imaging, "render_8bit", counting_render)
    pipeline = Pipeline(ports, FilterRule(), RunVersions(code="test"), max_side=64, render_slots=2)
    worker = Worker(store, pipeline, RetryRule(max_attempts=3, backoff_s=(5, 30)))
    studies = [make_study(20 + n, images=2) for n in range(4)]
    for study in studies:
        orthanc.add_study(study)
    poller.prime()
    while poller.step():
        pass
    threads = [threading.Thread(target=worker.step) for _ in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    states = {s.study_uid: store.study_row(s.study_uid).state for s in studies}  # type: ignore[union-attr]
    assert set(states.values()) == {StudyState.DONE}, states
    assert renders[0] == 8
    assert third_got_a_slot == [False]
    assert peak[0] == 2
