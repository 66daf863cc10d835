"""The reference model server: a deterministic stand-in, not a medical model."""

from __future__ import annotations

import http.client
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import requests
from PIL import Image

from cxr_daemon.modelserver import MODEL_NAME, FaultPlan, ModelServer, classify, segment

if TYPE_CHECKING:
    from collections.abc import Iterator

LABELS = {"Cardiomegaly", "Pneumothorax", "Effusion", "Consolidation", "Nodule"}


def chest(h: int = 512, w: int = 512, seed: int = 0) -> np.ndarray:
    """Dark air, a bright body, two dark lung ellipses and a brighter heart, with noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 20.0, np.float32)
    img[((xx - w / 2) / (0.42 * w)) ** 2 + ((yy - 0.55 * h) / (0.5 * h)) ** 2 < 1] = 170
    for cx in (0.32, 0.68):
        img[((xx - cx * w) / (0.13 * w)) ** 2 + ((yy - 0.45 * h) / (0.28 * h)) ** 2 < 1] = 60
    img[((xx - 0.53 * w) / (0.12 * w)) ** 2 + ((yy - 0.62 * h) / (0.1 * h)) ** 2 < 1] = 210
    img += np.random.default_rng(seed).normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def post(url: str, body: bytes, content_type: str = "image/png") -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=10)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as srv:
        yield srv


# ---- segmentation ------------------------------------------------------------


def test_segment_mask_has_input_size_and_known_labels() -> None:
    """The mask has the input's shape, dtype uint8 and labels within {0, 1, 2, 3}."""
    img = chest(400, 300)
    mask = segment(img)
    assert mask.shape == img.shape
    assert mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}


def test_segment_right_lung_on_image_left_left_lung_on_image_right() -> None:
    """Label 1 (right lung) lies in the image-left half, label 2 in the right, heart between."""
    img = chest()
    mask = segment(img)
    half = img.shape[1] / 2
    cols = {label: np.nonzero(mask == label)[1] for label in (1, 2, 3)}
    assert cols[1].size > 0
    assert cols[2].size > 0
    assert cols[1].max() < half < cols[2].min()
    assert cols[1].mean() < cols[3].mean() < cols[2].mean()


def test_segment_finds_the_drawn_lungs() -> None:
    """Most of each drawn lung ellipse is labelled as that lung."""
    h = w = 512
    yy, xx = np.mgrid[0:h, 0:w]
    drawn = ((xx - 0.32 * w) / (0.13 * w)) ** 2 + ((yy - 0.45 * h) / (0.28 * h)) ** 2 < 0.8
    mask = segment(chest(h, w))
    assert (mask[drawn] == 1).mean() > 0.9


def test_segment_accepts_rgb_and_16_bit() -> None:
    """Colour and 16-bit input give the same-size mask as the 8-bit grayscale image."""
    img = chest(300, 420)
    rgb = np.stack([img] * 3, axis=2)
    wide = img.astype(np.uint16) * 257
    assert np.array_equal(segment(rgb), segment(img))
    assert segment(wide).shape == img.shape


def test_segment_blank_image_is_all_background() -> None:
    """A uniform image has no lungs: every pixel is 0."""
    assert not segment(np.full((64, 80), 128, np.uint8)).any()


def test_segment_rejects_non_image() -> None:
    """A 1-D or empty array raises ValueError."""
    with pytest.raises(ValueError, match="2-D"):
        segment(np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        segment(np.zeros((0, 5), np.uint8))


# ---- classification ----------------------------------------------------------


def assert_contract(doc: dict[str, Any], shape: tuple[int, int]) -> None:
    h, w = shape
    assert doc["model"] == MODEL_NAME
    assert {f["label"] for f in doc["findings"]} == LABELS
    for finding in doc["findings"]:
        assert set(finding) == {"label", "probability", "bbox"}
        assert isinstance(finding["probability"], float)
        assert 0.0 <= finding["probability"] <= 1.0
        if finding["bbox"] is not None:
            x0, y0, x1, y1 = finding["bbox"]
            assert all(isinstance(v, int) for v in finding["bbox"])
            assert 0 <= x0 < x1 <= w
            assert 0 <= y0 < y1 <= h


def test_classify_matches_contract() -> None:
    """Five known labels, probabilities in [0, 1], integer bboxes inside the image, JSON-safe."""
    img = chest(480, 360)
    doc = classify(img)
    assert_contract(doc, img.shape)
    assert json.loads(json.dumps(doc)) == doc


def test_classify_is_deterministic() -> None:
    """The same pixels give the same answer, call after call."""
    img = chest(seed=3)
    assert classify(img) == classify(img.copy())


def test_classify_edge_cases_stay_in_contract() -> None:
    """Blank, tiny, noisy and one-lung images still answer within the contract."""
    one_lung = chest()
    one_lung[:, 256:] = np.where(one_lung[:, 256:] < 100, 170, one_lung[:, 256:])
    noise = np.random.default_rng(1).integers(0, 256, (256, 256)).astype(np.uint8)
    for img in (np.zeros((1, 1), np.uint8), np.full((50, 70), 7, np.uint8), noise, one_lung):
        assert_contract(classify(img), img.shape)


def test_classify_flags_bright_spot_in_lung_as_nodule() -> None:
    """A bright disc inside a lung raises Nodule and its bbox covers the disc."""
    img = chest()
    yy, xx = np.mgrid[0:512, 0:512]
    img[(xx - 160) ** 2 + (yy - 200) ** 2 < 20**2] = 200
    before = {f["label"]: f for f in classify(chest())["findings"]}
    after = {f["label"]: f for f in classify(img)["findings"]}
    assert after["Nodule"]["probability"] > max(0.5, before["Nodule"]["probability"])
    x0, y0, x1, y1 = after["Nodule"]["bbox"]
    assert x0 <= 160 < x1
    assert y0 <= 200 < y1


def test_classify_missing_lung_raises_pneumothorax() -> None:
    """With one lung field gone, Pneumothorax outranks the symmetric image's score."""
    one_lung = chest()
    one_lung[:, 256:] = np.where(one_lung[:, 256:] < 100, 170, one_lung[:, 256:])
    prob = {f["label"]: f["probability"] for f in classify(one_lung)["findings"]}
    base = {f["label"]: f["probability"] for f in classify(chest())["findings"]}
    assert prob["Pneumothorax"] > 0.5 > base["Pneumothorax"]


# ---- fault plan --------------------------------------------------------------


def test_fault_plan_targets_a_model_and_is_consumed() -> None:
    """A fault for one model skips the other, and each planned fault is used once."""
    plan = FaultPlan()
    plan.fail_next(2, 424, model="classification")
    assert plan.take("segmentation") is None
    assert [plan.take("classification") for _ in range(3)] == [424, 424, None]
    assert plan.pending() == 0


def test_fault_plan_rejects_non_error_status() -> None:
    """Only 4xx/5xx statuses and non-negative counts are accepted."""
    with pytest.raises(ValueError, match="bad fault"):
        FaultPlan().fail_next(1, 200)
    with pytest.raises(ValueError, match="bad fault"):
        FaultPlan().fail_next(-1, 503)


# ---- HTTP --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ping", "/segmentation/ping", "/classification/ping"])
def test_ping_answers_200(server: ModelServer, path: str) -> None:
    """Every ping path answers 200."""
    assert requests.get(server.url + path, timeout=5).status_code == 200


def test_segmentation_invocation_returns_same_size_label_png(server: ModelServer) -> None:
    """POST a PNG: the answer is an L-mode PNG of the same size equal to segment()."""
    img = chest(300, 260)
    resp = post(server.url + "/segmentation/invocations", png(img))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "image/png"
    with Image.open(io.BytesIO(resp.content)) as out:
        assert out.mode == "L"
        assert out.size == (260, 300)
        assert np.array_equal(np.asarray(out), segment(img))


def test_segmentation_invocation_accepts_rgb_png(server: ModelServer) -> None:
    """An RGB PNG is converted to grayscale and answered at its own size."""
    rgb = np.stack([chest(200, 240)] * 3, axis=2)
    resp = post(server.url + "/segmentation/invocations", png(rgb))
    assert resp.status_code == 200
    with Image.open(io.BytesIO(resp.content)) as out:
        assert out.size == (240, 200)


def test_classification_invocation_returns_findings_json(server: ModelServer) -> None:
    """POST a PNG: the answer is the contract's JSON, equal to classify()."""
    img = chest(320, 400)
    resp = post(server.url + "/classification/invocations", png(img))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert_contract(resp.json(), img.shape)
    assert resp.json() == classify(img)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not an image at all", "image/png"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png"),
        (png(chest(64, 64))[:-40], "image/png"),
        (png(chest(64, 64)), "application/json"),
        (b"", "image/png"),
    ],
    ids=["garbage", "bad-chunks", "truncated", "wrong-type", "empty"],
)
def test_invocation_rejects_non_png_with_400(
    server: ModelServer, body: bytes, content_type: str
) -> None:
    """A body that is not a decodable PNG, or not sent as image/png, gets 400 + JSON message."""
    for model in ("segmentation", "classification"):
        resp = post(f"{server.url}/{model}/invocations", body, content_type)
        assert resp.status_code == 400
        assert resp.json()["message"]


def test_unknown_path_is_404(server: ModelServer) -> None:
    """Paths outside the contract answer 404 with a JSON message."""
    resp = requests.get(server.url + "/detection/ping", timeout=5)
    assert resp.status_code == 404
    assert "message" in resp.json()


def test_wrong_method_is_405(server: ModelServer) -> None:
    """GET on invocations and POST on ping answer 405 with the allowed method."""
    resp = requests.get(server.url + "/segmentation/invocations", timeout=5)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"
    resp = requests.post(server.url + "/classification/ping", data=b"x", timeout=5)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET"


def test_oversize_body_is_413_without_reading_it(server: ModelServer) -> None:
    """A Content-Length over SageMaker's 6 MiB limit is refused before the body is read."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest("POST", "/segmentation/invocations")
        conn.putheader("Content-Type", "image/png")
        conn.putheader("Content-Length", str(6_291_457))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_fault_plan_yields_503_then_recovers(server: ModelServer) -> None:
    """Two planned 503s answer the next two invocations; the third succeeds; pings stay 200."""
    server.faults.fail_next(2, 503)
    body = png(chest(128, 128))
    url = server.url + "/classification/invocations"
    assert requests.get(server.url + "/classification/ping", timeout=5).status_code == 200
    first, second, third = (post(url, body) for _ in range(3))
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert "ModelNotReady" in first.json()["message"]
    assert server.invocations("classification") == 3


def test_model_error_fault_hits_only_its_model(server: ModelServer) -> None:
    """A 424 planned for classification leaves segmentation answering 200."""
    server.faults.fail_next(1, 424, model="classification")
    body = png(chest(128, 128))
    assert post(server.url + "/segmentation/invocations", body).status_code == 200
    assert post(server.url + "/classification/invocations", body).status_code == 424
    assert post(server.url + "/classification/invocations", body).status_code == 200


def test_latency_delays_each_invocation() -> None:
    """latency_ms is added to every invocation."""
    body = png(chest(128, 128))
    with ModelServer(latency_ms=300) as srv:
        for model in ("segmentation", "classification"):
            start = time.perf_counter()
            resp = post(f"{srv.url}/{model}/invocations", body)
            assert resp.status_code == 200
            assert time.perf_counter() - start >= 0.3


def test_stop_closes_the_port() -> None:
    """After the context manager exits, the URL is gone and connections are refused."""
    with ModelServer() as srv:
        url = srv.url
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.url
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/ping", timeout=5)


def test_start_twice_is_refused() -> None:
    """A started server cannot be started again."""
    with ModelServer() as srv, pytest.raises(RuntimeError, match="already started"):
        srv.start()


def test_serve_forever_announces_itself_and_exits_on_sigterm() -> None:
    """The CLI entry prints one line (URL, NOT a medical model), serves, and exits 0 on SIGTERM."""
    code = "from cxr_daemon.modelserver import serve_forever; serve_forever('127.0.0.1', 0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],  # the checkout, importable without an install
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "NOT a medical model" in line
        url = line.split("listening on ")[1].split()[0]
        assert requests.get(url + "/ping", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
