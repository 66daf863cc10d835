"""A processed study for people to look at: overlays and a summary of its outputs.

Pure computation (Pillow and numpy; bytes in, images and text out): over the
8-bit rendering sent to the models, the segmentation mask as one coloured
contour per label and the findings' boxes with label and probability; and a
short table of a study's archived outputs (``result.json``, ``report.json``,
its S3 keys). Used by ``cxrd demo``; an illustration of what the models
returned, not a diagnostic display.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# DESIGN.md "Model endpoints": pixel value = label.
LABELS: dict[int, tuple[str, tuple[int, int, int]]] = {
    1: ("right lung", (0, 190, 255)),
    2: ("left lung", (60, 230, 60)),
    3: ("heart", (255, 70, 70)),
}
BOX_COLOUR = (255, 210, 0)
TEXT_COLOUR = (255, 255, 255)
BACKDROP = (0, 0, 0)
FILL_ALPHA = 0.18  # how much of a label's colour tints the region under it

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class Box:
    """One finding to draw: its box is in model-input pixels, ``[x0, y0, x1, y1)``."""

    label: str
    probability: float
    bbox: tuple[int, int, int, int]


def draw_overlay(
    image: Image.Image,
    mask: Image.Image,
    boxes: Sequence[Box] = (),
    input_size: tuple[int, int] | None = None,
) -> Image.Image:
    """An RGB copy of ``image`` with the mask's label contours, the boxes and a legend.

    ``mask`` (one channel, pixel value = label) and the boxes are in model-input
    pixels of ``input_size`` (width, height; the mask's size when None); both are
    scaled to ``image``, which may be the full-size rendering.

    Raises:
        ValueError: ``mask`` is not a single-channel image.
    """
    if mask.mode not in {"L", "P", "I", "I;16"}:
        raise ValueError(f"mask must be a single-channel image, not mode {mask.mode}")
    base = image.convert("RGB")
    labels = np.asarray(mask.convert("L").resize(base.size, Image.Resampling.NEAREST))
    width = line_width(base.size)
    pixels = np.asarray(base, dtype=np.float32).copy()
    for value, (_name, colour) in LABELS.items():
        region = labels == value
        if region.any():
            _paint(pixels, region, colour, width)
    out = Image.fromarray(np.rint(pixels).astype(np.uint8), mode="RGB")
    scale = _scale(input_size or mask.size, base.size)
    draw = ImageDraw.Draw(out)
    font = _font(base.size)
    _draw_legend(draw, base.size, font, present={int(v) for v in np.unique(labels)})
    for box in boxes:  # over the legend: a finding matters more than the key
        _draw_box(draw, box, scale, width, font)
    return out


def line_width(size: tuple[int, int]) -> int:
    """Contour and box line width for an image of ``size``: about 1/250 of its short side."""
    return max(1, round(min(size) / 250))


def contour(region: np.ndarray) -> np.ndarray:
    """Boolean edge of ``region``: its pixels with a 4-neighbour outside it (or the border)."""
    padded = np.pad(region, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & region
    edge: np.ndarray = region & ~inner
    return edge


def _paint(
    pixels: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], width: int
) -> None:
    """Tint ``region`` lightly and draw its contour ``width`` pixels wide, in place."""
    tint = np.asarray(colour, dtype=np.float32)
    pixels[region] = pixels[region] * (1 - FILL_ALPHA) + tint * FILL_ALPHA
    edge = contour(region)
    if width > 1:
        grown = Image.fromarray(edge.astype(np.uint8) * 255).filter(
            ImageFilter.MaxFilter(2 * (width // 2) + 1)
        )
        edge = np.asarray(grown) > 0
    pixels[edge] = tint


def _scale(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float]:
    """(x, y) factors from ``source`` pixels to ``target`` pixels."""
    return target[0] / max(source[0], 1), target[1] / max(source[1], 1)


def _font(size: tuple[int, int]) -> Font:
    """Pillow's built-in font, about 1/32 of the short side tall (at least 11 px)."""
    return ImageFont.load_default(size=max(11, min(size) // 32))


def _draw_box(
    draw: ImageDraw.ImageDraw, box: Box, scale: tuple[float, float], width: int, font: Font
) -> None:
    """The box outline and, above it (inside when at the top edge), its label."""
    x0, y0, x1, y1 = box.bbox
    sx, sy = scale
    rect = (round(x0 * sx), round(y0 * sy), max(round(x1 * sx) - 1, 0), max(round(y1 * sy) - 1, 0))
    draw.rectangle(rect, outline=BOX_COLOUR, width=width + 1)
    text = f"{box.label} {box.probability:.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    pad = max(2, width)
    ty = rect[1] - th - 2 * pad if rect[1] - th - 2 * pad >= 0 else rect[1] + width + 1
    draw.rectangle((rect[0], ty, rect[0] + tw + 2 * pad, ty + th + 2 * pad), fill=BOX_COLOUR)
    draw.text((rect[0] + pad - left, ty + pad - top), text, fill=BACKDROP, font=font)


def _draw_legend(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], font: Font, present: set[int]
) -> None:
    """Colour key of the mask labels found in the image, bottom left."""
    entries = [(name, colour) for value, (name, colour) in LABELS.items() if value in present]
    if not entries:
        return
    _left, top, _right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    step = bottom - top + 6
    x, y = 6, size[1] - 6 - step * len(entries)
    for name, colour in entries:
        draw.rectangle((x, y + 2, x + step - 6, y + step - 4), fill=colour)
        draw.text((x + step, y - top + 1), name, fill=TEXT_COLOUR, font=font, stroke_width=1,
                  stroke_fill=BACKDROP)  # fmt: skip
        y += step


def boxes_of(findings: Sequence[Mapping[str, Any]], threshold: float = 0.5) -> list[Box]:
    """The findings of a ``result.json`` instance that have a box and reach ``threshold``."""
    boxes = []
    for f in findings:
        if f.get("bbox") and float(f["probability"]) >= threshold:
            x0, y0, x1, y1 = (int(v) for v in f["bbox"])
            boxes.append(Box(str(f["label"]), float(f["probability"]), (x0, y0, x1, y1)))
    return boxes


def overlay_of(
    instance: Mapping[str, Any], rendering: bytes, mask: bytes, threshold: float = 0.5
) -> Image.Image:
    """The overlay of one ``classification/result.json`` instance from its archived files.

    ``rendering`` is ``input/original/{sop}.jpg``, ``mask`` is
    ``segmentation/masks/{sop}_mask.png``; boxes are drawn for findings at or
    above ``threshold``.

    Raises:
        OSError: a file is not a readable image.
        KeyError, ValueError: the instance lacks ``input_size`` or ``findings``.
    """
    width, height = instance["input_size"]
    with Image.open(io.BytesIO(rendering)) as picture, Image.open(io.BytesIO(mask)) as labels:
        boxes = boxes_of(instance["findings"], threshold)
        return draw_overlay(picture, labels, boxes, input_size=(int(width), int(height)))


@dataclass(frozen=True)
class StudyView:
    """What ``study_view`` makes: table lines, and overlay images by file name."""

    lines: list[str]
    overlays: dict[str, Image.Image]


def study_view(
    name: str, root: str, fetch: Callable[[str], bytes], keys: Sequence[str]
) -> StudyView:
    """Table and overlays of one processed study from its archived outputs.

    ``root`` is the study's key prefix (ending in "/"), ``fetch`` reads one key,
    ``keys`` are the study's keys. Per image: view, top three findings, overlay
    file ``{name}-{n}-{view}.png``; then the report's first line and the keys.

    Raises:
        OSError, KeyError, ValueError: an output is missing or malformed
            (and whatever ``fetch`` raises).
    """
    result = json.loads(fetch(root + "classification/result.json"))
    report = json.loads(fetch(root + "report/report.json"))
    lines = [f"  {'view':<5} {'top findings (probability)':<52} overlay"]
    overlays: dict[str, Image.Image] = {}
    for n, image in enumerate(result["instances"], start=1):
        ranked = sorted(image["findings"], key=lambda f: -float(f["probability"]))
        top = ", ".join(f"{f['label']} {f['probability']:.2f}" for f in ranked[:3])
        file_name = f"{name}-{n}-{image['view'] or 'NA'}.png"
        sop = image["sop_uid"]
        overlays[file_name] = overlay_of(
            image, fetch(f"{root}input/original/{sop}.jpg"),
            fetch(f"{root}segmentation/masks/{sop}_mask.png"),
        )  # fmt: skip
        lines.append(f"  {image['view'] or '-':<5} {top:<52} {file_name}")
    lines.append(f"  report: {(str(report['text']).strip().splitlines() or [''])[0]}")
    lines.append(f"  S3 {root}")
    lines += [f"    {key.removeprefix(root)}" for key in keys]
    return StudyView(lines, overlays)
