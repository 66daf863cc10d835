"""The cxrd command line: exit codes, one-line errors, status JSON, migrate."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import responses
from typer.testing import CliRunner

from cxr_daemon.adapters.db import SqlStore
from cxr_daemon.cli import app
from cxr_daemon.domain import StudyRef, StudyState

ORTHANC = "http://orthanc.test:8042"
runner = CliRunner()


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "cxrd.toml"
    path.write_text(
        f'[s3]\nbucket = "b"\n[orthanc]\nurl = "{ORTHANC}"\ntimeout_s = 1\n'
        f'[database]\nurl = "sqlite://{tmp_path / "db" / "cxrd.db"}"\n[log]\nformat = "json"\n'
    )
    return path


def db(cfg: Path) -> SqlStore:
    return SqlStore(f"sqlite://{cfg.parent / 'db' / 'cxrd.db'}")


def test_db_migrate_is_idempotent(cfg: Path) -> None:
    """The first migrate creates the schema, the second says it is current."""
    first = runner.invoke(app, ["db", "migrate", "--config", str(cfg)])
    assert first.exit_code == 0, first.output
    assert "migrated from version 0 to 1" in first.stdout
    second = runner.invoke(app, ["db", "migrate", "--config", str(cfg)])
    assert second.exit_code == 0
    assert "schema is current (version 1)" in second.stdout


def test_run_refuses_an_old_schema_with_one_line(cfg: Path) -> None:
    """run on an unmigrated database exits 2 and says to run cxrd db migrate."""
    result = runner.invoke(app, ["run", "--once", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "schema is version 0" in result.stderr
    assert "cxrd db migrate" in result.stderr


def test_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    """A bad config is one stderr line naming file and key, exit 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[s3]\nbucket = "b"\n[orthanc]\nsince = 3\n')
    result = runner.invoke(app, ["status", "--config", str(bad)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "orthanc.since: unknown key" in lines[0]


@responses.activate
def test_status_json_has_the_documented_shape(cfg: Path) -> None:
    """status --json prints checkpoint, orthanc_last, lag, counts and failures."""
    runner.invoke(app, ["db", "migrate", "--config", str(cfg)])
    store = db(cfg)
    store.record_feed_page([StudyRef("1.2.3", "a"), StudyRef("1.2.4", "b")], [], 10)
    claimed = store.claim(datetime.now(UTC))
    assert claimed is not None
    store.finish_study(claimed.study_uid, StudyState.FAILED, "Orthanc answered HTTP 400")
    store.close()
    responses.get(f"{ORTHANC}/changes", json={"Changes": [], "Done": True, "Last": 16})
    result = runner.invoke(app, ["status", "--json", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["checkpoint"], data["orthanc_last"], data["lag"]) == (10, 16, 6)
    assert data["counts"]["pending"] == 1
    assert data["counts"]["failed"] == 1
    assert data["failures"] == [
        {"study_uid": "1.2.3", "attempts": 1, "reason": "Orthanc answered HTTP 400"}
    ]


@responses.activate
def test_status_reports_unreachable_orthanc_instead_of_crashing(cfg: Path) -> None:
    """With Orthanc down, status still prints the queue and says why lag is unknown."""
    runner.invoke(app, ["db", "migrate", "--config", str(cfg)])
    responses.get(f"{ORTHANC}/changes", status=503)
    result = runner.invoke(app, ["status", "--json", "--config", str(cfg)])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["lag"] is None
    assert "503" in data["orthanc_error"]


def test_status_of_one_study_and_of_an_unknown_one(cfg: Path) -> None:
    """status --study shows state and runs; an unknown study exits 1 with a message."""
    runner.invoke(app, ["db", "migrate", "--config", str(cfg)])
    store = db(cfg)
    store.record_feed_page([StudyRef("1.2.3", "a")], [], 1)
    store.close()
    result = runner.invoke(app, ["status", "--json", "--study", "1.2.3", "--config", str(cfg)])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["state"] == "pending"
    unknown = runner.invoke(app, ["status", "--study", "9.9", "--config", str(cfg)])
    assert unknown.exit_code == 1
    assert "never seen study 9.9" in unknown.stderr
