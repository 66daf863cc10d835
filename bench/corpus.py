"""The benchmark's studies: realistic chest X-ray DICOM files, made once and cloned.

A phantom of 2500x3000 pixels takes 5-15 s to synthesise, so each kind of image
is made once with ``write_chest_phantom`` (and dcmtk's ``dcmcjpeg`` for JPEG
Lossless), cached under ``bench/.cache/``, and every study is a clone with fresh
UIDs: the pixel data (and its compressed stream) is kept byte for byte, so each
clone costs the pipeline exactly what its template does. The two views of a
study share their pixels; only ViewPosition and the UIDs differ.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless

from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom
from cxr_daemon.sandbox.processes import find_program

CACHE = Path(__file__).resolve().parent / ".cache" / "templates"

# Template name -> write_chest_phantom arguments (rows x cols as a detector reads out).
TEMPLATES: dict[str, dict[str, object]] = {
    "dx16": {"rows": 3000, "cols": 2500, "bits_stored": 16},
    "dx16_4k": {"rows": 4000, "cols": 4000, "bits_stored": 16, "seed": 1},
    "cr12_j2k": {"rows": 3000, "cols": 2500, "bits_stored": 12, "modality": "CR",
                 "photometric": "MONOCHROME1", "transfer_syntax": JPEG2000Lossless, "seed": 2},
    "dx12_small": {"rows": 1024, "cols": 1024, "bits_stored": 12, "seed": 3},
}  # fmt: skip
# Made from another template with dcmcjpeg: name -> (source template, dcmcjpeg option).
DERIVED: dict[str, tuple[str, str]] = {
    "dx16_jpegll": ("dx16", "+e1"),  # JPEG Lossless, first-order prediction (SV1)
}

# Study kind -> (template of each view, in order PA, LL).
KINDS: dict[str, tuple[str, ...]] = {
    "dx16": ("dx16", "dx16"),
    "dx16_4k": ("dx16_4k", "dx16"),
    "j2k": ("cr12_j2k", "cr12_j2k"),
    "jpegll": ("dx16_jpegll", "dx16_jpegll"),
    "small": ("dx12_small",),
    "single_4k": ("dx16_4k",),
}
VIEWS = ("PA", "LL")
# The mix for N studies cycles through this: half uncompressed 16-bit, one in
# eight with a 4000x4000 view, the rest JPEG 2000 or JPEG Lossless.
MIX = ("dx16", "j2k", "dx16", "jpegll", "dx16", "dx16_4k", "dx16", "j2k",
       "dx16", "jpegll", "dx16", "j2k", "dx16", "dx16_4k", "dx16", "jpegll")  # fmt: skip


@dataclass(frozen=True)
class Study:
    """One study written for the benchmark: its UID, kind and files."""

    study_uid: str
    kind: str
    files: tuple[Path, ...]

    @property
    def bytes(self) -> int:
        """Total size of its files."""
        return sum(path.stat().st_size for path in self.files)


def mix(count: int, cycle: list[str] | None = None) -> list[str]:
    """Study kinds for ``count`` studies: the realistic mix, or ``cycle`` repeated."""
    kinds = cycle or MIX
    return [kinds[n % len(kinds)] for n in range(count)]


def template(name: str) -> Path:
    """The cached template file ``name``, made first if missing or out of date.

    Raises:
        FileNotFoundError: dcmcjpeg (dcmtk) is needed and not installed.
        subprocess.CalledProcessError: dcmcjpeg failed.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{_fingerprint(name)}.dcm"
    if path.exists():
        return path
    partial = path.with_suffix(".part")
    if name in DERIVED:
        source, option = DERIVED[name]
        command = [find_program("dcmcjpeg"), option, str(template(source)), str(partial)]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
    else:
        write_chest_phantom(partial, **TEMPLATES[name])  # type: ignore[arg-type]
    partial.rename(path)
    return path


def _fingerprint(name: str) -> str:
    """A short hash of how template ``name`` is made, so a changed recipe is remade."""
    recipe: object = TEMPLATES.get(name)
    if name in DERIVED:
        source, option = DERIVED[name]
        recipe = [_fingerprint(source), option]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def write_study(folder: Path, kind: str, number: int) -> Study:
    """Clone the templates of ``kind`` into a new study (fresh UIDs, fake patient)."""
    study_uid = new_uid()
    files = []
    for index, name in enumerate(KINDS[kind]):
        ds = pydicom.dcmread(template(name))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID, ds.SOPInstanceUID = new_uid(), new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = ds.InstanceNumber = index + 1
        ds.ViewPosition = VIEWS[index]
        ds.StudyDescription = ds.SeriesDescription = f"XR CHEST {VIEWS[index]}"
        ds.PatientName, ds.PatientID = f"BENCH^{number:04d}", f"BENCH-{number:04d}"
        ds.AccessionNumber = f"BENCH{number:06d}"
        path = folder / f"{number:04d}-{index}-{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(str(study_uid), kind, tuple(files))


def write_studies(folder: Path, kinds: list[str], first_number: int = 1) -> list[Study]:
    """Write one study per kind into ``folder``, numbered from ``first_number``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_study(folder, kind, first_number + n) for n, kind in enumerate(kinds)]


def warm_templates(kinds: set[str]) -> list[str]:
    """Make every template the kinds need; return the names that had to be made."""
    made = []
    for name in sorted({name for kind in kinds for name in KINDS[kind]}):
        if not any(CACHE.glob(f"{name}-{_fingerprint(name)}.dcm")):
            made.append(name)
        template(name)
    return made
