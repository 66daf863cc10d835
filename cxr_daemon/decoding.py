"""Compressed pixel data -> the stored values of the one frame, fast and GIL-free.

pydicom's default decoders for the JPEG family (pylibjpeg-openjpeg, -libjpeg)
hold the GIL for the whole decode, so a daemon with several studies in flight
used at most one core, and their JPEG Lossless decoder is slow. imagecodecs
wraps OpenJPEG, libjpeg-turbo, liblj92 and CharLS and releases the GIL; on a
2500x3000 16-bit radiograph (2-core Xeon, median of 5):

    JPEG Lossless SV1      310 ms (pylibjpeg)  ->  84 ms
    JPEG 2000 lossless    1086 ms              -> 1074 ms, 580 ms with 2 threads
    JPEG baseline 8-bit     58 ms              ->  11 ms (2446x2010)

and it decodes 12-bit JPEG Extended, which pylibjpeg cannot. Lossless output is
bit-identical to pydicom's; lossy JPEG differs by at most one grey level (IDCT
rounding). A stream imagecodecs rejects goes to pydicom's decoders as before.

Before anything is decoded, the codestream's own size is read and compared with
Rows/Columns: the decoder allocates what the *codestream* says, so a small
header in front of a 60000x60000 codestream would otherwise cost gigabytes.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import TYPE_CHECKING, Final

import imagecodecs
import numpy as np
from pydicom.encaps import get_frame
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from cxr_daemon.errors import InvalidDicomError

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy.typing as npt
    from pydicom.dataset import Dataset


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: a cpuset or taskset counts)."""
    return len(os.sched_getaffinity(0)) or 1


# OpenJPEG threads per JPEG 2000 decode: halves one image's decode time on two
# cores (latency of a live study); with every core busy they cost ~4% more CPU.
J2K_THREADS: Final = min(4, usable_cores())


_J2K_FAMILY: Final = frozenset(
    {JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K}
)
_jpeg2k = functools.partial(imagecodecs.jpeg2k_decode, numthreads=J2K_THREADS)
_DECODERS: Final[dict[UID, Callable[[bytes], npt.NDArray[np.integer]]]] = {
    JPEG2000Lossless: _jpeg2k,
    JPEG2000: _jpeg2k,
    HTJ2KLossless: imagecodecs.htj2k_decode,
    HTJ2KLosslessRPCL: imagecodecs.htj2k_decode,
    HTJ2K: imagecodecs.htj2k_decode,
    JPEGBaseline8Bit: imagecodecs.jpeg8_decode,
    JPEGExtended12Bit: imagecodecs.jpeg8_decode,
    JPEGLossless: imagecodecs.ljpeg_decode,
    JPEGLosslessSV1: imagecodecs.ljpeg_decode,
    JPEGLSLossless: imagecodecs.jpegls_decode,
    JPEGLSNearLossless: imagecodecs.jpegls_decode,
}
_SOF_MARKERS: Final = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
)


def handles(syntax: UID) -> bool:
    """Whether ``decode_frame`` decodes this transfer syntax."""
    return syntax in _DECODERS


def decode_frame(ds: Dataset, syntax: UID) -> npt.NDArray[np.integer]:
    """Decode the single frame of ``ds`` (encapsulated in ``syntax``) to stored values.

    The result is 2-D, in native byte order, signed exactly when
    PixelRepresentation is 1 (sign-extended from BitsStored when the codec
    hands back unsigned samples).

    Raises:
        InvalidDicomError: the encapsulated frame cannot be found, or the
            codestream's size is not Rows x Columns.
        RuntimeError: the codec rejected the stream (the caller tries pydicom).
    """
    try:
        data = get_frame(ds.PixelData, 0, number_of_frames=1)
    except (ValueError, LookupError, struct.error) as exc:
        raise InvalidDicomError(f"encapsulated pixel data unreadable: {exc}") from None
    size = codestream_size(data, syntax in _J2K_FAMILY)
    expected = (int(ds.Columns), int(ds.Rows))
    if size is not None and size != expected:
        raise InvalidDicomError(
            f"{syntax.name} codestream is {size[0]}x{size[1]}, the header says "
            f"{expected[0]}x{expected[1]} (Columns x Rows)"
        )
    frame = _DECODERS[syntax](data)
    return _as_stored(frame, int(ds.get("PixelRepresentation", 0) or 0), _bits_stored(ds))


def codestream_size(data: bytes, j2k: bool) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 SIZ or JPEG/JPEG-LS SOF segment; None if not found."""
    return _j2k_size(data) if j2k else _jpeg_size(data)


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    # SOC (FF4F) then SIZ (FF51): Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz. Some
    # encoders wrap the codestream in a JP2 file; the marker pair is then further in.
    at = data.find(b"\xff\x4f\xff\x51", 0, 4096)
    if at < 0 or len(data) < at + 24:
        return None
    x, y, x0, y0 = struct.unpack_from(">IIII", data, at + 8)
    return x - x0, y - y0


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the marker segments from SOI to the first SOFn (or JPEG-LS SOF55):
    # length (2), precision (1), height (2), width (2).
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, at + 2)
        at += 2 + length
    return None


def _bits_stored(ds: Dataset) -> int:
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    return int(ds.get("BitsStored", allocated) or allocated)


def _as_stored(
    frame: npt.NDArray[np.integer], signed: int, bits_stored: int
) -> npt.NDArray[np.integer]:
    """The codec's samples read as the header declares them, as pydicom reads them.

    The header's signedness rules (a codestream may say otherwise), and the bits
    above BitsStored are dropped: sign-extended when signed, cleared when not.
    """
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    if frame.dtype.kind not in "iu":
        raise InvalidDicomError(f"decoded to {frame.dtype} samples, not integers")
    itemsize = frame.dtype.itemsize
    frame = frame.astype(frame.dtype.newbyteorder("="), copy=False)
    frame = frame.view(np.dtype(f"{'i' if signed else 'u'}{itemsize}"))
    shift = 8 * itemsize - bits_stored
    if shift > 0:
        if not frame.flags.writeable:
            frame = frame.copy()
        # In place: left, then back right (arithmetic when signed, logical when not).
        np.left_shift(frame, shift, out=frame)
        np.right_shift(frame, shift, out=frame)
    return frame
