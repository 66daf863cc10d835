"""cxr_daemon.imaging on the shared real CXRs and odd files, against dcmtk as reference.

The reference renderer is dcmtk's dcmj2pnm with the same VOI choice cxrd made:
``+Wi 1`` (the file's first window) when cxrd used the stored window, ``+Wm``
(min-max) when cxrd computed min/max, ``+Wl 1`` for a VOI LUT, and ``+Ww c w``
with cxrd's numbers for the percentile fallback. dcmtk 3.6.7 has no JPEG 2000
decoder (a commercial add-on), so J2K files are decompressed with pydicom to an
uncompressed temporary file first: for those, decoding is shared and only the
rendering (Modality LUT, window, polarity) is independent.

Set CXRD_IMAGING_LOOK_DIR=/some/dir to write both renderings as PNG for eyeballing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000TransferSyntaxes

from cxr_daemon.errors import InvalidDicomError
from cxr_daemon.imaging import Rendering, read_dicom, render_8bit

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MIN_CORRELATION = 0.98

RENDERS = "renders"
# Every file in odd/ and what cxrd must do with it: render, or raise
# InvalidDicomError containing this text. Never any other exception.
ODD_OUTCOMES = {
    "fodicom_HasFragmentSequence.dcm": "multi-frame object (96 frames)",
    "highdicom_seg_image_cr_binary.dcm": "BitsAllocated 1 not supported",
    "openrem_DX-Im-GE_XR220-1.dcm": RENDERS,  # 2x2 DX, MONOCHROME1 + INVERSE
    "openrem_DX-RDSR-Canon_CXDI.dcm": "no PixelData in this X-Ray Radiation Dose SR Storage",
    "orthanc_HelloWorld.pdf": "not a DICOM file: no 'DICM' preamble",
    "orthanc_Issue56-NoPixelData.dcm": "no PixelData in this Digital X-Ray Image Storage",
    "orthanc_MR1_JPLY_jpeg_extended.dcm": RENDERS,  # 12-bit JPEG: libjpeg-turbo (imagecodecs)
    "orthanc_PR000000_GSPS.dcm": "no PixelData in this Grayscale Softcopy Presentation State",
    "orthanc_SR_IM0.dcm": "no PixelData in this Basic Text SR Storage",
    "orthanc_oob-monochrome-65535.dcm": "Rows 65535 outside 1..16384",
    "orthanc_sample-pdf.dcm": "no PixelData in this Encapsulated PDF Storage",
    "pydicom_DICOMDIR": "no PixelData in this Media Storage Directory Storage",
    "pydicom_ExplVR_BigEndNoMeta.dcm": "not a DICOM file: no 'DICM' preamble",
    "pydicom_MR_truncated.dcm": "PixelData holds 8130 bytes, 64x64 at 16 bits needs 8192",
    "pydicom_badVR.dcm": "BitsAllocated 32 not supported",
    "pydicom_meta_missing_tsyntax.dcm": "File Meta has no TransferSyntaxUID",
    "pydicom_no_meta.dcm": "not a DICOM file: no 'DICM' preamble",
    "pydicom_waveform_ecg.dcm": "no PixelData in this 12-lead ECG Waveform Storage",
    "pydicomdata_emri_small_RLE.dcm": "multi-frame object (10 frames)",
    "txv_Fake_MONOHR1.dcm": RENDERS,  # SIIM CXR relabelled MONOCHROME1: a negative, correctly
    "wg04_RG3_JPLL.dcm": RENDERS,
    "wg04_RG3_RLE.dcm": RENDERS,
}

# Files whose header itself says lungs are bright. gdcm DX_J2K_0Padding is
# MONOCHROME2 + IDENTITY with Pixel Intensity Relationship Sign +1 (high value =
# more X-ray = air): rendered as declared, by us and by dcmtk, it is a negative.
# Pixel Intensity Relationship is not a display transform (PS3.3 C.8.11.3.1.2),
# so cxrd does not second-guess it.
LUNGS_BRIGHT_BY_HEADER = {"gdcm_DX_J2K_0Padding.dcm", "txv_Fake_MONOHR1.dcm"}


def _files(folder: str) -> list[object]:
    """Every file in DATA/folder, or one placeholder that skips (or fails) when absent."""
    path = DATA / folder
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix != ".md")
    return [pytest.param(None, id=f"{folder}-absent")]


def _require(path: Path | None) -> Path:
    """Skip when the shared data is missing; fail instead if CXRD_REQUIRE_SHARED_DATA=1."""
    if path is not None:
        return path
    reason = f"shared data not present: {DATA}"
    if os.environ.get("CXRD_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"{reason} (CXRD_REQUIRE_SHARED_DATA=1)")
    pytest.skip(reason)


def _dcmj2pnm() -> str:
    """The dcmtk renderer's path; skip if dcmtk is missing (fail under CI)."""
    found = shutil.which("dcmj2pnm")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("dcmtk's dcmj2pnm is not installed (CI=true)")
    pytest.skip("dcmtk's dcmj2pnm is not installed")


def _dcmtk_input(path: Path, tmp_path: Path) -> Path:
    """The file itself, or for JPEG 2000 an uncompressed copy dcmtk 3.6.7 can read."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID not in JPEG2000TransferSyntaxes:
        return path
    ds.decompress()
    out = tmp_path / f"{path.stem}_uncompressed.dcm"
    ds.save_as(out)
    return out


def _voi_arguments(rendering: Rendering) -> list[str]:
    """dcmj2pnm options selecting the same VOI transform cxrd chose."""
    if rendering.method == "voi_window":
        return ["+Wi", "1"]
    if rendering.method == "voi_lut":
        return ["+Wl", "1", "+Mv"]
    if rendering.method == "minmax":
        return ["+Wm"]
    assert rendering.window is not None
    center, width = rendering.window
    return ["+Ww", f"{center:.6f}", f"{width:.6f}"]


def dcmtk_render(path: Path, rendering: Rendering, tmp_path: Path) -> np.ndarray:
    """Render `path` with dcmtk (no overlays, 8-bit PGM) using cxrd's VOI choice."""
    out = tmp_path / f"{path.stem}_dcmtk.pgm"
    command = [_dcmj2pnm(), *_voi_arguments(rendering), "-O", "+op"]
    command += [str(_dcmtk_input(path, tmp_path)), str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with Image.open(out) as image:
        return np.asarray(image.convert("L"))


def lung_and_mediastinum(pixels: np.ndarray) -> tuple[float, float]:
    """Mean grey of two central lung boxes and of the mediastinum strip between them."""
    h, w = pixels.shape
    rows = slice(int(0.35 * h), int(0.6 * h))
    lungs = np.concatenate(
        [
            pixels[rows, int(0.2 * w) : int(0.33 * w)].ravel(),
            pixels[rows, int(0.67 * w) : int(0.8 * w)].ravel(),
        ]
    )
    return float(lungs.mean()), float(pixels[rows, int(0.46 * w) : int(0.54 * w)].mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images of the same shape."""
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _look(name: str, ours: np.ndarray, reference: np.ndarray) -> None:
    folder = os.environ.get("CXRD_IMAGING_LOOK_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ours).save(Path(folder) / f"{name}.png")
        Image.fromarray(reference).save(Path(folder) / f"{name}_dcmtk.png")


def _render(path: Path) -> Rendering:
    return render_8bit(read_dicom(path))


@pytest.mark.integration
@pytest.mark.parametrize("path", _files("cxr"), ids=lambda p: getattr(p, "name", str(p)))
def test_real_cxr_matches_dcmtk(path: Path | None, tmp_path: Path) -> None:
    """Each real CXR renders like dcmtk (r >= 0.98) with the same lung/mediastinum polarity."""
    path = _require(path)
    rendering = _render(path)
    reference = dcmtk_render(path, rendering, tmp_path)
    _look(path.stem, rendering.pixels, reference)
    assert reference.shape == rendering.pixels.shape
    r = pearson(rendering.pixels, reference)
    assert r >= MIN_CORRELATION, f"{path.name}: r={r:.4f} ({rendering.method})"
    ours, theirs = lung_and_mediastinum(rendering.pixels), lung_and_mediastinum(reference)
    assert (ours[0] < ours[1]) == (theirs[0] < theirs[1])


@pytest.mark.integration
@pytest.mark.parametrize("path", _files("cxr"), ids=lambda p: getattr(p, "name", str(p)))
def test_real_cxr_lungs_dark_bone_bright(path: Path | None) -> None:
    """Lungs render clearly darker than the mediastinum, unless the header declares otherwise."""
    path = _require(path)
    lungs, mediastinum = lung_and_mediastinum(_render(path).pixels)
    if path.name in LUNGS_BRIGHT_BY_HEADER:
        assert lungs > mediastinum + 30
    else:
        assert lungs + 30 < mediastinum


@pytest.mark.integration
def test_stored_window_that_misses_the_data_is_replaced() -> None:
    """gdcm DX_J2K_0Padding (window 2725/5310, values 32744..65535) gets a data window."""
    path = _require(DATA / "cxr" / "gdcm_DX_J2K_0Padding.dcm" if DATA.is_dir() else None)
    rendering = _render(path)
    assert rendering.method == "percentile"
    assert rendering.pixels.std() > 40
    assert np.count_nonzero(rendering.pixels == 255) < 0.02 * rendering.pixels.size


@pytest.mark.integration
@pytest.mark.parametrize("path", _files("odd"), ids=lambda p: getattr(p, "name", str(p)))
def test_odd_file_renders_or_raises_invalid_dicom(path: Path | None, tmp_path: Path) -> None:
    """Each odd file renders or raises InvalidDicomError with its specific message, nothing else."""
    path = _require(path)
    assert path.name in ODD_OUTCOMES, f"new odd file {path.name}: add it to ODD_OUTCOMES"
    expected = ODD_OUTCOMES[path.name]
    if expected != RENDERS:
        with pytest.raises(InvalidDicomError) as caught:
            _render(path)
        assert expected in str(caught.value)
        return
    rendering = _render(path)
    assert rendering.pixels.dtype == np.uint8
    reference = dcmtk_render(path, rendering, tmp_path)
    _look(path.stem, rendering.pixels, reference)
    assert pearson(rendering.pixels, reference) >= MIN_CORRELATION


@pytest.mark.integration
def test_fake_monochrome1_is_the_exact_negative_of_its_source() -> None:
    """txv_Fake_MONOHR1 (same pixels, relabelled MONOCHROME1) renders as 255 minus the SIIM CXR."""
    if not DATA.is_dir():
        _require(None)
    source = _render(DATA / "cxr" / "siim_acr_sample_txv.dcm")
    fake = _render(DATA / "odd" / "txv_Fake_MONOHR1.dcm")
    assert fake.inverted
    assert not source.inverted
    assert np.array_equal(fake.pixels, 255 - source.pixels)


@pytest.mark.integration
def test_same_image_in_two_codecs_renders_identically() -> None:
    """WG04 RG3 as JPEG Lossless and as RLE decode and render to the same pixels."""
    if not DATA.is_dir():
        _require(None)
    jpll = _render(DATA / "odd" / "wg04_RG3_JPLL.dcm")
    rle = _render(DATA / "odd" / "wg04_RG3_RLE.dcm")
    assert np.array_equal(jpll.pixels, rle.pixels)
