"""Overlay drawing on synthetic images and masks: contours, boxes, scaling, study tables."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cxr_daemon.overlay import (
    BOX_COLOUR,
    LABELS,
    Box,
    boxes_of,
    contour,
    draw_overlay,
    line_width,
    overlay_of,
    study_view,
)

GREY = 100


def synthetic(width: int = 200, height: int = 160) -> tuple[Image.Image, Image.Image]:
    """A flat grey image and a mask with right lung, left lung and heart rectangles."""
    image = Image.new("L", (width, height), GREY)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[20:100, 20:80] = 1
    mask[20:100, 120:180] = 2
    mask[80:120, 85:115] = 3
    return image, Image.fromarray(mask)


def rgb(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    r, g, b = image.getpixel((x, y))  # type: ignore[misc]
    return int(r), int(g), int(b)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_contour_is_the_region_edge_only() -> None:
    """A filled 10x10 square's contour is its 36 border pixels; the inside stays clear."""
    region = np.zeros((20, 20), dtype=bool)
    region[5:15, 5:15] = True
    edge = contour(region)
    assert edge.sum() == 36
    assert edge[5, 5]
    assert edge[14, 9]
    assert not edge[9, 9]
    assert not (edge & ~region).any()


def test_overlay_is_rgb_same_size_with_label_contours_and_tint() -> None:
    """Each label's edge is drawn in its colour, its inside tinted, the background untouched."""
    image, mask = synthetic()
    out = draw_overlay(image, mask)
    assert out.mode == "RGB"
    assert out.size == image.size
    for value, (x_edge, y_edge, x_in, y_in) in {1: (20, 50, 50, 60), 2: (179, 50, 150, 60)}.items():
        colour = LABELS[value][1]
        assert rgb(out, x_edge, y_edge) == colour
        inside = rgb(out, x_in, y_in)
        assert inside not in {colour, (GREY, GREY, GREY)}
    assert rgb(out, 100, 100) != (GREY, GREY, GREY)  # heart tinted
    assert rgb(out, 195, 5) == (GREY, GREY, GREY)  # background, far from legend and labels


def test_boxes_are_scaled_from_model_input_and_labelled() -> None:
    """A box given in half-size model-input pixels lands at full size, with its label above."""
    image, mask = synthetic()
    small_mask = mask.resize((100, 80), Image.Resampling.NEAREST)
    box = Box("Nodule", 0.87, (30, 40, 60, 70))  # -> (60, 80)-(119, 139) at full size
    out = draw_overlay(image, small_mask, [box], input_size=(100, 80))
    assert rgb(out, 60, 110) == BOX_COLOUR  # left edge
    assert rgb(out, 90, 139) == BOX_COLOUR  # bottom edge
    assert rgb(out, 119, 110) == BOX_COLOUR  # right edge
    label_band = np.asarray(out)[60:80, 60:120]  # the tag sits just above the box
    assert (label_band == BOX_COLOUR).all(axis=2).any()
    assert rgb(out, 20, 50) == LABELS[1][1]  # the mask was scaled back up too


def test_line_width_grows_with_the_image() -> None:
    """Thin lines on small images, about 1/250 of the short side on large ones."""
    assert line_width((100, 100)) == 1
    assert line_width((2000, 2500)) == 8


def test_colour_mask_is_refused() -> None:
    """A mask must be single channel: pixel value = label."""
    image, _mask = synthetic()
    with pytest.raises(ValueError, match="single-channel"):
        draw_overlay(image, Image.new("RGB", image.size))


def test_boxes_of_keeps_findings_with_a_box_at_or_above_threshold() -> None:
    """Findings without a bbox or under the threshold get no box."""
    findings = [
        {"label": "Nodule", "probability": 0.5, "bbox": [1, 2, 3, 4]},
        {"label": "Effusion", "probability": 0.49, "bbox": [1, 2, 3, 4]},
        {"label": "Pneumothorax", "probability": 0.9, "bbox": None},
    ]
    assert boxes_of(findings) == [Box("Nodule", 0.5, (1, 2, 3, 4))]


def test_study_view_builds_table_and_overlays_from_archived_outputs() -> None:
    """result.json + report.json + JPEG + mask -> one table row and one overlay per image."""
    image, mask = synthetic()
    root = "demo/studies/1.2.3/"
    result = {
        "instances": [
            {
                "sop_uid": "1.2.3.4",
                "view": "PA",
                "input_size": [200, 160],
                "findings": [
                    {"label": "Effusion", "probability": 0.12, "bbox": None},
                    {"label": "Nodule", "probability": 0.81, "bbox": [30, 40, 60, 70]},
                ],
            }
        ]
    }
    objects = {
        root + "classification/result.json": json.dumps(result).encode(),
        root + "report/report.json": json.dumps({"text": "First line.\nMore."}).encode(),
        root + "input/original/1.2.3.4.jpg": png(image, "JPEG"),
        root + "segmentation/masks/1.2.3.4_mask.png": png(mask),
    }
    view = study_view("sample", root, objects.__getitem__, sorted(objects))
    assert list(view.overlays) == ["sample-1-PA.png"]
    assert view.overlays["sample-1-PA.png"].size == (200, 160)
    text = "\n".join(view.lines)
    assert "PA    Nodule 0.81, Effusion 0.12" in text
    assert "report: First line." in text
    assert "    segmentation/masks/1.2.3.4_mask.png" in text


def test_overlay_of_reads_the_archived_files() -> None:
    """overlay_of decodes the JPEG and mask bytes and draws the boxes above threshold."""
    image, mask = synthetic()
    instance = {
        "input_size": [200, 160],
        "findings": [{"label": "Nodule", "probability": 0.9, "bbox": [10, 130, 50, 150]}],
    }
    out = overlay_of(instance, png(image, "JPEG"), png(mask))
    assert out.mode == "RGB"
    assert rgb(out, 10, 140) == BOX_COLOUR
