"""Send DICOM files to a PACS with dcmtk's `storescu`, as a modality would (C-STORE).

`storescu` cannot transcode and proposes only uncompressed transfer syntaxes unless told
otherwise, so files are grouped by transfer syntax and each group is sent with the
proposal flag its syntax needs (FACTS.md). Each syntax in `PROPOSAL_FLAGS` was checked to
arrive in Orthanc 1.10 (see tests/integration/test_sandbox.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cxr_daemon.sandbox.processes import find_program

if TYPE_CHECKING:
    from collections.abc import Iterable

# storescu flag per transfer syntax; "" = its default (all uncompressed syntaxes).
# JPEG Lossless Process 14 (.57) has no flag: -xs proposes only SV1 (.70).
PROPOSAL_FLAGS: dict[UID, str] = {
    ImplicitVRLittleEndian: "",
    ExplicitVRLittleEndian: "",
    ExplicitVRBigEndian: "",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    RLELossless: "-xr",
}
STORESCU = "storescu"
# Command lines stay far below ARG_MAX even with long paths.
_BATCH = 200
_TIMEOUT_S = 300


def _transfer_syntax(path: Path) -> UID:
    """The file's transfer syntax, from its File Meta Information only."""
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError as exc:
        raise ValueError(f"{path}: not a DICOM file with File Meta Information ({exc})") from exc
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ValueError(f"{path}: no TransferSyntaxUID in its File Meta Information")
    if syntax not in PROPOSAL_FLAGS:
        raise ValueError(f"{path}: storescu cannot propose {syntax} ({UID(syntax).name})")
    return UID(syntax)


def _group(paths: Iterable[Path]) -> dict[UID, list[Path]]:
    """Files by transfer syntax, in order of first appearance."""
    groups: dict[UID, list[Path]] = {}
    for path in paths:
        groups.setdefault(_transfer_syntax(path), []).append(path)
    return groups


def _storescu(command: list[str], flag: str, peer: list[str], files: list[Path]) -> None:
    """Run one storescu association; raise RuntimeError with its output on failure."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed binary, arguments are not shell-parsed
            [*command, *([flag] if flag else []), *peer, *map(str, files)],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"storescu timed out after {_TIMEOUT_S} s: {exc.output}") from exc
    output = done.stdout + done.stderr
    # storescu may exit 0 after a refused store (e.g. no accepted presentation context),
    # so its error lines count too.
    errors = [line for line in output.splitlines() if line.startswith(("E:", "F:"))]
    if done.returncode != 0 or errors:
        raise RuntimeError(f"storescu failed (exit {done.returncode}): {output.strip()}")


def send_files(
    paths: Iterable[Path | str],
    *,
    host: str,
    port: int,
    called_aet: str = "ORTHANC",
    calling_aet: str = "CXRD-MODALITY",
) -> None:
    """C-STORE `paths` to host:port, one association per transfer syntax (and batch).

    Raises:
        FileNotFoundError: `storescu` (dcmtk) is not installed, or a file does not exist.
        ValueError: a file is not DICOM or has a transfer syntax storescu cannot propose;
            raised before anything is sent.
        RuntimeError: storescu failed (association refused, store failed, timeout); the
            message holds storescu's output.
    """
    binary = find_program(STORESCU)
    groups = _group(Path(path) for path in paths)
    # -R: propose only the SOP classes of the files sent, not dcmtk's list of ~120.
    command = [binary, "-aet", calling_aet, "-aec", called_aet, "-R", "-to", "10"]
    for syntax, files in groups.items():
        for start in range(0, len(files), _BATCH):
            batch = files[start : start + _BATCH]
            _storescu(command, PROPOSAL_FLAGS[syntax], [host, str(port)], batch)
