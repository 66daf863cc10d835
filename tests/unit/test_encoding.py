"""cxr_daemon.encoding: the archive JPEG and the model-input PNG of a rendering."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_daemon.encoding import encode_jpeg, model_input_png
from cxr_daemon.imaging import render_8bit
from tests.unit.test_imaging import chest_16bit, make_ds


def test_encode_jpeg_decodes_back_to_grayscale_of_same_size() -> None:
    """The JPEG is baseline grayscale ("L") with the rendering's width and height."""
    pixels = render_8bit(make_ds(chest_16bit(300, 200))).pixels
    data = encode_jpeg(pixels)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.mode == "L"
        assert image.size == (200, 300)
        decoded = np.asarray(image)
    assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 3


def test_encode_jpeg_quality_changes_size() -> None:
    """Lower quality gives a smaller file; quality outside 1..100 is refused."""
    pixels = render_8bit(make_ds(chest_16bit(300, 200))).pixels
    assert len(encode_jpeg(pixels, quality=30)) < len(encode_jpeg(pixels, quality=95))
    with pytest.raises(ValueError, match="quality 0"):
        encode_jpeg(pixels, quality=0)


def test_encoders_refuse_non_uint8_or_non_2d_arrays() -> None:
    """Only 2-D uint8 arrays are images here."""
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_jpeg(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="2-D uint8"):
        model_input_png(np.zeros((4, 4, 3), np.uint8), 1024)


@pytest.mark.parametrize(
    ("shape", "max_side", "size"),
    [
        pytest.param((3000, 2500), 1024, (853, 1024), id="portrait"),
        pytest.param((2000, 2500), 1024, (1024, 819), id="landscape"),
        pytest.param((2048, 2048), 1024, (1024, 1024), id="square"),
        pytest.param((1024, 900), 1024, (900, 1024), id="exact-fit"),
        pytest.param((500, 400), 1024, (400, 500), id="never-upscale"),
        pytest.param((4000, 10), 100, (1, 100), id="thin-keeps-a-pixel"),
    ],
)
def test_model_input_png_sizes(
    shape: tuple[int, int], max_side: int, size: tuple[int, int]
) -> None:
    """Longest side <= max_side, aspect kept, never upscaled; PNG "L" of the reported size."""
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data, reported = model_input_png(pixels, max_side)
    assert reported == size
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "L"
        assert image.size == size


def test_model_input_png_keeps_content_when_not_resized() -> None:
    """An image already small enough is encoded losslessly, pixel for pixel."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    data, _ = model_input_png(pixels, 1024)
    with Image.open(io.BytesIO(data)) as image:
        assert np.array_equal(np.asarray(image), pixels)


def test_model_input_png_rejects_nonpositive_max_side() -> None:
    """max_side must be at least 1."""
    with pytest.raises(ValueError, match="max_side 0"):
        model_input_png(np.zeros((4, 4), np.uint8), 0)
