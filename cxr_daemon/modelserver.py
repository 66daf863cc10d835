"""Reference model server: a deterministic stand-in, NOT a medical model.

Nothing here is a medical device or a diagnostic model. The "segmentation" is a
threshold and connected-components heuristic and the "findings" are image
statistics pushed through a sigmoid; they exist so the demo, the tests and the
benchmarks have something that speaks the real contract. Never use its output
for patient care.

One port serves both models under two bases, speaking the SageMaker
inference-container contract (DESIGN.md, "Model endpoints"):

- ``GET /segmentation/ping``, ``GET /classification/ping``, ``GET /ping``: 200.
- ``POST /segmentation/invocations``: PNG in, PNG label mask out (mode ``L``,
  same size; 0 background, 1 right lung, 2 left lung, 3 heart).
- ``POST /classification/invocations``: PNG in, JSON findings out, each bbox
  ``[x0, y0, x1, y1]`` in input pixels with exclusive ``x1, y1`` (Pillow's box).

Errors answer like a container: 400 for a body that is not a decodable PNG,
404 for an unknown path, 405 for a wrong method, 411/413 for a missing or
oversize body. ``latency_ms`` and :class:`FaultPlan` let client tests simulate
model time and 503/424/500 answers.
"""

from __future__ import annotations

import io
import json
import logging
import math
import signal
import socketserver
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Self, cast
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from types import FrameType

    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]
    F32 = npt.NDArray[np.float32]
    Mask = npt.NDArray[np.bool_]

MODEL_NAME = "cxrd-reference:1"
MAX_BODY_BYTES = 6_291_456  # SageMaker's realtime request limit
_GRID = 128  # the analysis runs on a grid at most this many cells a side
_MIN_LUNG_FRACTION = 0.01  # smaller dark components are not lungs
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FAULT_MESSAGES = {
    503: "ModelNotReady: the model is not ready to serve (injected fault)",
    424: "ModelError: the model failed on this input (injected fault)",
    500: "InternalFailure: the container failed (injected fault)",
}
_ROUTES: dict[str, tuple[str, str | None]] = {
    "/ping": ("GET", None),
    "/segmentation/ping": ("GET", None),
    "/classification/ping": ("GET", None),
    "/segmentation/invocations": ("POST", "segmentation"),
    "/classification/invocations": ("POST", "classification"),
}

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Analysis:
    small: F32  # smoothed, downsampled image
    labels: U8  # label grid over `small`
    factor: int  # input pixels per grid cell, per side
    shape: tuple[int, int]  # input (height, width)
    threshold: float  # dark/bright split on `small`


def _to_gray(pixels: npt.NDArray[Any]) -> U8:
    """Return a 2-D uint8 image; RGB(A) is averaged, other dtypes min-max scaled."""
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2).round().astype(arr.dtype)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return cast("U8", arr)
    arr = arr.astype(np.float64)
    low, high = float(arr.min()), float(arr.max())
    scaled = (arr - low) * (255.0 / (high - low)) if high > low else np.zeros_like(arr)
    return scaled.round().astype(np.uint8)


def _downsample(gray: U8, factor: int) -> F32:
    """Block means of `factor`-pixel squares, then a 3x3 box blur."""
    h, w = gray.shape
    hs, ws = -(-h // factor), -(-w // factor)
    padded = np.pad(gray, ((0, hs * factor - h), (0, ws * factor - w)), mode="edge")
    sums = padded.reshape(hs, factor, ws, factor).sum(axis=(1, 3), dtype=np.uint32)
    small = sums.astype(np.float32) / np.float32(factor * factor)
    framed = np.pad(small, 1, mode="edge")
    blurred = sum(framed[dy : dy + hs, dx : dx + ws] for dy in range(3) for dx in range(3))
    return cast("F32", np.asarray(blurred, dtype=np.float32) / np.float32(9))


def _otsu(values: F32) -> float:
    """Otsu's threshold over a 256-bin histogram; dark means `value < threshold`."""
    hist = np.bincount(values.astype(np.intp).ravel(), minlength=256)[:256].astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(np.argmax(np.nan_to_num(between[:-1]))) + 1.0


def _components(mask: Mask) -> npt.NDArray[np.intp]:
    """Label 4-connected components: each cell gets its component's smallest index, or -1.

    Min-label hooking with pointer jumping (Shiloach-Vishkin style) keeps every
    step vectorised; ``parent[i] <= i`` always holds, so the forest has no cycles.
    """
    h, w = mask.shape
    idx = np.arange(h * w).reshape(h, w)
    across, down = mask[:, :-1] & mask[:, 1:], mask[:-1, :] & mask[1:, :]
    u = np.concatenate([idx[:, :-1][across], idx[:-1, :][down]])
    v = np.concatenate([idx[:, 1:][across], idx[1:, :][down]])
    parent = idx.ravel().copy()
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        lo, hi = np.minimum(pu[differ], pv[differ]), np.maximum(pu[differ], pv[differ])
        np.minimum.at(parent, hi, lo)
        while not np.array_equal(jumped := parent[parent], parent):
            parent = jumped
    return np.where(mask, parent.reshape(h, w), -1)


def _lungs(small: F32, threshold: float) -> U8:
    """Two largest dark components off the border: image-left is 1 (right lung), the other 2."""
    roots = _components(small < threshold)
    border = np.concatenate([roots[0], roots[-1], roots[:, 0], roots[:, -1]])
    ids, counts = np.unique(roots[roots >= 0], return_counts=True)
    keep = ~np.isin(ids, border) & (counts >= _MIN_LUNG_FRACTION * small.size)
    best = ids[keep][np.argsort(-counts[keep], kind="stable")[:2]]
    labels = np.zeros(small.shape, dtype=np.uint8)
    if best.size == 2:
        cols = np.arange(small.shape[1])
        centre = [float(cols[(roots == i).any(axis=0)].mean()) for i in best]
        left_first = best if centre[0] <= centre[1] else best[::-1]
        labels[roots == left_first[0]] = 1
        labels[roots == left_first[1]] = 2
    elif best.size == 1:  # one field (lungs joined, or one lung): split at the midline
        field_ = roots == best[0]
        image_left = np.arange(small.shape[1]) < small.shape[1] / 2
        labels[field_ & image_left] = 1
        labels[field_ & ~image_left] = 2
    return labels


def _add_heart(labels: U8, small: F32, threshold: float) -> None:
    """Mark bright cells between the lungs, in the lower half of the lung fields, as 3."""
    right, left = labels == 1, labels == 2
    if not right.any() or not left.any():
        return
    h, w = labels.shape
    rows = np.nonzero((right | left).any(axis=1))[0]
    top, bottom = int(rows[0]), int(rows[-1])
    r_edge = np.where(right.any(axis=1), w - 1 - np.argmax(right[:, ::-1], axis=1), w)
    l_edge = np.where(left.any(axis=1), np.argmax(left, axis=1), -1)
    row_ids = np.arange(h)
    lower = (row_ids >= (top + bottom) // 2) & (row_ids <= bottom)
    cols = np.arange(w)
    between = (cols > r_edge[:, None]) & (cols < l_edge[:, None]) & lower[:, None]
    labels[between & (small >= threshold) & (labels == 0)] = 3


def _analyse(pixels: npt.NDArray[Any]) -> _Analysis:
    gray = _to_gray(pixels)
    factor = max(1, -(-max(gray.shape) // _GRID))
    small = _downsample(gray, factor)
    threshold = _otsu(small)
    labels = _lungs(small, threshold)
    _add_heart(labels, small, threshold)
    return _Analysis(small, labels, factor, (gray.shape[0], gray.shape[1]), threshold)


def segment(pixels: npt.NDArray[Any]) -> U8:
    """Label mask of the same size: 0 background, 1 right lung, 2 left lung, 3 heart.

    Raises:
        ValueError: `pixels` is not a non-empty 2-D (or 3-D colour) image.
    """
    an = _analyse(pixels)
    h, w = an.shape
    grid = np.repeat(np.repeat(an.labels, an.factor, axis=0), an.factor, axis=1)
    return np.ascontiguousarray(grid[:h, :w])


def _box(mask: Mask, an: _Analysis) -> list[int] | None:
    """Grid mask -> [x0, y0, x1, y1] in input pixels (x1, y1 exclusive), or None if empty."""
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    f, (h, w) = an.factor, an.shape
    x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    return [x0 * f, y0 * f, min(x1 * f, w), min(y1 * f, h)]


def _finding(label: str, score: float, bbox: list[int] | None) -> dict[str, Any]:
    probability = round(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, score)))), 3)
    return {"label": label, "probability": probability, "bbox": bbox}


def _row_spans(mask: Mask) -> Mask:
    """Each row filled from the mask's first to its last cell in that row."""
    cols = np.arange(mask.shape[1])
    has = mask.any(axis=1)
    first = np.where(has, np.argmax(mask, axis=1), mask.shape[1])
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return cast("Mask", (cols >= first[:, None]) & (cols <= last[:, None]))


def _cardiomegaly(an: _Analysis) -> dict[str, Any]:
    heart, lungs = an.labels == 3, (an.labels == 1) | (an.labels == 2)
    if not heart.any():
        return _finding("Cardiomegaly", -4.0, None)
    heart_width = int(heart.sum(axis=1).max())
    thorax_width = int(_row_spans(lungs).sum(axis=1).max())
    return _finding("Cardiomegaly", 12.0 * (heart_width / thorax_width - 0.55), _box(heart, an))


def _pair_findings(an: _Analysis, right: Mask, left: Mask) -> list[dict[str, Any]]:
    """Findings that compare the two lung fields (both present)."""
    lungs = (right, left)
    areas = [int(m.sum()) for m in lungs]
    means = [float(an.small[m].mean()) for m in lungs]
    rows = [np.nonzero(m.any(axis=1))[0] for m in lungs]
    darker, brighter = (0, 1) if means[0] <= means[1] else (1, 0)
    asymmetry = abs(areas[0] - areas[1]) / sum(areas)
    height = max(int(r[-1]) for r in rows) - min(int(r[0]) for r in rows) + 1
    higher = 0 if rows[0][-1] <= rows[1][-1] else 1  # the field whose base sits higher
    base_gap = abs(int(rows[0][-1]) - int(rows[1][-1])) / height
    top, bottom = int(rows[higher][0]), int(rows[higher][-1])
    base = lungs[higher] & (np.arange(an.labels.shape[0]) >= bottom - (bottom - top) // 3)[:, None]
    opacity_gap = (means[brighter] - means[darker]) / 255.0
    return [
        _finding("Pneumothorax", 10.0 * (asymmetry - 0.3), _box(lungs[darker], an)),
        _finding("Effusion", 15.0 * (base_gap - 0.15), _box(base, an)),
        _finding("Consolidation", 25.0 * (opacity_gap - 0.08), _box(lungs[brighter], an)),
    ]


def _nodule(an: _Analysis, fields: list[Mask]) -> dict[str, Any]:
    """Bright islands enclosed by a lung field's row spans."""
    best, best_frac = np.zeros(an.labels.shape, dtype=bool), 0.0
    for lung in fields:
        holes = _row_spans(lung) & ~lung & (an.small >= an.threshold)
        frac = float(holes.sum()) / float(lung.sum())
        if frac > best_frac:
            best, best_frac = holes, frac
    if best_frac == 0.0:
        return _finding("Nodule", -4.0, None)
    return _finding("Nodule", 60.0 * (best_frac - 0.03), _box(best, an))


def classify(pixels: npt.NDArray[Any]) -> dict[str, Any]:
    """Deterministic findings from image statistics (NOT a diagnosis).

    Returns ``{"model": MODEL_NAME, "findings": [{"label", "probability", "bbox"}]}``
    with five findings in a fixed order and probabilities in [0, 1].

    Raises:
        ValueError: `pixels` is not a non-empty 2-D (or 3-D colour) image.
    """
    an = _analyse(pixels)
    right, left = an.labels == 1, an.labels == 2
    fields = [m for m in (right, left) if m.any()]
    if len(fields) == 2:
        pair = _pair_findings(an, right, left)
    else:  # one field or none: a missing lung reads as total asymmetry
        pair = [
            _finding("Pneumothorax", 7.0 if fields else -4.0, None),
            _finding("Effusion", -4.0, None),
            _finding("Consolidation", -4.0, None),
        ]
    return {"model": MODEL_NAME, "findings": [_cardiomegaly(an), *pair, _nodule(an, fields)]}


class FaultPlan:
    """Thread-safe list of canned failures for the next invocations (pings never fail)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, str | None]] = deque()

    def fail_next(self, count: int = 1, status: int = 503, model: str | None = None) -> None:
        """Answer the next `count` invocations (of `model`, or of any model) with `status`.

        Raises:
            ValueError: `count` is negative or `status` is not a 4xx/5xx code.
        """
        if count < 0 or not 400 <= status <= 599:
            raise ValueError(f"bad fault: count={count} status={status}")
        with self._lock:
            self._queue.extend([(status, model)] * count)

    def take(self, model: str) -> int | None:
        """Consume and return the status planned for this invocation, or None."""
        with self._lock:
            for i, (status, target) in enumerate(self._queue):
                if target in {None, model}:
                    del self._queue[i]
                    return status
        return None

    def pending(self) -> int:
        """Number of planned failures not consumed yet."""
        with self._lock:
            return len(self._queue)


@dataclass
class _State:
    latency_ms: float
    faults: FaultPlan
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: dict[str, int] = field(default_factory=dict)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks up a FQDN, which can stall on a host without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, _request: object, client_address: object) -> None:
        # Not to stderr: the demo's terminal belongs to the daemon's logs.
        _log.exception("model server request failed", extra={"client": client_address})


class _BadRequestError(Exception):
    pass


def _decode_png(body: bytes, content_type: str) -> U8:
    if content_type != "image/png":
        raise _BadRequestError(f"Content-Type must be image/png, not {content_type}")
    if not body.startswith(_PNG_SIGNATURE):
        raise _BadRequestError("request body is not a PNG image")
    try:
        with Image.open(io.BytesIO(body), formats=["PNG"]) as image:
            image.load()
            if image.mode not in {"I", "I;16", "I;16B", "I;16L", "F"}:
                return np.asarray(image.convert("L"), dtype=np.uint8)
            return _to_gray(np.asarray(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _BadRequestError(f"cannot decode PNG: {exc}") from exc


def _run_model(model: str, pixels: U8) -> tuple[bytes, str]:
    if model == "segmentation":
        out = io.BytesIO()
        Image.fromarray(segment(pixels)).save(out, format="PNG", compress_level=1)
        return out.getvalue(), "image/png"
    return json.dumps(classify(pixels)).encode(), "application/json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real container behind a client pool
    server_version = "cxrd-reference-model/1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        _log.debug("model server %s %s", self.address_string(), format % args)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        route = _ROUTES.get(path)
        if route is None:
            self._send_json(404, {"message": f"no such path: {path or '/'}"}, close=True)
        elif self.command != route[0]:
            message = {"message": f"method {self.command} not allowed on {path}"}
            self._send_json(405, message, close=True, allow=route[0])
        elif route[1] is None:
            self._send_json(200, {"status": "Healthy", "model": MODEL_NAME})
        else:
            self._invoke(route[1])

    def _invoke(self, model: str) -> None:
        body = self._read_body()
        if body is None:
            return
        state = cast("_HTTPServer", self.server).state
        with state.lock:
            state.calls[model] = state.calls.get(model, 0) + 1
        state.stopping.wait(state.latency_ms / 1000.0)  # simulated model time
        status = state.faults.take(model)
        if status is not None:
            self._send_json(status, {"message": _FAULT_MESSAGES.get(status, "injected fault")})
            return
        try:
            pixels = _decode_png(body, self.headers.get_content_type())
            payload, content_type = _run_model(model, pixels)
        except _BadRequestError as exc:
            self._send_json(400, {"message": str(exc)})
            return
        self._send(200, payload, content_type)

    def _read_body(self) -> bytes | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._send_json(411, {"message": "Content-Length required"}, close=True)
            return None
        length = int(raw) if raw.strip().isdigit() else -1
        if not 0 <= length <= MAX_BODY_BYTES:
            message = f"body must be 0..{MAX_BODY_BYTES} bytes, got Content-Length {raw}"
            self._send_json(
                413 if length > MAX_BODY_BYTES else 400, {"message": message}, close=True
            )
            return None
        return self.rfile.read(length)

    def _send_json(
        self, status: int, doc: dict[str, Any], *, close: bool = False, allow: str | None = None
    ) -> None:
        headers = {"Allow": allow} if allow else {}
        self._send(status, json.dumps(doc).encode(), "application/json", close=close, **headers)

    def _send(
        self, status: int, payload: bytes, content_type: str, *, close: bool = False, **extra: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in extra.items():
            self.send_header(name, value)
        if close:  # an unread body would poison the next request on this connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class ModelServer:
    """The reference model server on one port; `start()` serves from a daemon thread.

    Attributes:
        faults: the :class:`FaultPlan` consulted on every invocation.
        latency_ms: added to every invocation (not to pings); may be changed live.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0) -> None:
        self.faults = FaultPlan()
        self._state = _State(latency_ms=latency_ms, faults=self.faults)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def latency_ms(self) -> float:
        """Simulated model time per invocation, in milliseconds."""
        return self._state.latency_ms

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        self._state.latency_ms = value

    def start(self) -> Self:
        """Bind and serve from a daemon thread; return at once.

        Raises:
            OSError: the address cannot be bound.
            RuntimeError: the server is already started.
        """
        if self._httpd is not None:
            raise RuntimeError("model server already started")
        self._state.stopping.clear()
        self._httpd = _HTTPServer(self._address, self._state)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() waits for the loop to notice
            name="cxrd-model-server",
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server (the bases hang off it).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._httpd is None:
            raise RuntimeError("model server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def invocations(self, model: str | None = None) -> int:
        """Invocations received so far (faulted ones included), of `model` or of all."""
        with self._state.lock:
            calls = dict(self._state.calls)
        return calls.get(model, 0) if model else sum(calls.values())

    def stop(self) -> None:
        """Stop serving, cut simulated latency short and close the socket. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc_info: object) -> None:
        self.stop()


def serve_forever(host: str = "127.0.0.1", port: int = 8080, latency_ms: float = 0) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly (for ``cxrd model-server``).

    Must run in the main thread (it installs signal handlers, restored on return).

    Raises:
        OSError: the address cannot be bound.
    """
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ModelServer(host, port, latency_ms) as server:
            sys.stdout.write(
                f"cxrd reference model server listening on {server.url}"
                " (/segmentation, /classification): NOT a medical model,"
                " a deterministic stand-in for demos and tests\n"
            )
            sys.stdout.flush()
            while not stop.wait(1.0):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
