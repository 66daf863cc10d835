"""The spine end to end: C-STORE to a real Orthanc, `cxrd run --once` on a real MariaDB."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests
from pydicom.uid import RLELossless

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyState
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom, write_non_cxr
from tests.support.daemon import cxrd, held_daemon

pytestmark = pytest.mark.integration


def orthanc_last(orthanc: OrthancProcess) -> int:
    answer = requests.get(
        f"{orthanc.url}/changes", params={"last": ""}, auth=orthanc.auth, timeout=10
    )
    answer.raise_for_status()
    return int(answer.json()["Last"])


def send_and_wait(orthanc: OrthancProcess, files: list[Path], uids: list[str]) -> None:
    send_files(files, host="127.0.0.1", port=orthanc.dicom_port)
    wait_until_stable(orthanc.url, orthanc.auth, uids, timeout_s=60)


@pytest.fixture
def config(sandbox_config: Path) -> Path:
    """The migrated sandbox config (see conftest)."""
    return sandbox_config


def five_studies(tmp: Path) -> tuple[list[Path], dict[str, str]]:
    """3 CXR (DX two views, DX, CR MONOCHROME1 RLE), 1 CT, 1 SR-only; returns files, uid->kind."""
    tmp.mkdir()
    kinds: dict[str, str] = {}
    files: list[Path] = []
    two_views = str(new_uid())
    for n, view in enumerate(("PA", "LL")):
        files.append(
            write_chest_phantom(
                tmp / f"dx2_{n}.dcm",
                study_uid=two_views,
                view_position=view,
                rows=256,
                cols=256,
                seed=n,
            )
        )
    kinds[two_views] = "cxr"
    for name, kwargs in {
        "dx": {"modality": "DX"},
        "cr": {"modality": "CR", "photometric": "MONOCHROME1", "transfer_syntax": RLELossless},
    }.items():
        uid = str(new_uid())
        files.append(
            write_chest_phantom(tmp / f"{name}.dcm", study_uid=uid, rows=256, cols=256, **kwargs)
        )  # type: ignore[arg-type]
        kinds[uid] = "cxr"
    for kind in ("CT", "SR"):
        uid = str(new_uid())
        files.append(write_non_cxr(tmp / f"{kind}.dcm", kind, study_uid=uid))  # type: ignore[arg-type]
        kinds[uid] = kind
    return files, kinds


def test_run_once_processes_cxr_skips_others_and_is_idempotent(
    orthanc: OrthancProcess, mysql_url: str, config: Path, tmp_path: Path
) -> None:
    """5 studies by C-STORE -> 3 done, 2 skipped with reasons, checkpoint = Orthanc's Last;
    a second --once adds no run and duplicates no row."""
    files, kinds = five_studies(tmp_path / "dicom")
    send_and_wait(orthanc, files, list(kinds))
    first = cxrd("run", "--once", config=config)
    assert first.returncode == 0, first.stderr[-3000:]

    store = SqlStore(mysql_url)
    try:
        for uid, kind in kinds.items():
            row = store.study_row(uid)
            assert row is not None, uid
            if kind == "cxr":
                assert row.state is StudyState.DONE, (uid, row.reason)
            else:
                assert row.state is StudyState.SKIPPED, uid
                assert f"series are {kind}/" in row.reason
        assert store.counts()["done"] == 3
        assert store.counts()["skipped"] == 2
        assert store.checkpoint() == orthanc_last(orthanc)
        tables = ("studies", "runs", "instances")
        before = {t: _count(store, t) for t in tables}
        assert before == {"studies": 5, "runs": 3, "instances": 4}

        second = cxrd("run", "--once", config=config)
        assert second.returncode == 0, second.stderr[-3000:]
        assert {t: _count(store, t) for t in tables} == before
        assert store.checkpoint() == orthanc_last(orthanc)
    finally:
        store.close()


def _count(store: SqlStore, table: str) -> int:
    with store.raw() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cur.fetchone()[0])


def _one_cxr(orthanc: OrthancProcess, tmp_path: Path) -> str:
    uid = str(new_uid())
    path = write_chest_phantom(tmp_path / "one.dcm", study_uid=uid, rows=256, cols=256)
    send_and_wait(orthanc, [path], [uid])
    return uid


def test_sigkill_while_running_is_reclaimed_and_done_exactly_once(
    orthanc: OrthancProcess, mysql_url: str, config: Path, tmp_path: Path
) -> None:
    """A daemon killed with SIGKILL mid-study leaves it running; the restart finishes it once."""
    uid = _one_cxr(orthanc, tmp_path)
    daemon, block = held_daemon(config, tmp_path)
    assert (block.parent / "at-record").read_text() == uid
    daemon.proc.send_signal(signal.SIGKILL)
    assert daemon.proc.wait(30) == -signal.SIGKILL

    store = SqlStore(mysql_url)
    try:
        row = store.study_row(uid)
        assert row is not None
        assert row.state is StudyState.RUNNING
        restart = cxrd("run", "--once", config=config)
        assert restart.returncode == 0, restart.stderr[-3000:]
        assert '"reclaimed": 1' in restart.stderr
        row = store.study_row(uid)
        assert row is not None
        assert row.state is StudyState.DONE
        outcomes = [r.outcome for r in store.runs(uid)]
        assert outcomes == ["interrupted", "done"]
        assert _count(store, "instances") == 1
    finally:
        store.close()


def test_sigterm_finishes_the_study_in_hand_and_exits_0(
    orthanc: OrthancProcess, mysql_url: str, config: Path, tmp_path: Path
) -> None:
    """First SIGTERM: stop claiming, finish the held study, commit, exit 0."""
    uid = _one_cxr(orthanc, tmp_path)
    daemon, block = held_daemon(config, tmp_path)
    daemon.proc.send_signal(signal.SIGTERM)
    block.unlink()  # the study in hand may now finish
    assert daemon.proc.wait(30) == 0, daemon.output()
    store = SqlStore(mysql_url)
    try:
        row = store.study_row(uid)
        assert row is not None
        assert row.state is StudyState.DONE
    finally:
        store.close()
    assert '"signal_received": true' in daemon.output()


def test_second_signal_exits_at_once(
    orthanc: OrthancProcess, mysql_url: str, config: Path, tmp_path: Path
) -> None:
    """A second SIGTERM while the study in hand is still held exits non-zero immediately."""
    _one_cxr(orthanc, tmp_path)
    daemon, _ = held_daemon(config, tmp_path)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_for_log("shutdown_requested")  # standard signals coalesce: one at a time
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 1
    daemon.wait_for_log("second signal")
