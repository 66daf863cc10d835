"""The encodings cxrd ships of an 8-bit rendering: the archive JPEG and the model-input PNG."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import numpy.typing as npt


def encode_jpeg(pixels: npt.NDArray[np.uint8], quality: int = 90) -> bytes:
    """Encode an 8-bit grayscale image as baseline JPEG.

    Raises:
        ValueError: pixels is not a 2-D uint8 array, or quality is outside 1..100.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality} outside 1..100")
    # libjpeg-turbo through imagecodecs: the same bytes Pillow writes, in the same
    # time, but with the GIL released (Pillow holds it for the whole encode).
    return bytes(imagecodecs.jpeg8_encode(_checked(pixels), level=quality))


def model_input_png(pixels: npt.NDArray[np.uint8], max_side: int) -> tuple[bytes, tuple[int, int]]:
    """Downscale (never upscale, aspect kept) so the longest side <= max_side; encode PNG.

    Returns:
        The PNG bytes (mode "L") and its (width, height).

    Raises:
        ValueError: pixels is not a 2-D uint8 array, or max_side < 1.
    """
    if max_side < 1:
        raise ValueError(f"max_side {max_side} must be at least 1")
    image = _as_image(pixels)
    width, height = image.size
    scale = max_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # reducing_gap=1: box-reduce by the largest integer factor, then Lanczos for
        # the rest. On a 2500x3000 CXR: 14 ms instead of 33 ms for pure Lanczos, and
        # within 0.3 grey levels of it on average.
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=1.0)
    buffer = io.BytesIO()
    # zlib level 1: 24 ms and ~17% larger than level 6 (125 ms) at 1024 px;
    # the size is far below any request limit, the time is per image.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), image.size


def _as_image(pixels: npt.NDArray[np.uint8]) -> Image.Image:
    """Wrap a 2-D uint8 array as a Pillow "L" image."""
    return Image.fromarray(_checked(pixels))


def _checked(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``pixels`` as a C-contiguous 2-D uint8 array, or ValueError."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"need a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    return np.ascontiguousarray(pixels)
