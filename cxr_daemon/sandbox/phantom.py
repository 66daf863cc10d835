"""Synthetic chest X-ray DICOM files (and a few non-CXR objects) made with pydicom.

Supported `transfer_syntax` values for `write_chest_phantom`:

- Explicit / Implicit VR Little Endian and Deflated Explicit VR Little Endian (uncompressed);
- RLE Lossless, JPEG 2000 Lossless and JPEG 2000 (lossy, ratio 10) via `Dataset.compress`
  (pydicom's own RLE encoder, pylibjpeg-openjpeg);
- JPEG Baseline for `bits_stored=8` only, encoded with Pillow and encapsulated here
  (pydicom has no JPEG encoder).

JPEG-LS is not written: pydicom needs pyjpegls, which is not a dependency. JPEG Lossless
and JPEG 12-bit have no Python encoder at all. When a test needs one of those, convert an
uncompressed phantom with dcmtk (`dcmcjpls +el`, `dcmcjpeg +e1` / `+ee`).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

if TYPE_CHECKING:
    from pathlib import Path

    from numpy.typing import NDArray

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
ENCODED = (RLELossless, JPEG2000Lossless, JPEG2000)
SUPPORTED_TRANSFER_SYNTAXES = (*UNCOMPRESSED, *ENCODED, JPEGBaseline8Bit)

# Field of view of a typical chest detector (mm), used to derive the pixel spacing.
_FIELD_MM = 430.0

Grid: TypeAlias = "NDArray[np.float64]"
Stored: TypeAlias = "NDArray[np.uint16] | NDArray[np.uint8]"


def new_uid() -> UID:
    """Return a fresh DICOM UID (pydicom's root); never raises."""
    return generate_uid()


def _ellipse(
    yy: Grid, xx: Grid, centre: tuple[float, float], radii: tuple[float, float | Grid], soft: float
) -> Grid:
    """Soft-edged ellipse mask in [0, 1]; radii may vary per pixel (tapered lungs)."""
    r = np.sqrt(((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2)
    return np.clip((1.0 - r) / soft, 0.0, 1.0)


def _band(distance: Grid, half_width: float | Grid) -> Grid:
    """Rounded profile of a bone of the given half width around distance 0."""
    return np.sqrt(np.clip(1.0 - (distance / half_width) ** 2, 0.0, 1.0))


def _ribs_and_clavicles(yy: Grid, xx: Grid) -> Grid:
    """Posterior rib arcs leaving the spine, and the two clavicles."""
    bones = np.zeros_like(yy)
    u = np.abs(xx - 0.5) / 0.42  # 0 at the spine, 1 at the lateral chest wall
    lateral = np.clip((u - 0.08) / 0.05, 0.0, 1.0) * (u < 1.0)
    # Posterior ribs rise a little from the spine, then fall steeply laterally.
    arc = yy - 0.15 - 0.16 * u**1.5 + 0.05 * np.sin(np.pi * u)
    half_width = 0.009 + 0.005 * u
    for k in range(10):
        bones = np.maximum(bones, _band(arc - 0.062 * k, half_width) * lateral)
    bones *= np.clip((0.92 - yy) / 0.15, 0.3, 1.0)  # lower ribs fade behind the abdomen
    reach = np.abs(xx - 0.5)
    clavicle = 0.17 - 0.07 * np.clip((reach - 0.05) / 0.28, 0.0, 1.0)
    return np.maximum(bones, 1.4 * _band(yy - clavicle, 0.011) * ((reach > 0.05) & (reach < 0.33)))


def _lung_texture(shape: tuple[int, int], rng: np.random.Generator) -> Grid:
    """Low-frequency texture standing in for lung vessels (a small noise grid, upscaled)."""
    small = Image.fromarray(rng.random((32, 32), dtype=np.float32), mode="F")
    big = small.resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float64) - 0.5


def _lungs(yy: Grid, xx: Grid) -> Grid:
    """Both lung fields: narrow apices, domed diaphragm, deep lateral costophrenic angles."""
    fields = np.zeros_like(yy)
    for cx in (0.31, 0.69):
        width = 0.09 + 0.09 * np.clip((yy - 0.10) / 0.45, 0.0, 1.0)
        dome = 0.70 + 0.12 * ((xx - cx) / 0.17) ** 2 + (0.03 if cx > 0.5 else 0.0)
        field = _ellipse(yy, xx, (0.50, cx), (0.40, width), 0.25)
        fields = np.maximum(fields, field * np.clip((dome - yy) / 0.025, 0.0, 1.0))
    return fields


def chest_image(rows: int, cols: int, seed: int = 0) -> Grid:
    """Return a chest-radiograph-like picture in [0, 1], 1 = white (bone), 0 = black (air).

    The layout is a PA view as displayed: the patient's left on the image right.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : 1 : rows * 1j, 0 : 1 : cols * 1j]
    # A boxy torso (superellipse), the neck and the shoulders.
    torso = np.clip(
        (1.0 - (np.abs(yy - 0.62) / 0.60) ** 4 - (np.abs(xx - 0.5) / 0.45) ** 4) / 0.25, 0.0, 1.0
    )
    neck = _ellipse(yy, xx, (0.0, 0.5), (0.2, 0.12), 0.2)
    shoulders = [_ellipse(yy, xx, (0.17, cx), (0.12, 0.22), 0.4) for cx in (0.2, 0.8)]
    body = np.maximum.reduce([torso, neck, *shoulders])
    heart = _ellipse(yy, xx, (0.63, 0.55), (0.14, 0.165), 0.3)
    lungs = _lungs(yy, xx) * (1.0 - heart)
    mediastinum = _band(xx - 0.5 - 0.015 * (yy > 0.3), 0.08) * np.clip((0.9 - yy) / 0.2, 0, 1)
    spine = _band(xx - 0.5, 0.035) * (0.8 + 0.2 * np.cos(2 * np.pi * yy / 0.055))
    abdomen = np.clip((yy - 0.70) / 0.12, 0.0, 1.0)
    # Brightness ~ attenuation: soft tissue, minus air in the lungs, plus denser structures.
    tissue = 0.55 - 0.40 * lungs + 0.10 * mediastinum + 0.14 * heart + 0.08 * spine
    picture: Grid = body * (tissue + 0.10 * abdomen + 0.10 * _ribs_and_clavicles(yy, xx))
    picture += 0.06 * _lung_texture((rows, cols), rng) * lungs
    picture += rng.normal(0.0, 0.01, size=picture.shape) + 0.03
    return np.clip(picture, 0.0, 1.0)


def _base_dataset(
    sop_class: UID, modality: str, uids: tuple[str | None, str | None, str | None], date: str
) -> Dataset:
    """General study/series, equipment and SOP common modules; missing UIDs are generated."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SpecificCharacterSet, ds.SOPClassUID, ds.Modality = "ISO_IR 100", sop_class, modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (u or new_uid() for u in uids)
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.ReferringPhysicianName = "1", 1, 1, ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "101530", "101531"
    ds.Manufacturer, ds.ManufacturerModelName = "cxrd sandbox", "chest phantom"
    ds.InstitutionName, ds.StationName, ds.SoftwareVersions = "cxrd sandbox", "PHANTOM1", "1"
    return ds


def _add_xray_attributes(ds: Dataset, view_position: str, body_part: str, size: int) -> None:
    """DX/CR acquisition, anatomy and geometry attributes of a chest PA/AP/LL view."""
    spacing = round(_FIELD_MM / size, 4)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDescription = f"XR {body_part} {view_position}".strip()
    ds.SeriesDescription = ds.StudyDescription
    ds.BodyPartExamined, ds.ViewPosition = body_part, view_position
    ds.PatientOrientation = ["L", "F"]  # PA as displayed: rows run to the patient's left
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.KVP, ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = 125, 8, 320, 3
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 1800, 1650
    ds.BurnedInAnnotation = "NO"
    if ds.Modality == "DX":
        ds.PresentationIntentType, ds.ImageLaterality = "FOR PRESENTATION", "U"
        ds.DetectorType, ds.DetectorConfiguration = "SCINTILLATOR", "AREA"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator = "43799004", "SCT"
        region.CodeMeaning = "Chest"
        ds.AnatomicRegionSequence = Sequence([region])


def _add_pixels(
    ds: Dataset, stored: Stored, bits_stored: int, photometric: str, window: bool
) -> None:
    """Image pixel module, presentation LUT shape and (optionally) a VOI window."""
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    # One inversion only: MONOCHROME1 pairs with INVERSE (PS3.3 C.8.11.6), see FACTS.md.
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if window:
        # Stored values are inverted for MONOCHROME1, so the window is taken on them directly.
        low, high = np.percentile(stored, [1.0, 99.5])
        ds.WindowCenter, ds.WindowWidth = int((low + high) / 2), max(int(high - low), 1)
        ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated == 16 else "OB"


def _stored_values(picture: Grid, bits_stored: int, photometric: str) -> Stored:
    """Quantise the picture; MONOCHROME1 stores it inverted so it displays the same."""
    top = 2**bits_stored - 1
    values: Grid = np.rint(picture * top)
    if photometric == "MONOCHROME1":
        values = top - values
    return values.astype(np.uint8) if bits_stored == 8 else values.astype(np.uint16)


def _jpeg_baseline(ds: Dataset, stored: NDArray[np.uint8]) -> None:
    """Replace the pixel data with one Pillow JPEG baseline frame (pydicom cannot encode it)."""
    buffer = io.BytesIO()
    Image.fromarray(stored, mode="L").save(buffer, format="JPEG", quality=92)
    frame = buffer.getvalue()
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    _mark_lossy(ds, stored.nbytes / len(frame), "ISO_10918_1")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _mark_lossy(ds: Dataset, ratio: float, method: str) -> None:
    """Lossy image compression attributes (PS3.3 C.7.6.1.1.5)."""
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{ratio:.2f}"
    ds.LossyImageCompressionMethod = method


def _encode(ds: Dataset, stored: Stored, syntax: UID) -> None:
    """Re-encode the uncompressed pixel data of `ds` in `syntax`."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax in UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == JPEGBaseline8Bit:
        _jpeg_baseline(ds, stored.astype(np.uint8))
    elif syntax == JPEG2000:
        ds.compress(syntax, generate_instance_uid=False, j2k_cr=[10])
        _mark_lossy(ds, 10.0, "ISO_15444_1")
    else:
        # The phantom's UIDs are already unique, so keep them (compress() would replace them).
        ds.compress(syntax, generate_instance_uid=False)


def _check(modality: str, photometric: str, syntax: UID, bits_stored: int) -> None:
    """Raise ValueError for a combination this module does not write."""
    if modality not in {"DX", "CR"}:
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {syntax} ({UID(syntax).name})")
    if bits_stored not in {8, 12, 16} or (syntax == JPEGBaseline8Bit and bits_stored != 8):
        raise ValueError(f"bits_stored {bits_stored} not possible with {UID(syntax).name}")


def write_chest_phantom(  # noqa: PLR0913 - every argument is one DICOM attribute
    path: Path,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    rows: int = 1024,
    cols: int = 1024,
    bits_stored: int = 12,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "Phantom^Chest",
    patient_id: str = "PHANTOM-0001",
    birth_date: str = "19700101",
    accession: str = "ACC0001",
    study_date: str = "20261204",
    view_position: str = "PA",
    body_part: str = "CHEST",
    window: bool = True,
    seed: int = 0,
) -> Path:
    """Write a synthetic chest radiograph (DX For Presentation or CR) to `path`.

    Missing UIDs are generated. Returns `path`.

    Raises:
        ValueError: unsupported modality, photometric interpretation, transfer syntax or
            bit depth (JPEG Baseline needs `bits_stored=8`).
        OSError: the file cannot be written.
    """
    syntax = UID(transfer_syntax)
    _check(modality, photometric, syntax, bits_stored)
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    ds = _base_dataset(sop_class, modality, (study_uid, series_uid, sop_uid), study_date)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, birth_date
    ds.PatientSex, ds.AccessionNumber = "O", accession
    _add_xray_attributes(ds, view_position, body_part, max(rows, cols))
    stored = _stored_values(chest_image(rows, cols, seed), bits_stored, photometric)
    _add_pixels(ds, stored, bits_stored, photometric, window)
    _encode(ds, stored, syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def _add_ct_image(ds: Dataset, size: int, seed: int) -> None:
    """A small axial CT slice: a water disc in air, signed values with a HU rescale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    hu = np.where(xx**2 + yy**2 < 0.8, 0.0, -1000.0) + rng.normal(0.0, 10.0, (size, size))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined, ds.StudyDescription = "CHEST", "CT CHEST"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = new_uid(), ""
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-160, -160, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness, ds.KVP = [320 / size, 320 / size], 1.0, 120
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.rint(hu + 1024).astype(np.int16).tobytes()
    ds["PixelData"].VR = "OW"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """One code sequence item."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _add_text_report(ds: Dataset) -> None:
    """Basic Text SR content: a report container holding one finding text."""
    finding = Dataset()
    finding.RelationshipType, finding.ValueType = "CONTAINS", "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = "No acute cardiopulmonary abnormality."
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ContentSequence = Sequence([finding])


def write_non_cxr(  # noqa: PLR0913 - same identity arguments as write_chest_phantom
    path: Path,
    kind: Literal["CT", "SR"],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "Phantom^Chest",
    patient_id: str = "PHANTOM-0001",
    accession: str = "ACC0001",
    study_date: str = "20261204",
    seed: int = 0,
) -> Path:
    """Write an object cxrd must skip: a 64x64 chest CT slice or a Basic Text SR (no pixels).

    Returns `path`.

    Raises:
        ValueError: `kind` is neither "CT" nor "SR".
        OSError: the file cannot be written.
    """
    if kind not in {"CT", "SR"}:
        raise ValueError(f"kind must be CT or SR, not {kind!r}")
    sop_class = CT_IMAGE if kind == "CT" else BASIC_TEXT_SR
    ds = _base_dataset(sop_class, kind, (study_uid, series_uid, sop_uid), study_date)
    ds.PatientName, ds.PatientID, ds.AccessionNumber = patient_name, patient_id, accession
    if kind == "CT":
        _add_ct_image(ds, 64, seed)
    else:
        _add_text_report(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path
