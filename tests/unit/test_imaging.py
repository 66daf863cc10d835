"""cxr_daemon.imaging on synthetic DICOM data sets built in memory."""

from __future__ import annotations

import tracemalloc
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from cxr_daemon.errors import InvalidDicomError, PermanentError
from cxr_daemon.imaging import (
    MAX_SIDE,
    check_pixel_module,
    read_dicom,
    render_8bit,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

RAMP_12 = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once


def make_ds(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: Any) -> Dataset:
    """A DX data set holding `pixels` uncompressed, plus any extra attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    bits = 8 * pixels.dtype.itemsize
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def dicom_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear window, computed independently in float64, to 0..255."""
    x = x.astype(np.float64)
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= lo, 0, np.where(x > hi, 255, y))
    return np.rint(y)


def chest_16bit(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A 16-bit MONOCHROME2 phantom: dark lungs, bright mediastinum and body, noise."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = np.full((rows, cols), 2000.0, np.float32)
    body = ((xx - cols / 2) / (0.45 * cols)) ** 2 + ((yy - rows / 2) / (0.5 * rows)) ** 2 < 1
    img[body] = 30000
    for cx in (0.3, 0.7):
        lung = ((xx - cx * cols) / (0.14 * cols)) ** 2 + ((yy - 0.45 * rows) / (0.3 * rows)) ** 2
        img[lung < 1] = 12000
    img += np.random.default_rng(seed).normal(0, 500, img.shape).astype(np.float32)
    return np.clip(img, 0, 65535).astype(np.uint16)


# --- VOI: window, VOI LUT, fallbacks -------------------------------------------------


def test_full_range_window_matches_dicom_linear_formula() -> None:
    """A stored window covering 0..4095 maps every stored value by the DICOM linear formula."""
    ds = make_ds(RAMP_12, WindowCenter=2048, WindowWidth=4096)
    rendering = render_8bit(ds)
    expected = dicom_window(RAMP_12, 2048, 4096)
    assert rendering.method == "voi_window"
    assert rendering.window == (2048.0, 4096.0)
    assert np.abs(rendering.pixels.astype(int) - expected).max() <= 1
    assert rendering.pixels[0, 0] == 0
    assert rendering.pixels[-1, -1] == 255


def test_narrow_window_clips_below_and_above() -> None:
    """Values at or below the window's bottom are black, above its top white, centre mid-grey."""
    center, width = 1000.0, 501.0
    rendering = render_8bit(make_ds(RAMP_12, WindowCenter=center, WindowWidth=width))
    flat = rendering.pixels.ravel()
    assert np.all(flat[:750] == 0)  # 750 = c - 0.5 - (w - 1)/2 -> y_min
    assert np.all(flat[1251:] == 255)  # beyond c - 0.5 + (w - 1)/2 -> y_max
    assert abs(int(flat[1000]) - 128) <= 1  # c - 0.5 is the midpoint of the ramp
    expected = dicom_window(RAMP_12, center, width).ravel()
    assert np.abs(flat.astype(int) - expected).max() <= 1


def test_first_of_several_windows_is_used() -> None:
    """With multi-valued Window Center/Width, the first pair is applied."""
    ds = make_ds(RAMP_12, WindowCenter=[1000, 3000], WindowWidth=[501, 1001])
    assert render_8bit(ds).window == (1000.0, 501.0)


def test_sigmoid_voi_lut_function_puts_center_at_mid_grey() -> None:
    """VOI LUT Function SIGMOID maps the window centre to 128 and stays monotonic."""
    ds = make_ds(RAMP_12, WindowCenter=2048, WindowWidth=2048, VOILUTFunction="SIGMOID")
    flat = render_8bit(ds).pixels.ravel().astype(int)
    assert abs(flat[2048] - 128) <= 1
    assert np.all(np.diff(flat) >= 0)


def test_voi_lut_sequence_is_applied_and_scaled_by_bits_used() -> None:
    """A VOI LUT declared 16-bit but holding 12-bit entries is scaled by 4095, not 65535."""
    entries = (4095 - np.arange(4096)).astype(np.uint16)  # a reversing 12-bit table
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = entries.tolist()
    ds = make_ds(RAMP_12, VOILUTSequence=Sequence([item]), WindowCenter=10, WindowWidth=2)
    rendering = render_8bit(ds)
    assert rendering.method == "voi_lut"
    assert rendering.window is None
    expected = np.rint(entries / 4095 * 255).reshape(RAMP_12.shape)
    assert np.abs(rendering.pixels.astype(int) - expected).max() <= 1


def test_window_outside_the_data_falls_back_to_robust_percentiles() -> None:
    """Like gdcm DX_J2K_0Padding: window 2725/5310 on values 32744..65535 is not used."""
    rng = np.random.default_rng(1)
    pixels = rng.normal(40000, 3000, (300, 300)).clip(32744, 65535).astype(np.uint16)
    pixels[:, 0] = 65535  # a thin padding line (0.3 %) that would dominate min/max
    rendering = render_8bit(make_ds(pixels, WindowCenter=2725, WindowWidth=5310))
    assert rendering.method == "percentile"
    assert rendering.window is not None
    center, width = rendering.window
    assert 36000 < center < 44000
    assert width < 0.7 * (65535 - int(pixels.min()))
    assert rendering.pixels[:, 1:].std() > 30  # real contrast, not a white sheet
    assert np.all(rendering.pixels[:, 0] == 255)


def test_window_of_zero_width_is_ignored() -> None:
    """A stored Window Width of 0 (invalid) is replaced by a window computed from the data."""
    rendering = render_8bit(make_ds(RAMP_12, WindowCenter=2048, WindowWidth=0))
    assert rendering.method == "minmax"


def test_no_window_uses_min_max_like_dcmtk() -> None:
    """Without VOI attributes the data's min..max becomes black..white (c=(min+max+1)/2)."""
    pixels = (RAMP_12 // 4 + 100).astype(np.uint16)  # 100..1123
    rendering = render_8bit(make_ds(pixels))
    assert rendering.method == "minmax"
    assert rendering.window == ((100 + 1123 + 1) / 2, 1123 - 100 + 1)
    assert rendering.pixels.min() == 0
    assert rendering.pixels.max() == 255


def test_no_window_with_outliers_uses_percentiles() -> None:
    """A few extreme pixels do not flatten the image: the 0.5..99.5 percentiles rule."""
    pixels = RAMP_12.copy()
    pixels[0, :8] = 65535
    rendering = render_8bit(make_ds(pixels))
    assert rendering.method == "percentile"
    assert rendering.window is not None
    assert rendering.window[1] < 5000


def test_eight_bit_image_without_window_keeps_its_full_range() -> None:
    """An 8-bit 0..255 image without VOI attributes renders as itself."""
    pixels = np.arange(256, dtype=np.uint8).repeat(4).reshape(32, 32)
    rendering = render_8bit(make_ds(pixels))
    assert np.array_equal(rendering.pixels, pixels)


def test_constant_image_renders_without_error() -> None:
    """A blank (constant) image is rendered, not rejected: there is nothing to divide by."""
    rendering = render_8bit(make_ds(np.full((16, 16), 700, np.uint16)))
    assert rendering.pixels.shape == (16, 16)
    assert len(np.unique(rendering.pixels)) == 1


# --- Modality LUT ---------------------------------------------------------------------


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    """The window is in rescaled units: HU-like values 2*s - 1000 are what it sees."""
    ds = make_ds(RAMP_12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2001)
    rendering = render_8bit(ds)
    expected = dicom_window(RAMP_12.astype(np.float64) * 2 - 1000, 0, 2001)
    assert rendering.method == "voi_window"
    assert np.abs(rendering.pixels.astype(int) - expected).max() <= 1


def test_modality_lut_sequence_is_applied() -> None:
    """A Modality LUT Sequence that reverses the values reverses the rendering."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (4095 - np.arange(4096)).astype(np.uint16).tolist()
    item.ModalityLUTType = "US"
    rendering = render_8bit(make_ds(RAMP_12, ModalityLUTSequence=Sequence([item])))
    flat = rendering.pixels.ravel()
    assert flat[0] == 255
    assert flat[-1] == 0


def test_signed_pixels_are_windowed_by_value_not_bit_pattern() -> None:
    """PixelRepresentation 1: -2048 is black and +2047 white under a window around 0."""
    pixels = (RAMP_12.astype(np.int32) - 2048).astype(np.int16)
    rendering = render_8bit(make_ds(pixels, WindowCenter=0, WindowWidth=4096))
    flat = rendering.pixels.ravel()
    assert flat[0] == 0
    assert flat[-1] == 255
    assert np.all(np.diff(flat.astype(int)) >= 0)


def test_zero_rescale_slope_is_rejected() -> None:
    """Rescale Slope 0 would make every pixel equal: InvalidDicomError, not a grey sheet."""
    with pytest.raises(InvalidDicomError, match="RescaleSlope is 0"):
        render_8bit(make_ds(RAMP_12, RescaleSlope=0, RescaleIntercept=0))


# --- polarity -------------------------------------------------------------------------


def test_monochrome1_is_inverted() -> None:
    """MONOCHROME1 (minimum is white) renders as 255 minus the MONOCHROME2 rendering."""
    mono2 = render_8bit(make_ds(RAMP_12, WindowCenter=2048, WindowWidth=4096))
    mono1 = render_8bit(make_ds(RAMP_12, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096))
    assert mono1.inverted
    assert not mono2.inverted
    assert np.array_equal(mono1.pixels, 255 - mono2.pixels)


def test_monochrome1_with_inverse_shape_is_inverted_once() -> None:
    """DX MONOCHROME1 + Presentation LUT Shape INVERSE is one inversion, not two."""
    plain = render_8bit(make_ds(RAMP_12, "MONOCHROME1"))
    dx = render_8bit(make_ds(RAMP_12, "MONOCHROME1", PresentationLUTShape="INVERSE"))
    assert dx.inverted
    assert np.array_equal(dx.pixels, plain.pixels)
    assert dx.pixels.ravel()[0] == 255  # the minimum stored value is white


def test_monochrome2_with_inverse_shape_is_inverted() -> None:
    """Presentation LUT Shape INVERSE on MONOCHROME2 is honoured: the minimum becomes white."""
    rendering = render_8bit(make_ds(RAMP_12, PresentationLUTShape="INVERSE"))
    assert rendering.inverted
    assert rendering.pixels.ravel()[0] == 255


def test_monochrome2_with_identity_shape_is_not_inverted() -> None:
    """MONOCHROME2 + IDENTITY keeps the minimum black."""
    rendering = render_8bit(make_ds(RAMP_12, PresentationLUTShape="IDENTITY"))
    assert not rendering.inverted
    assert rendering.pixels.ravel()[0] == 0


def test_phantom_lungs_render_darker_than_mediastinum() -> None:
    """On a 16-bit chest phantom the lungs come out darker than the mediastinum."""
    pixels = chest_16bit(600, 500)
    out = render_8bit(make_ds(pixels)).pixels
    lung = out[220:320, 130:170].mean()
    mediastinum = out[220:320, 240:260].mean()
    assert lung + 50 < mediastinum


def test_rendering_pixels_are_read_only_uint8() -> None:
    """The result is a frozen value: uint8, rows x columns, not writeable."""
    rendering = render_8bit(make_ds(RAMP_12))
    assert rendering.pixels.dtype == np.uint8
    assert rendering.pixels.shape == RAMP_12.shape
    with pytest.raises(ValueError, match="read-only"):
        rendering.pixels[0, 0] = 1


# --- check_pixel_module ---------------------------------------------------------------


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return mutate


def _delete(keyword: str) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        delattr(ds, keyword)

    return mutate


def _malformed_frames(ds: Dataset) -> None:
    # As read from pydicom's badVR.dcm: the invalid IS stays a string.
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)


def _truncate(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:-62]


def _huge_header(ds: Dataset) -> None:
    ds.Rows = ds.Columns = MAX_SIDE  # a valid size, but the data is 8 KiB


def _unknown_syntax(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(_set("Rows", 0), "Rows 0 outside 1..16384", id="rows-zero"),
        pytest.param(_set("Columns", 65535), "Columns 65535 outside 1..16384", id="cols-huge"),
        pytest.param(_delete("Rows"), "Rows missing", id="rows-missing"),
        pytest.param(_set("BitsAllocated", 32), "BitsAllocated 32 not supported", id="bits-32"),
        pytest.param(_set("BitsAllocated", 1), "BitsAllocated 1 not supported", id="bits-1"),
        pytest.param(_set("BitsStored", 17), "BitsStored 17 outside 1..BitsAllocated", id="bs"),
        pytest.param(_set("PixelRepresentation", 2), "PixelRepresentation", id="pixrep"),
        pytest.param(_set("SamplesPerPixel", 3), "SamplesPerPixel 3", id="colour"),
        pytest.param(_set("PhotometricInterpretation", "RGB"), "'RGB' is not grayscale", id="rgb"),
        pytest.param(_set("NumberOfFrames", 2), "multi-frame object (2 frames)", id="frames"),
        pytest.param(
            _malformed_frames,
            "NumberOfFrames '1A' is not an integer",
            id="bad-is",
            marks=pytest.mark.filterwarnings("ignore:Invalid value for VR IS"),
        ),
        pytest.param(_truncate, "PixelData holds 8130 bytes", id="truncated"),
        pytest.param(_huge_header, "needs 536870912: truncated", id="header-lies"),
        pytest.param(_unknown_syntax, "unknown transfer syntax 1.2.3.4", id="syntax"),
    ],
)
def test_check_pixel_module_rejects(mutate: Callable[[Dataset], None], message: str) -> None:
    """Each malformed Image Pixel module raises InvalidDicomError naming the problem."""
    ds = make_ds(np.zeros((64, 64), np.uint16))
    mutate(ds)
    with pytest.raises(InvalidDicomError) as caught:
        check_pixel_module(ds)
    assert message in str(caught.value)
    assert isinstance(caught.value, PermanentError)


def test_check_pixel_module_accepts_a_sane_radiograph() -> None:
    """A single-frame 16-bit MONOCHROME2 image with full pixel data passes."""
    check_pixel_module(make_ds(np.zeros((64, 64), np.uint16), NumberOfFrames=1))


def test_render_checks_before_decoding() -> None:
    """render_8bit refuses a lying header before any decoder allocates memory."""
    ds = make_ds(np.zeros((8, 8), np.uint16))
    ds.Rows = ds.Columns = 65535
    with pytest.raises(InvalidDicomError, match="Rows 65535"):
        render_8bit(ds)


def test_undecodable_pixel_data_names_the_transfer_syntax() -> None:
    """Garbage in a JPEG Baseline fragment becomes InvalidDicomError naming the codec."""
    ds = make_ds(np.zeros((64, 64), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8not a jpeg at all\xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(InvalidDicomError, match=r"JPEG Baseline \(Process 1\) \(1\.2\.840"):
        render_8bit(ds)


# --- read_dicom -----------------------------------------------------------------------


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_read_dicom_reads_an_image_file(tmp_path: Path) -> None:
    """A well-formed DX file reads back with its pixel data and transfer syntax."""
    path = _save(make_ds(RAMP_12), tmp_path / "ok.dcm")
    ds = read_dicom(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert render_8bit(ds).pixels.shape == (64, 64)


def test_read_dicom_rejects_a_non_dicom_file(tmp_path: Path) -> None:
    """A PDF is not DICOM: InvalidDicomError says so."""
    path = tmp_path / "x.pdf"
    path.write_bytes(b"%PDF-1.4\n" + b"\0" * 300)
    with pytest.raises(InvalidDicomError, match="not a DICOM file"):
        read_dicom(path)


def test_read_dicom_rejects_an_object_without_pixel_data(tmp_path: Path) -> None:
    """A DX header without PixelData is named as such, with its SOP class."""
    ds = make_ds(RAMP_12)
    del ds.PixelData
    with pytest.raises(
        InvalidDicomError, match=r"no PixelData in this Digital X-Ray Image Storage"
    ):
        read_dicom(_save(ds, tmp_path / "header.dcm"))


def test_read_dicom_rejects_missing_transfer_syntax(tmp_path: Path) -> None:
    """File Meta without TransferSyntaxUID cannot say how the pixels are encoded."""
    path = _save(make_ds(RAMP_12), tmp_path / "ts.dcm")
    ds = read_dicom(path)
    del ds.file_meta.TransferSyntaxUID
    ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    with pytest.raises(InvalidDicomError, match="no TransferSyntaxUID"):
        read_dicom(path)


def test_read_dicom_accepts_a_preamble_less_image(tmp_path: Path) -> None:
    """A bare data set (no preamble, no File Meta) is read leniently when it is an image."""
    ds = make_ds(RAMP_12, WindowCenter=2048, WindowWidth=4096)
    path = tmp_path / "bare.dcm"
    bare = Dataset()
    bare.update(ds)
    bare.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    rendering = render_8bit(read_dicom(path))
    assert np.abs(rendering.pixels.astype(int) - dicom_window(RAMP_12, 2048, 4096)).max() <= 1


def test_read_dicom_rejects_a_preamble_less_non_image(tmp_path: Path) -> None:
    """A bare data set without image attributes is not accepted by force."""
    bare = Dataset()
    bare.PatientName = "Nobody"
    bare.Modality = "SR"
    bare.SOPInstanceUID = generate_uid()
    path = tmp_path / "bare_sr.dcm"
    bare.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    with pytest.raises(InvalidDicomError, match="lacks PixelData, Rows, Columns"):
        read_dicom(path)


# --- resources ------------------------------------------------------------------------


def test_render_of_4000_square_16bit_allocates_no_float_image() -> None:
    """Rendering 4000x4000 16-bit allocates < 64 MB (a float32 copy alone would be 64 MB)."""
    ds = make_ds(chest_16bit(4000, 4000))
    tracemalloc.start()
    try:
        rendering = render_8bit(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rendering.pixels.shape == (4000, 4000)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
