"""cxr_daemon.decoding: imagecodecs decodes what pydicom decodes, checked before allocating."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGBaseline8Bit
from structlog.testing import capture_logs

from cxr_daemon import decoding
from cxr_daemon.errors import InvalidDicomError, UndecodablePixelDataError
from cxr_daemon.imaging import render_8bit
from cxr_daemon.sandbox.phantom import write_chest_phantom

if TYPE_CHECKING:
    from pathlib import Path

    from pydicom.dataset import Dataset


def phantom(tmp_path: Path, syntax: UID, bits_stored: int = 12, **kwargs: object) -> Dataset:
    path = write_chest_phantom(
        tmp_path / "p.dcm", rows=150, cols=120, bits_stored=bits_stored,
        transfer_syntax=syntax, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return dcmread(path)


@pytest.mark.parametrize(
    ("syntax", "bits", "tolerance"),
    [
        (JPEG2000Lossless, 12, 0),
        (JPEG2000Lossless, 16, 0),
        (JPEG2000, 12, 0),  # lossy stream, but both decode it with OpenJPEG: identical
        (JPEGBaseline8Bit, 8, 1),  # libjpeg-turbo vs libjpeg IDCT rounding
    ],
)
def test_decodes_like_pydicom(tmp_path: Path, syntax: UID, bits: int, tolerance: int) -> None:
    """Same shape, same type, same values (lossy JPEG: within IDCT rounding)."""
    ds = phantom(tmp_path, syntax, bits)
    ours = decoding.decode_frame(ds, syntax)
    reference = pixel_array(ds, index=0)
    assert ours.shape == reference.shape == (150, 120)
    assert ours.dtype == reference.dtype
    assert np.abs(ours.astype(np.int32) - reference.astype(np.int32)).max() <= tolerance


def test_signed_jpeg2000_keeps_negative_values(tmp_path: Path) -> None:
    """PixelRepresentation 1: negative stored values come back negative, as pydicom reads them."""
    ds = phantom(tmp_path, UID("1.2.840.10008.1.2.1"), 16)
    values = (ds.pixel_array.astype(np.int32) - 32768).astype(np.int16)
    ds.set_pixel_data(values, "MONOCHROME2", bits_stored=16)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ours = decoding.decode_frame(ds, JPEG2000Lossless)
    assert ours.dtype == np.int16
    assert ours.min() < 0
    assert np.array_equal(ours, values)


def test_unsigned_samples_are_sign_extended_from_bits_stored() -> None:
    """A codec that returns 12-bit two's complement as uint16 (JPEG Lossless, JPEG-LS)."""
    raw = np.array([[0x0FFF, 0x0800, 0x07FF, 0x0001]], np.uint16)  # -1, -2048, 2047, 1
    assert decoding._as_stored(raw.copy(), 1, 12).tolist() == [[-1, -2048, 2047, 1]]


def test_bits_above_bits_stored_are_cleared_when_unsigned() -> None:
    """Unsigned: whatever sits above BitsStored is not part of the value (pydicom does the same)."""
    raw = np.array([[0xF123, 0x0FFF]], np.uint16)
    assert decoding._as_stored(raw.copy(), 0, 12).tolist() == [[0x0123, 0x0FFF]]


def test_codestream_larger_than_header_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small header in front of a bigger codestream never reaches the decoder."""
    ds = phantom(tmp_path, JPEG2000Lossless)
    ds.Rows, ds.Columns = 15, 12
    calls: list[bytes] = []
    monkeypatch.setitem(decoding._DECODERS, JPEG2000Lossless, calls.append)
    with pytest.raises(InvalidDicomError, match=r"codestream is 120x150, the header says 12x15"):
        decoding.decode_frame(ds, JPEG2000Lossless)
    assert calls == []


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGBaseline8Bit])
def test_codestream_size_is_read_from_the_stream(tmp_path: Path, syntax: UID) -> None:
    ds = phantom(tmp_path, syntax, 8 if syntax == JPEGBaseline8Bit else 12)
    data = get_frame(ds.PixelData, 0, number_of_frames=1)
    assert decoding.codestream_size(data, syntax == JPEG2000Lossless) == (120, 150)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"not a jpeg"])
def test_unparsable_jpeg_header_gives_no_size(data: bytes) -> None:
    assert decoding.codestream_size(data, j2k=False) is None


def test_a_stream_the_codec_rejects_goes_to_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """imagecodecs failing is not the end: pydicom's decoders get the stream and it renders."""

    def rejects(_data: bytes) -> np.ndarray:
        raise RuntimeError("opj_decode failed")

    ds = phantom(tmp_path, JPEG2000Lossless)
    expected = render_8bit(ds).pixels
    monkeypatch.setitem(decoding._DECODERS, JPEG2000Lossless, rejects)
    with capture_logs() as logs:
        rendered = render_8bit(ds).pixels
    assert np.array_equal(rendered, expected)
    fallbacks = [e for e in logs if e["event"] == "decode_fallback_pydicom"]
    assert fallbacks
    assert "opj_decode failed" in fallbacks[0]["reason"]


def test_garbage_stream_is_an_invalid_dicom_error_naming_the_syntax(tmp_path: Path) -> None:
    """Neither imagecodecs nor pydicom can read it: one error that names the transfer syntax."""
    ds = phantom(tmp_path, JPEG2000Lossless)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[:120] + b"\x00" * 60])  # sound header, no tiles
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(
        UndecodablePixelDataError, match=r"cannot decode JPEG 2000 Image Compression \(Lossless"
    ):
        render_8bit(ds)


def test_handles_the_jpeg_family_only() -> None:
    assert decoding.handles(JPEG2000Lossless)
    assert decoding.handles(UID("1.2.840.10008.1.2.4.51"))  # JPEG Extended 12-bit
    assert decoding.handles(UID("1.2.840.10008.1.2.4.80"))  # JPEG-LS lossless
    assert not decoding.handles(UID("1.2.840.10008.1.2.5"))  # RLE: pydicom's own decoder
    assert not decoding.handles(UID("1.2.840.10008.1.2.1"))
