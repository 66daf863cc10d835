"""cxr_daemon.decoding on streams written by dcmtk, the encoders a modality or PACS uses.

pydicom has no encoder for JPEG Lossless, JPEG 12-bit or (without pyjpegls)
JPEG-LS, so these are made from an uncompressed phantom with ``dcmcjpeg`` and
``dcmcjpls`` and decoded values are compared with the phantom's own.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import numpy as np
import pytest
from pydicom import dcmread

from cxr_daemon import decoding
from cxr_daemon.imaging import render_8bit
from cxr_daemon.sandbox.phantom import write_chest_phantom
from cxr_daemon.sandbox.processes import find_program

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration


def encoded(tmp_path: Path, program: str, options: list[str], bits: int) -> tuple[Path, Path]:
    """(uncompressed phantom, the same re-encoded by dcmtk ``program`` with ``options``)."""
    source = write_chest_phantom(tmp_path / "source.dcm", rows=300, cols=256, bits_stored=bits)
    target = tmp_path / "encoded.dcm"
    command = [find_program(program), *options, str(source), str(target)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return source, target


@pytest.mark.parametrize("predictor", range(1, 8))
@pytest.mark.parametrize("bits", [12, 16])
def test_jpeg_lossless_every_predictor_is_exact(tmp_path: Path, predictor: int, bits: int) -> None:
    """Process 14, selection values 1..7, as dcmcjpeg writes them: bit-exact."""
    source, target = encoded(tmp_path, "dcmcjpeg", ["+el", "+sv", str(predictor)], bits)
    ds = dcmread(target)
    decoded = decoding.decode_frame(ds, ds.file_meta.TransferSyntaxUID)
    assert np.array_equal(decoded, dcmread(source).pixel_array)


@pytest.mark.parametrize(("options", "deviation"), [(["+el"], 0), (["+en", "+md", "3"], 3)])
def test_jpeg_ls_within_its_declared_deviation(
    tmp_path: Path, options: list[str], deviation: int
) -> None:
    """JPEG-LS lossless is exact; near-lossless stays within NEAR."""
    source, target = encoded(tmp_path, "dcmcjpls", options, 16)
    ds = dcmread(target)
    decoded = decoding.decode_frame(ds, ds.file_meta.TransferSyntaxUID).astype(np.int32)
    assert np.abs(decoded - dcmread(source).pixel_array.astype(np.int32)).max() <= deviation


def test_jpeg_extended_12_bit_renders(tmp_path: Path) -> None:
    """12-bit JPEG (Process 4), which pylibjpeg cannot decode, renders close to its source."""
    source, target = encoded(tmp_path, "dcmcjpeg", ["+ee"], 12)
    ds = dcmread(target)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    ours = render_8bit(ds).pixels.astype(np.float64).ravel()
    reference = render_8bit(dcmread(source)).pixels.astype(np.float64).ravel()
    assert np.corrcoef(ours, reference)[0, 1] > 0.99
