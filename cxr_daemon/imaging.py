"""DICOM radiograph -> 8-bit grayscale image (its encodings are in ``encoding``).

The grayscale pipeline is the standard's (PS3.4 N.2): stored value -> Modality LUT
-> VOI LUT or window -> Presentation LUT (polarity). It is evaluated, in float32,
for every *possible* stored value (at most 65,536) into a uint8 table, and the
image is touched once, by a look-up in that table: no float copy of the image.
All checks that can reject a file run before decoding, so a header that lies
(65535x65535 in 910 bytes) fails with a message instead of allocating gigabytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias

import numpy as np
import pydicom
import structlog
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError as PydicomReadError
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxr_daemon import decoding
from cxr_daemon.errors import InvalidDicomError, UndecodablePixelDataError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy.typing as npt
    from pydicom.dataset import Dataset

    Floats: TypeAlias = npt.NDArray[np.float32]
    Indices: TypeAlias = npt.NDArray[np.unsignedinteger]  # stored values as table indices

log = structlog.get_logger(__name__)

MAX_SIDE: Final = 16384
"""Largest Rows or Columns accepted; a 43 cm detector at 0.1 mm is ~4300."""

# Exceptions pydicom raises on malformed input (as opposed to our own bugs).
# (RuntimeError covers NotImplementedError; LookupError covers KeyError/IndexError.)
_MALFORMED: Final = (ValueError, TypeError, LookupError, EOFError, struct.error)
_PYDICOM_ERRORS: Final = (*_MALFORMED, AttributeError, RuntimeError)
_IMAGE_KEYWORDS: Final = ("PixelData", "Rows", "Columns", "PhotometricInterpretation")
_SAMPLE_TARGET: Final = 262_144  # pixels looked at for window statistics (a strided subsample)
_MIN_UNCLIPPED: Final = 0.10  # a usable window leaves at least this share of pixels unsaturated
_MIN_SPREAD: Final = 0.10  # ... and spreads the 1st..99th percentile over this share of the grays
_TAIL_PERCENT: Final = 0.5  # clipped at each end by the robust fallback window
_OUTLIER_RATIO: Final = 0.5  # min/max wider than 1/ratio x robust range -> outliers rule it


@dataclass(frozen=True, eq=False)
class Rendering:
    """An 8-bit rendering and how it was made.

    Attributes:
        pixels: uint8 array (rows, columns), read-only; 0 is black, lungs dark.
        window: (center, width) applied, in Modality LUT output units; None for a VOI LUT.
        inverted: True when the polarity was flipped (MONOCHROME1 or INVERSE).
        method: "voi_lut", "voi_window" (stored), "minmax" or "percentile" (computed).
    """

    pixels: npt.NDArray[np.uint8]
    window: tuple[float, float] | None
    inverted: bool
    method: str


def read_dicom(path: Path) -> Dataset:
    """Read a DICOM file that claims to hold an image.

    A file without the 128-byte preamble and File Meta is accepted only when,
    read leniently, it carries the image attributes (Rows, Columns, ...).

    Raises:
        InvalidDicomError: not DICOM, unreadable, no PixelData, or no
            TransferSyntaxUID to say how the pixel data is encoded.
        OSError: the file cannot be opened (the file system, not the file).
    """
    ds: Dataset
    try:
        ds = pydicom.dcmread(path)
    except PydicomReadError:
        ds = _read_without_meta(path)
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicomError(f"unreadable DICOM file: {_brief(exc)}") from exc
    if "PixelData" not in ds:
        raise InvalidDicomError(f"no PixelData in this {_sop_class_name(ds)}: nothing to render")
    _transfer_syntax(ds)
    return ds


def _read_without_meta(path: Path) -> Dataset:
    """Read a preamble-less file, keeping it only if it is visibly an image."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicomError(f"not a DICOM file: {_brief(exc)}") from exc
    missing = [keyword for keyword in _IMAGE_KEYWORDS if keyword not in ds]
    if missing:
        raise InvalidDicomError(
            "not a DICOM file: no 'DICM' preamble or File Meta, and read leniently "
            f"it lacks {', '.join(missing)}"
        )
    if not ds.get("file_meta"):  # no group 0002 at all (a partial one is left as is)
        if ds["PixelData"].is_undefined_length:
            raise InvalidDicomError("compressed PixelData without File Meta naming its codec")
        # Native pixel data is encoded like the rest of the data set.
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax if little else ExplicitVRBigEndian
    return ds


def check_pixel_module(ds: Dataset) -> None:
    """Check, before decoding, that the Image Pixel module describes one sane radiograph.

    Raises:
        InvalidDicomError: Rows/Columns missing or outside 1..MAX_SIDE,
            BitsAllocated not 8 or 16, BitsStored outside 1..BitsAllocated,
            PixelRepresentation not 0/1, SamplesPerPixel not 1, Photometric
            Interpretation not MONOCHROME1/2, more than one frame, unknown
            transfer syntax, or uncompressed PixelData shorter than declared.
    """
    rows, columns = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    for keyword, value in (("Rows", rows), ("Columns", columns)):
        if not 0 < value <= MAX_SIDE:
            raise InvalidDicomError(f"{keyword} {value} outside 1..{MAX_SIDE}")
    allocated = _int_attr(ds, "BitsAllocated")
    if allocated not in (8, 16):
        raise InvalidDicomError(f"BitsAllocated {allocated} not supported (8 or 16)")
    stored = _int_attr(ds, "BitsStored", allocated)
    if not 0 < stored <= allocated:
        raise InvalidDicomError(f"BitsStored {stored} outside 1..BitsAllocated {allocated}")
    if _int_attr(ds, "PixelRepresentation", 0) not in (0, 1):
        raise InvalidDicomError("PixelRepresentation is neither 0 nor 1")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise InvalidDicomError(f"SamplesPerPixel {samples}: a radiograph has one sample")
    photometric = _photometric(ds)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InvalidDicomError(f"PhotometricInterpretation {photometric!r} is not grayscale")
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if frames != 1:
        raise InvalidDicomError(f"multi-frame object ({frames} frames): a CXR is one frame")
    _check_pixel_length(ds, rows * columns * allocated // 8)


def _check_pixel_length(ds: Dataset, expected: int) -> None:
    """Uncompressed pixel data must hold at least the declared frame."""
    syntax = _transfer_syntax(ds)
    if not syntax.is_transfer_syntax:
        raise InvalidDicomError(f"unknown transfer syntax {syntax}")
    if syntax.is_encapsulated:
        return
    length = len(ds.PixelData)
    if length < expected:
        raise InvalidDicomError(
            f"PixelData holds {length} bytes, {ds.Rows}x{ds.Columns} at "
            f"{ds.BitsAllocated} bits needs {expected}: truncated or wrong header"
        )


def render_8bit(ds: Dataset) -> Rendering:
    """Decode the pixel data once and render it for display: lungs dark, bone bright.

    Order: Modality LUT (or Rescale Slope/Intercept); VOI LUT Sequence if present,
    else the first Window Center/Width (with VOI LUT Function); a window computed
    from the data (min/max, or 0.5..99.5 percentiles when outliers dominate) if
    there is none or the stored one does not fit the data; then polarity.

    Raises:
        InvalidDicomError: the pixel module fails check_pixel_module, the pixel
            data cannot be decoded (message names the transfer syntax), or a
            Modality/VOI LUT is malformed.
    """
    check_pixel_module(ds)
    frame = _decode(ds)
    unsigned = np.dtype(f"u{frame.dtype.itemsize}")
    # Every possible stored value, in the frame's own (signed or unsigned) type;
    # the frame's bit patterns, read as unsigned, index tables built over it.
    stored = np.arange(2 ** (8 * frame.dtype.itemsize), dtype=unsigned).view(frame.dtype)
    index = frame.view(unsigned)
    modality = _modality_values(ds, stored)
    stride = max(1, int((index.size / _SAMPLE_TARGET) ** 0.5))
    sample = index[::stride, ::stride]
    present = (stored >= frame.min()) & (stored <= frame.max())
    curve, window, method = _voi_curve(ds, modality, sample, present)
    table = np.rint(curve * np.float32(255)).astype(np.uint8)
    inverted = _is_inverted(ds)
    if inverted:
        np.subtract(255, table, out=table)
    # Fancy indexing with the uint16 array itself; np.take would first copy the
    # indices to intp (8 bytes a pixel: 128 MB for 4000x4000).
    pixels = table[index]
    pixels.flags.writeable = False
    return Rendering(pixels=pixels, window=window, inverted=inverted, method=method)


def _decode(ds: Dataset) -> npt.NDArray[np.integer]:
    """Decode the one frame, in native byte order.

    Raises:
        InvalidDicomError: no decoder could decode it, or it is not the declared shape.
    """
    syntax = _transfer_syntax(ds)
    frame = _decode_fast(ds, syntax)
    if frame is None:
        try:
            # pydicom.pixels.pixel_array does what ds.pixel_array does, without caching
            # a second copy of the frame on the data set for as long as it lives.
            frame = pixel_array(ds, index=0)
        except _PYDICOM_ERRORS as exc:
            # The header passed every check: no local decoder handles this stream,
            # so Orthanc's own renderer is worth a try (the pipeline's fallback).
            raise UndecodablePixelDataError(
                f"cannot decode {syntax.name} ({syntax}) pixel data: {_brief(exc)}"
            ) from exc
    if frame.shape != (ds.Rows, ds.Columns) or frame.dtype.kind not in "iu":
        raise InvalidDicomError(f"{syntax.name} decoded to {frame.dtype} {frame.shape}")
    return frame.astype(frame.dtype.newbyteorder("="), copy=False)


def _decode_fast(ds: Dataset, syntax: UID) -> npt.NDArray[np.integer] | None:
    """The frame decoded by imagecodecs, or None.

    None for a syntax it does not handle or a stream its codec rejects: pydicom
    gets those.
    """
    if not decoding.handles(syntax):
        return None
    try:
        return decoding.decode_frame(ds, syntax)
    except RuntimeError as exc:  # the codec's own errors
        log.info("decode_fallback_pydicom", transfer_syntax=syntax.name, reason=_brief(exc))
        return None


def _modality_values(ds: Dataset, stored: npt.NDArray[np.integer]) -> Floats:
    """Modality LUT output for every possible stored value."""
    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        except _PYDICOM_ERRORS as exc:
            raise InvalidDicomError(f"malformed Modality LUT Sequence: {_brief(exc)}") from exc
    slope = _first_float(ds, "RescaleSlope")
    slope = 1.0 if slope is None else slope
    intercept = _first_float(ds, "RescaleIntercept") or 0.0
    if slope == 0:
        raise InvalidDicomError("RescaleSlope is 0: every pixel would have the same value")
    values = stored.astype(np.float32)
    values *= np.float32(slope)
    values += np.float32(intercept)
    return values


def _voi_curve(
    ds: Dataset, modality: Floats, sample: Indices, present: npt.NDArray[np.bool_]
) -> tuple[Floats, tuple[float, float] | None, str]:
    """Pick the VOI transform: stored LUT, stored window, or one computed from the data.

    A stored transform is kept only if it gives the sampled pixels a usable
    image: gdcm's DX_J2K_0Padding stores window 2725/5310 for values 32744..65535,
    which would render every pixel white.
    """
    if ds.get("VOILUTSequence"):
        curve = _voi_lut_curve(ds, modality)
        if _usable(curve[sample]):
            return curve, None, "voi_lut"
    stored = _stored_window(ds)
    if stored is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        curve = _window_curve(modality, *stored, function=function)
        if _usable(curve[sample]):
            return curve, stored, "voi_window"
    window, method = _data_window(modality, sample, present)
    return _window_curve(modality, *window), window, method


def _usable(rendered: Floats) -> bool:
    """Whether a rendering leaves enough pixels unclipped and enough contrast."""
    unclipped = np.count_nonzero((rendered > 0) & (rendered < 1)) / rendered.size
    low, high = np.percentile(rendered, [1.0, 99.0])
    return bool(unclipped >= _MIN_UNCLIPPED and high - low >= _MIN_SPREAD)


def _data_window(
    modality: Floats, sample: Indices, present: npt.NDArray[np.bool_]
) -> tuple[tuple[float, float], str]:
    """Min/max window, or 0.5..99.5 percentiles when a few outliers dominate min/max.

    Percentiles come from a strided subsample: np.percentile over the full image
    in float is what made the naive renderer slow.
    """
    in_range = modality[present]
    low, high = float(in_range.min()), float(in_range.max())
    method = "minmax"
    p_low, p_high = np.percentile(modality[sample], [_TAIL_PERCENT, 100 - _TAIL_PERCENT])
    if p_high - p_low < _OUTLIER_RATIO * (high - low):
        low, high, method = float(p_low), float(p_high), "percentile"
    # DICOM's linear window maps c - 0.5 -/+ (w - 1)/2 to black/white: pick c, w so
    # that is exactly low..high (dcmtk's min-max window does the same).
    return ((low + high + 1) / 2, high - low + 1), method


def _window_curve(x: Floats, center: float, width: float, function: str = "LINEAR") -> Floats:
    """The VOI window function (PS3.3 C.11.2.1.2/3), output scaled to 0..1."""
    c, w = np.float32(center), np.float32(width)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflow -> inf -> 0: the intended limit
            y = 1 / (1 + np.exp(np.float32(-4) * (x - c) / w))
    elif function == "LINEAR_EXACT":
        y = (x - c) / w + np.float32(0.5)
    elif w <= 1:  # the linear formula degenerates to a threshold
        y = (x > c - np.float32(0.5)).astype(np.float32)
    else:
        y = (x - (c - np.float32(0.5))) / (w - 1) + np.float32(0.5)
    curve: Floats = np.clip(y, 0, 1).astype(np.float32, copy=False)
    return curve


def _voi_lut_curve(ds: Dataset, modality: Floats) -> Floats:
    """The first VOI LUT Sequence item applied to every Modality LUT output, scaled to 0..1."""
    try:
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(value) for value in item.LUTDescriptor)
        table = apply_voi(np.arange(first, first + (entries or 65536), dtype=np.int32), ds)
        curve = apply_voi(np.rint(modality).astype(np.int32), ds).astype(np.float32)
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicomError(f"malformed VOI LUT Sequence: {_brief(exc)}") from exc
    # Descriptors often claim 16 bits for 12- or 15-bit tables; trust the data
    # (as dcmtk's --ignore-vlut-depth does) or the image renders dark.
    used = max(int(table.max()).bit_length(), 1)
    curve /= np.float32(2 ** min(bits, used) - 1)
    np.clip(curve, 0, 1, out=curve)
    return curve


def _stored_window(ds: Dataset) -> tuple[float, float] | None:
    """The first stored Window Center/Width, or None if absent or unusable."""
    try:
        center, width = _first_float(ds, "WindowCenter"), _first_float(ds, "WindowWidth")
    except InvalidDicomError:
        return None  # a malformed window is no window: the data's own is used
    if center is None or width is None or not width > 0:
        return None
    return center, width


def _first_float(ds: Dataset, keyword: str) -> float | None:
    """The first value of a possibly multi-valued decimal attribute; None if absent.

    Raises:
        InvalidDicomError: the value is not a number.
    """
    value = ds.get(keyword)
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidDicomError(f"{keyword} {value!r} is not a number") from None


def _is_inverted(ds: Dataset) -> bool:
    """Whether to flip polarity so that low output is black.

    MONOCHROME1 means the minimum value is white, so it is inverted. In an image
    object (General Image Module C.7.6.1, DX Image Module C.8.11.3), Presentation
    LUT Shape INVERSE "shall be used if Photometric Interpretation is MONOCHROME1":
    it names that same inversion, it does not add one. So MONOCHROME1 + INVERSE
    flips once (a double flip would show every DX MONOCHROME1 image as a negative;
    dcmtk flips once too). INVERSE on MONOCHROME2 is non-conformant; it is
    honoured as the one inversion it asks for.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return _photometric(ds) == "MONOCHROME1" or shape == "INVERSE"


def _transfer_syntax(ds: Dataset) -> UID:
    """The data set's Transfer Syntax UID."""
    syntax = ds.get("file_meta", FileMetaDataset()).get("TransferSyntaxUID")
    if not syntax:
        raise InvalidDicomError("File Meta has no TransferSyntaxUID: pixel encoding unknown")
    return UID(str(syntax))


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, with a readable error if it is missing or malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise InvalidDicomError(f"{keyword} missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidDicomError(f"{keyword} {value!r} is not an integer") from None


def _sop_class_name(ds: Dataset) -> str:
    """A readable name of the object's SOP class, for error messages."""
    meta = ds.get("file_meta") or FileMetaDataset()
    uid = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    name = UID(str(uid)).name if uid else "object without SOP Class UID"
    modality = ds.get("Modality")
    return f"{name} ({modality})" if modality else name


def _brief(exc: BaseException) -> str:
    """One line of an exception message, short enough for `cxrd status`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
