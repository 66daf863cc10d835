"""The real-parts harness itself: phantoms, storescu sending, Orthanc and MariaDB lifecycles."""

from __future__ import annotations

import shutil
import socket
import subprocess
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pydicom
import pymysql
import pytest
import requests
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
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

from cxr_daemon.sandbox import phantom
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.processes import find_program
from tests.support import unavailable

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.support.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

LOSSLESS = {
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
}
IDENTITY = {"Accept-Encoding": "identity"}


def displayed(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel values as a viewer shows them: larger = brighter (MONOCHROME1 inverted once)."""
    values = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        return float(2**ds.BitsStored - 1) - values
    return values


def region_means(image: np.ndarray) -> tuple[float, float]:
    """Mean of the image-left lung field and of the mediastinum above the heart."""
    rows, cols = image.shape
    lung = image[int(rows * 0.40) : int(rows * 0.55), int(cols * 0.22) : int(cols * 0.36)]
    mediastinum = image[int(rows * 0.30) : int(rows * 0.45), int(cols * 0.47) : int(cols * 0.53)]
    return float(lung.mean()), float(mediastinum.mean())


def require_orthanc() -> None:
    """Skip (fail under CI=true) when the Orthanc binary is not installed."""
    try:
        find_program("Orthanc")
    except FileNotFoundError as exc:
        unavailable(str(exc))


def get_json(orthanc: OrthancProcess, path: str) -> object:
    """GET a JSON resource of the sandbox Orthanc."""
    answer = requests.get(f"{orthanc.url}{path}", auth=orthanc.auth, headers=IDENTITY, timeout=10)
    answer.raise_for_status()
    return answer.json()


def stored_syntax(orthanc: OrthancProcess, study_id: str) -> set[str]:
    """Transfer syntaxes Orthanc recorded for the instances of one study."""
    instances = get_json(orthanc, f"/studies/{study_id}/instances")
    assert isinstance(instances, list)
    return {
        requests.get(
            f"{orthanc.url}/instances/{item['ID']}/metadata/TransferSyntax",
            auth=orthanc.auth,
            timeout=10,
        ).text
        for item in instances
    }


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("syntax", phantom.SUPPORTED_TRANSFER_SYNTAXES, ids=lambda u: u.name)
def test_phantom_decodes_and_looks_like_a_chest(
    tmp_path: Path, syntax: str, photometric: str
) -> None:
    """Every supported syntax decodes with pydicom and shows lungs darker than mediastinum."""
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    path = phantom.write_chest_phantom(
        tmp_path / "x.dcm",
        transfer_syntax=syntax,
        rows=512,
        cols=480,
        photometric=photometric,
        bits_stored=bits,
    )
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.pixel_array.shape == (512, 480)
    assert ds.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
    lung, mediastinum = region_means(displayed(ds))
    assert lung < 0.6 * mediastinum


@pytest.mark.parametrize("syntax", sorted(LOSSLESS - {ExplicitVRLittleEndian}))
def test_lossless_phantom_matches_uncompressed(tmp_path: Path, syntax: str) -> None:
    """Lossless syntaxes store exactly the pixels of the uncompressed phantom (same seed)."""
    reference = phantom.write_chest_phantom(tmp_path / "ref.dcm", rows=256, cols=256)
    encoded = phantom.write_chest_phantom(
        tmp_path / "enc.dcm", rows=256, cols=256, transfer_syntax=syntax
    )
    assert np.array_equal(
        pydicom.dcmread(reference).pixel_array, pydicom.dcmread(encoded).pixel_array
    )


def test_phantom_attributes_are_realistic(tmp_path: Path) -> None:
    """DX and CR phantoms carry their SOP class, anatomy, spacing, rescale and window."""
    dx = pydicom.dcmread(phantom.write_chest_phantom(tmp_path / "dx.dcm", rows=256, cols=256))
    cr = pydicom.dcmread(
        phantom.write_chest_phantom(
            tmp_path / "cr.dcm",
            modality="CR",
            photometric="MONOCHROME1",
            view_position="AP",
            rows=256,
            cols=256,
            study_uid="1.2.3.4",
            sop_uid="1.2.3.4.5",
        )
    )
    assert dx.SOPClassUID == phantom.DX_FOR_PRESENTATION
    assert dx.file_meta.MediaStorageSOPClassUID == dx.SOPClassUID
    assert dx.PresentationIntentType == "FOR PRESENTATION"
    assert (dx.RescaleSlope, dx.RescaleIntercept) == (1, 0)
    assert (dx.BodyPartExamined, dx.ViewPosition) == ("CHEST", "PA")
    assert cr.SOPClassUID == phantom.CR_IMAGE
    assert (cr.StudyInstanceUID, cr.SOPInstanceUID, cr.ViewPosition) == (
        "1.2.3.4",
        "1.2.3.4.5",
        "AP",
    )
    assert cr.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    # MONOCHROME1 stores inverted values, so its window sits at the mirrored level.
    assert float(cr.WindowCenter) > float(dx.WindowCenter)
    assert len(dx.PixelSpacing) == 2


def test_phantom_rejects_impossible_combinations(tmp_path: Path) -> None:
    """JPEG Baseline needs 8 bits; unknown modalities and syntaxes raise ValueError."""
    with pytest.raises(ValueError, match="bits_stored"):
        phantom.write_chest_phantom(tmp_path / "x.dcm", transfer_syntax=JPEGBaseline8Bit)
    with pytest.raises(ValueError, match="modality"):
        phantom.write_chest_phantom(tmp_path / "x.dcm", modality="MG")
    with pytest.raises(ValueError, match="transfer syntax"):
        phantom.write_chest_phantom(tmp_path / "x.dcm", transfer_syntax=JPEGLSLossless)


def test_non_cxr_objects(tmp_path: Path) -> None:
    """write_non_cxr makes a decodable chest CT slice and a Basic Text SR without pixels."""
    ct = pydicom.dcmread(phantom.write_non_cxr(tmp_path / "ct.dcm", "CT", study_uid="1.2.3"))
    sr = pydicom.dcmread(phantom.write_non_cxr(tmp_path / "sr.dcm", "SR", study_uid="1.2.3"))
    assert (ct.Modality, ct.BodyPartExamined, ct.pixel_array.shape) == ("CT", "CHEST", (64, 64))
    assert (sr.Modality, sr.SOPClassUID) == ("SR", phantom.BASIC_TEXT_SR)
    assert "PixelData" not in sr
    assert ct.StudyInstanceUID == sr.StudyInstanceUID == "1.2.3"
    with pytest.raises(ValueError, match="kind"):
        phantom.write_non_cxr(tmp_path / "x.dcm", "MR")  # type: ignore[arg-type]


def test_cstore_phantoms_arrive_and_become_stable(orthanc: OrthancProcess, tmp_path: Path) -> None:
    """DX uncompressed, CR MONOCHROME1 RLE and J2K, and JPEG baseline arrive as sent, stable."""
    cases: dict[str, dict[str, Any]] = {
        ExplicitVRLittleEndian: {"modality": "DX"},
        RLELossless: {"modality": "CR", "photometric": "MONOCHROME1"},
        JPEG2000Lossless: {"modality": "CR", "photometric": "MONOCHROME1"},
        JPEGBaseline8Bit: {"modality": "DX", "bits_stored": 8},
    }
    studies: dict[str, str] = {}
    paths = []
    for syntax, options in cases.items():
        studies[syntax] = phantom.new_uid()
        paths.append(
            phantom.write_chest_phantom(
                tmp_path / f"{syntax}.dcm",
                transfer_syntax=syntax,
                study_uid=studies[syntax],
                rows=512,
                cols=512,
                **options,
            )
        )
    send_files(paths, host="127.0.0.1", port=orthanc.dicom_port, called_aet=orthanc.aet)
    found = wait_until_stable(orthanc.url, orthanc.auth, studies.values(), timeout_s=30)
    assert set(found) == set(studies.values())
    for sent, study_uid in studies.items():
        # storescu proposed the file's own syntax: Orthanc stores it without transcoding.
        assert stored_syntax(orthanc, found[study_uid]) == {sent}
        study = get_json(orthanc, f"/studies/{found[study_uid]}")
        assert isinstance(study, dict)
        assert study["IsStable"] is True


DCMTK_ENCODERS = [
    ("dcmcjpeg", "+e1", JPEGLosslessSV1),
    ("dcmcjpeg", "+ee", JPEGExtended12Bit),
    ("dcmcjpls", "+el", JPEGLSLossless),
    ("dcmcjpls", "+en", JPEGLSNearLossless),
]


def test_cstore_dcmtk_encoded_syntaxes(orthanc: OrthancProcess, tmp_path: Path) -> None:
    """JPEG lossless/12-bit and JPEG-LS files (made by dcmtk) arrive with their syntax."""
    paths, studies = [], {}
    for tool, option, syntax in DCMTK_ENCODERS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (dcmtk) not installed")
        source = phantom.write_chest_phantom(
            tmp_path / f"{syntax}-src.dcm", rows=256, cols=256, study_uid=phantom.new_uid()
        )
        target = tmp_path / f"{syntax}.dcm"
        subprocess.run([tool, option, str(source), str(target)], check=True)
        studies[syntax] = str(pydicom.dcmread(target, stop_before_pixels=True).StudyInstanceUID)
        paths.append(target)
    send_files(paths, host="127.0.0.1", port=orthanc.dicom_port)
    found = wait_until_stable(orthanc.url, orthanc.auth, studies.values(), timeout_s=30)
    for syntax, study_uid in studies.items():
        assert stored_syntax(orthanc, found[study_uid]) == {syntax}


def test_cstore_shared_real_cxrs(
    orthanc: OrthancProcess, shared_data: Callable[[str], Path]
) -> None:
    """Real CXRs in JPEG 2000 (lossy) and JPEG baseline from ../shared/data arrive as sent."""
    paths = [
        shared_data("cxr/wg04_RG1_J2KI.dcm"),
        shared_data("cxr/orthanc_Issue44_Monochrome1-Jpeg.dcm"),
    ]
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths]
    send_files(paths, host="127.0.0.1", port=orthanc.dicom_port)
    found = wait_until_stable(orthanc.url, orthanc.auth, uids, timeout_s=30)
    assert stored_syntax(orthanc, found[uids[0]]) == {JPEG2000}
    assert stored_syntax(orthanc, found[uids[1]]) == {JPEGBaseline8Bit}


def test_send_failures_raise(tmp_path: Path) -> None:
    """An unproposable syntax is a ValueError before sending; a refused peer a RuntimeError."""
    path = phantom.write_chest_phantom(tmp_path / "x.dcm", rows=64, cols=64)
    odd = pydicom.dcmread(
        phantom.write_chest_phantom(
            tmp_path / "odd.dcm", rows=64, cols=64, bits_stored=8, transfer_syntax=JPEGBaseline8Bit
        )
    )
    odd.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.57")  # JPEG Lossless Process 14
    odd.save_as(tmp_path / "odd.dcm")
    with pytest.raises(ValueError, match="cannot propose"):
        send_files([path, tmp_path / "odd.dcm"], host="127.0.0.1", port=9)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(RuntimeError, match="storescu failed"):
        send_files([path], host="127.0.0.1", port=port)


def test_wait_until_stable_times_out_for_unknown_study(orthanc: OrthancProcess) -> None:
    """A study that never arrives ends in TimeoutError naming it."""
    with pytest.raises(TimeoutError, match=r"1\.2\.3\.999"):
        wait_until_stable(orthanc.url, orthanc.auth, ["1.2.3.999"], timeout_s=1)


def test_orthanc_restart_keeps_data_and_ports(orthanc: OrthancProcess, tmp_path: Path) -> None:
    """After stop/start (and after a SIGKILL) the same ports serve the same studies."""
    study_uid = phantom.new_uid()
    path = phantom.write_chest_phantom(tmp_path / "x.dcm", rows=128, cols=128, study_uid=study_uid)
    send_files([path], host="127.0.0.1", port=orthanc.dicom_port)
    before = wait_until_stable(orthanc.url, orthanc.auth, [study_uid])
    ports = (orthanc.http_port, orthanc.dicom_port)
    orthanc.restart()
    assert (orthanc.http_port, orthanc.dicom_port) == ports
    assert wait_until_stable(orthanc.url, orthanc.auth, [study_uid]) == before
    orthanc.kill()
    assert not orthanc.running
    orthanc.start()
    assert wait_until_stable(orthanc.url, orthanc.auth, [study_uid]) == before
    later = phantom.write_chest_phantom(tmp_path / "y.dcm", rows=128, cols=128)
    send_files([later], host="127.0.0.1", port=orthanc.dicom_port)  # DICOM port is back too


def test_orthanc_start_failure_reports_log(tmp_path: Path) -> None:
    """A busy HTTP port makes start() raise RuntimeError quoting Orthanc's log; no process left."""
    require_orthanc()
    server = OrthancProcess(tmp_path / "o")
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", server.http_port))  # noqa: S104 - Orthanc binds all interfaces
        squatter.listen()
        with pytest.raises(RuntimeError, match="Orthanc exited") as error:
            server.start()
    assert "HTTP" in str(error.value)
    assert not server.running


def test_orthanc_context_manager_stops_process(tmp_path: Path) -> None:
    """Leaving the with-block stops Orthanc and frees its HTTP port."""
    require_orthanc()
    with OrthancProcess(tmp_path / "o", dicomweb=False) as server:
        system = get_json(server, "/system")
        assert isinstance(system, dict)
        assert system["DicomAet"] == "ORTHANC"
    assert not server.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/system", timeout=2)


def test_mysql_url_is_a_fresh_database(mysql_url: str, mariadb_server: str) -> None:
    """mysql_url names an existing, empty database on the shared server."""
    name = mysql_url.rsplit("/", 1)[1]
    assert mysql_url.startswith(mariadb_server.rstrip("/"))
    assert name.startswith("cxrd_test_")
    port = urlsplit(mysql_url).port or 3306
    with pymysql.connect(host="127.0.0.1", port=port, user="root", database=name) as conn:
        assert conn.cursor().execute("SHOW TABLES") == 0


def test_mariadb_stop_start_keeps_data(private_mariadb: MariaDBServer) -> None:
    """A stopped MariaDB refuses connections; started again, same port, data still there."""
    with private_mariadb.connect() as conn, conn.cursor() as cursor:
        cursor.execute("CREATE DATABASE outage")
        cursor.execute("CREATE TABLE outage.t (id INT PRIMARY KEY)")
        cursor.execute("INSERT INTO outage.t VALUES (1), (2)")
    port = private_mariadb.port
    private_mariadb.stop()
    assert not private_mariadb.running
    with pytest.raises(pymysql.err.OperationalError):
        private_mariadb.connect()
    private_mariadb.start()
    assert private_mariadb.port == port
    with private_mariadb.connect() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM outage.t")
        assert cursor.fetchone() == (2,)
    private_mariadb.kill()  # a crash: InnoDB recovery at the next start
    private_mariadb.start()
    with private_mariadb.connect("outage") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM t")
        assert cursor.fetchone() == (2,)
