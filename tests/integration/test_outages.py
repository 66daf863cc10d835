"""Outages of each dependency against a live daemon: it keeps running and loses nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.domain import StudyState
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.phantom import new_uid, write_chest_phantom
from tests.support.daemon import DaemonProcess, cxrd, held_daemon
from tests.support.faultproxy import FaultProxy
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration
OUTAGE_S = 30


def send_cxr(orthanc: OrthancProcess, tmp_path: Path, name: str, *, wait: bool = True) -> str:
    uid = str(new_uid())
    path = write_chest_phantom(tmp_path / f"{name}.dcm", study_uid=uid, rows=256, cols=224)
    send_files([path], host="127.0.0.1", port=orthanc.dicom_port)
    if wait:
        wait_until_stable(orthanc.url, orthanc.auth, [uid], timeout_s=60)
    return uid


def state_of(url: str, uid: str) -> tuple[StudyState, int, str] | None:
    store = SqlStore(url)
    try:
        row = store.study_row(uid)
    finally:
        store.close()
    return (row.state, row.attempts, row.reason) if row else None


def wait_for_state(url: str, uid: str, state: StudyState, timeout_s: float = 90) -> Any:
    return wait_until(
        lambda: (s := state_of(url, uid)) is not None and s[0] is state and s,
        timeout_s, f"study {uid} {state.value}",
    )  # fmt: skip


def runs_of(url: str, uid: str) -> list[str]:
    store = SqlStore(url)
    try:
        return [r.outcome for r in store.runs(uid)]
    finally:
        store.close()


def orthanc_last(orthanc: OrthancProcess) -> int:
    answer = requests.get(f"{orthanc.url}/changes", params={"last": ""}, auth=orthanc.auth,
                          timeout=10)  # fmt: skip
    return int(answer.json()["Last"])


@pytest.fixture
def setup(
    s3_server: str,
    model: Any,
    make_config: Callable[..., Path],
) -> dict[str, Any]:
    proxy = FaultProxy(s3_server).__enter__()
    config = make_config(s3_endpoint=proxy.url, model_url=model.url)
    yield {"config": config, "proxy": proxy, "model": model}  # type: ignore[misc]
    proxy.__exit__()


def test_orthanc_down_while_reading_the_feed(
    orthanc: OrthancProcess, mysql_url: str, setup: dict[str, Any], tmp_path: Path
) -> None:
    """Orthanc stopped under a live daemon: it backs off, keeps running, and picks up
    the next study once Orthanc is back; the checkpoint ends at Orthanc's Last."""
    first = send_cxr(orthanc, tmp_path, "a")
    daemon = DaemonProcess(setup["config"])
    try:
        wait_for_state(mysql_url, first, StudyState.DONE)
        orthanc.stop()
        # The fault itself lasts 30 s (a PACS restart, a network blip): waiting out
        # its duration here is the fault being injected, not synchronisation.
        threading.Event().wait(OUTAGE_S)
        errors = [line for line in daemon.lines if '"loop_error"' in line]
        assert len(errors) >= 3, daemon.output()
        assert all("Orthanc unreachable" in line for line in errors)
        assert daemon.proc.poll() is None
        orthanc.start()
        second = send_cxr(orthanc, tmp_path, "b")
        wait_for_state(mysql_url, second, StudyState.DONE, timeout_s=120)
        store = SqlStore(mysql_url)
        try:
            wait_until(lambda: store.checkpoint() == orthanc_last(orthanc), 30, "checkpoint")
        finally:
            store.close()
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_s3_500_burst_is_retried_and_the_study_done(
    orthanc: OrthancProcess, mysql_url: str, setup: dict[str, Any], tmp_path: Path
) -> None:
    """Four S3 500s in a row: the first attempt gives up after 3 tries (pending, backoff),
    the second succeeds; one failed run, one done run."""
    setup["proxy"].fail_next(4)
    uid = send_cxr(orthanc, tmp_path, "s3")
    daemon = DaemonProcess(setup["config"])
    try:
        _, attempts, _ = wait_for_state(mysql_url, uid, StudyState.DONE)
        assert attempts == 2
        assert runs_of(mysql_url, uid) == ["failed", "done"]
        assert setup["proxy"].failed == 4
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_model_503_then_recovery(
    orthanc: OrthancProcess, mysql_url: str, setup: dict[str, Any], tmp_path: Path
) -> None:
    """The model server answers 503 five times, then recovers: the study ends done."""
    setup["model"].faults.fail_next(count=5, status=503)
    uid = send_cxr(orthanc, tmp_path, "m503")
    daemon = DaemonProcess(setup["config"])
    try:
        _, attempts, _ = wait_for_state(mysql_url, uid, StudyState.DONE)
        assert attempts == 2
        assert setup["model"].faults.pending() == 0
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_model_error_424_fails_at_once_and_reprocess_succeeds_after(
    orthanc: OrthancProcess, mysql_url: str, setup: dict[str, Any], tmp_path: Path
) -> None:
    """ModelError (424) fails the study on its first attempt with the reason; status lists
    it; once the model is fixed, `cxrd reprocess` makes it done."""
    setup["model"].faults.fail_next(count=1, status=424)
    uid = send_cxr(orthanc, tmp_path, "m424")
    run = cxrd("run", "--once", config=setup["config"])
    assert run.returncode == 0, run.stderr[-2000:]
    state, attempts, reason = state_of(mysql_url, uid) or (None, 0, "")
    assert (state, attempts) == (StudyState.FAILED, 1)
    assert "ModelError" in reason
    status = cxrd("status", config=setup["config"])
    assert f"FAILED {uid} after 1 attempts" in status.stdout
    again = cxrd("reprocess", uid, config=setup["config"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert state_of(mysql_url, uid)[0] is StudyState.DONE  # type: ignore[index]
    assert runs_of(mysql_url, uid) == ["failed", "done"]


def test_mariadb_down_while_a_study_runs(
    orthanc: OrthancProcess,
    private_mariadb: Any,
    tmp_path: Path,
    make_config: Callable[..., Path],
) -> None:
    """MariaDB stopped while a study is in the pipeline: the daemon keeps running, and once
    the database is back the study ends done with exactly one done run."""
    with private_mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE cxrd")
    url = private_mariadb.url.rstrip("/") + "/cxrd"
    config = make_config(database_url=url)
    uid = send_cxr(orthanc, tmp_path, "db")
    daemon, block = held_daemon(config, tmp_path)
    try:
        private_mariadb.stop()
        block.unlink()
        daemon.wait_for_log("study_state_not_recorded")
        daemon.wait_for_log('"loop_error"')
        assert daemon.proc.poll() is None
        private_mariadb.start()
        wait_for_state(url, uid, StudyState.DONE)
        outcomes = runs_of(url, uid)
        assert outcomes.count("done") == 1, outcomes
        assert "running" not in outcomes
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0, daemon.output()
