"""The model I/O contract (DESIGN "Model endpoints"), checked on every answer.

A model that answers outside the contract is a permanent failure of the study
with a reason that says what was wrong: a wrong-sized mask or a probability of
1.7 must never reach the archive or a report.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_daemon.errors import PermanentError
from cxr_daemon.ports import FindingRecord

MASK_LABELS = frozenset({0, 1, 2, 3})  # background, right lung, left lung, heart


def check_mask(body: bytes, size: tuple[int, int]) -> None:
    """Check a segmentation answer: a single-channel PNG of the input's size, labels 0-3.

    Raises:
        PermanentError: anything else.
    """
    try:
        with Image.open(io.BytesIO(body)) as mask:
            fmt, mode, got = mask.format, mask.mode, mask.size
            labels = set(np.unique(np.asarray(mask)).tolist())
    except (UnidentifiedImageError, OSError, ValueError):
        raise PermanentError("segmentation contract broken: answer is not an image") from None
    broken = "segmentation contract broken"
    if fmt != "PNG":
        raise PermanentError(f"{broken}: {fmt} is not PNG")
    if mode not in ("L", "P", "I", "I;16"):
        raise PermanentError(f"{broken}: mode {mode}, not one channel")
    if got != size:
        raise PermanentError(f"{broken}: mask is {got[0]}x{got[1]}, input was {size[0]}x{size[1]}")
    if not labels <= MASK_LABELS:
        raise PermanentError(f"{broken}: labels {sorted(labels)} not in 0-3")


def parse_classification(
    body: bytes, size: tuple[int, int], sop_uid: str
) -> tuple[str, list[FindingRecord]]:
    """Parse a classification answer into (model name:version, findings).

    Raises:
        PermanentError: not JSON, or not the documented shape.
    """
    try:
        answer = json.loads(body)
        model = str(answer["model"])
        findings = [_finding(item, size, sop_uid) for item in _as_list(answer["findings"])]
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentError(f"classification contract broken: {exc}") from None
    return model, findings


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("findings is not a list")
    return value


def _finding(item: Any, size: tuple[int, int], sop_uid: str) -> FindingRecord:
    label = str(item["label"])
    probability = float(item["probability"])
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise ValueError(f"{label} probability {probability} outside 0..1")
    return FindingRecord(sop_uid, label, probability, _bbox(item.get("bbox"), size, label))


def _bbox(raw: Any, size: tuple[int, int], label: str) -> tuple[int, int, int, int] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 4:
        raise ValueError(f"{label} bbox {raw!r} is not [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (round(float(v)) for v in raw)
    width, height = size
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"{label} bbox {raw!r} outside the {width}x{height} input")
    return (x0, y0, x1, y1)


def strongest(findings: Sequence[FindingRecord]) -> list[FindingRecord]:
    """Per label, the image where it is most probable; highest probability first."""
    best: dict[str, FindingRecord] = {}
    for f in findings:
        if f.label not in best or f.probability > best[f.label].probability:
            best[f.label] = f
    return sorted(best.values(), key=lambda f: (-f.probability, f.label))
