"""Where (b)'s time goes: ``cxrd run --once`` (workers=1, instant models) under py-spy.

py-spy samples every thread of the real process from outside (``--idle`` keeps
the samples of a thread blocked on a socket, so waiting on Orthanc, S3, the
models or the database shows up as the step that waits). Each sample is put in
one bucket by the innermost cxrd frame it passes through; the summary is the
share of samples per bucket. A pyinstrument text profile of the same run is
written next to it for reading by hand.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from experiments import Context, daemon_run

OUT = Path(__file__).resolve().parent / "profiles"
# (bucket, pattern on one frame); the first pattern matched from the innermost frame out wins.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("decode pixel data (pydicom/pylibjpeg)", r"^_decode \(.*imaging\.py"),
    ("read DICOM header (dcmread)", r"^read_dicom \(.*imaging\.py"),
    ("render: LUT + window", r"^render_8bit \(.*imaging\.py|^_voi_curve \("),
    ("JPEG encode", r"^encode_jpeg \("),
    ("model PNG: resize + encode", r"^model_input_png \("),
    ("S3 PUT (boto3 -> moto)", r"S3ObjectStore\.put"),
    ("Orthanc GET file", r"OrthancClient\.download_instance"),
    ("Orthanc lookup + feed", r"adapters/orthanc\.py|poller\.py"),
    ("model calls (HTTP)", r"adapters/sagemaker\.py"),
    ("model answer checks", r"modelio\.py"),
    ("SQL (DB adapter)", r"adapters/(db|sql)\.py"),
    ("report (template)", r"adapters/bedrock\.py|reporting|template"),
    ("logging", r"structlog|logconf\.py"),
    ("start-up: imports", r"^_find_and_load \("),
    ("pipeline glue (temp files, JSON, journal)", r"pipeline\.py|journal\.py"),
)


def profile(ctx: Context) -> dict[str, Any]:
    """Profile one (b) run with py-spy (and one with pyinstrument); the bucket summary."""
    OUT.mkdir(exist_ok=True)
    result: dict[str, Any] = {}
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy:
        raw = OUT / "once_w1.pyspy.txt"
        wrapper = (spy, "record", "--idle", "--rate", "200", "--format", "raw",
                   "--output", str(raw), "--")  # fmt: skip
        daemon_run(ctx, workers=1, latency_ms=0, wrapper=wrapper)
        ctx.say(f"profile: py-spy raw stacks in {raw}")
        result["py_spy"] = summarise(raw)
        flame = OUT / "once_w1.speedscope.json"
        daemon_run(ctx, workers=1, latency_ms=0, wrapper=(
            spy, "record", "--idle", "--rate", "200", "--format", "speedscope",
            "--output", str(flame), "--"))  # fmt: skip
        # With several studies in flight the question is what holds the GIL:
        # --gil keeps only the samples of the thread holding it.
        gil = OUT / "w8_gil.pyspy.txt"
        daemon_run(ctx, workers=8, latency_ms=0, wrapper=(
            spy, "record", "--gil", "--rate", "200", "--format", "raw",
            "--output", str(gil), "--"))  # fmt: skip
        ctx.say(f"profile: py-spy GIL holders at workers=8 in {gil}")
        result["py_spy_gil_w8"] = summarise(gil)
    instrument = shutil.which("pyinstrument", path=str(Path(sys.executable).parent))
    if instrument:
        text = OUT / "once_w1.pyinstrument.txt"
        daemon_run(ctx, workers=1, latency_ms=0, wrapper=(
            instrument, "--renderer", "text", "--outfile", str(text)))  # fmt: skip
        ctx.say(f"profile: pyinstrument in {text}")
        result["pyinstrument"] = str(text)
    return result


def _samples(raw: Path) -> list[tuple[list[str], int]]:
    """(frames outermost first, count) per distinct stack of py-spy's raw output."""
    stacks = []
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def bucket_of(frames: list[str]) -> str:
    """The bucket of one stack: the innermost frame that matches a bucket pattern."""
    for frame in reversed(frames):
        for name, pattern in BUCKETS:
            if re.search(pattern, frame):
                return name
    return "other (interpreter, main loop, idle)"


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Share of samples per bucket, and the functions with the most self samples."""
    stacks = _samples(raw)
    total = sum(count for _frames, count in stacks) or 1
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in stacks:
        buckets[bucket_of(frames)] += count
        leaves[_short(frames[-1])] += count
    return {
        "samples": total,
        "share_by_step": {k: round(100 * v / total, 1) for k, v in buckets.most_common()},
        "top_self": {k: round(100 * v / total, 1) for k, v in leaves.most_common(top)},
    }


def _short(frame: str) -> str:
    """``function (path:line)`` with the path cut to its package-relative tail."""
    match = re.match(r"(.*) \((.*):(\d+)\)$", frame)
    if not match:
        return frame
    function, path, _line = match.groups()
    tail = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", path)
    return f"{function} ({tail})"
