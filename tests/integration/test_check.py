"""`cxrd check` against the real sandbox: all up, then one dependency down at a time."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from cxr_daemon.sandbox.orthanc import OrthancProcess
from cxr_daemon.sandbox.processes import free_loopback_ports
from tests.support.daemon import cxrd
from tests.support.mariadb import MariaDBServer

pytestmark = pytest.mark.integration

NAMES = ["orthanc", "database", "s3", "segmentation", "classification", "bedrock"]
# One attempt per check and loopback refusals: a failing check answers at once.
CHECK_WALL_S = 30


def check(config: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, tuple[str, str]]]:
    """Run `cxrd check`; return the process and {name: (OK|FAIL, detail)} from its lines."""
    began = time.monotonic()
    done = cxrd("check", config=config, timeout=120)
    assert time.monotonic() - began < CHECK_WALL_S, done.stdout
    lines: dict[str, tuple[str, str]] = {}
    for line in done.stdout.splitlines():
        status, name, detail = line.split(maxsplit=2)
        lines[name] = (status, detail)
    assert list(lines) == NAMES, done.stdout + done.stderr
    return done, lines


def failed(lines: dict[str, tuple[str, str]]) -> list[str]:
    return [name for name, (status, _) in lines.items() if status != "OK"]


def test_all_dependencies_up_exits_zero(sandbox_config: Path, s3_server: str, bucket: str) -> None:
    """Every dependency answers: six OK lines, exit 0, and the S3 probe object is gone."""
    done, lines = check(sandbox_config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert failed(lines) == []
    assert lines["orthanc"][1].startswith("Orthanc ")
    assert "schema v" in lines["database"][1]
    assert lines["s3"][1] == f"s3://{bucket}/test/ writable"
    assert lines["segmentation"][1].endswith("/segmentation ready")
    assert lines["bedrock"][1] == "(not used: backend template)"
    listed = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").list_objects_v2(
        Bucket=bucket
    )
    assert listed.get("KeyCount", 0) == 0  # probe put under test/.cxrd-check/, then deleted


def test_orthanc_stopped_fails_only_orthanc(sandbox_config: Path, orthanc: OrthancProcess) -> None:
    """With Orthanc down its line fails as unreachable, the others stay OK, exit 1."""
    orthanc.stop()
    done, lines = check(sandbox_config)
    assert done.returncode == 1
    assert failed(lines) == ["orthanc"]
    assert "unreachable" in lines["orthanc"][1]


def test_orthanc_wrong_password_fails_naming_the_credentials(sandbox_config: Path) -> None:
    """A refused password is reported as a credentials problem, not as an outage."""
    text = sandbox_config.read_text()
    sandbox_config.write_text(text.replace('password = "', 'password = "wrong-', 1))
    done, lines = check(sandbox_config)
    assert done.returncode == 1
    assert failed(lines) == ["orthanc"]
    assert "credentials" in lines["orthanc"][1]
    assert "401" in lines["orthanc"][1]


def test_mariadb_stopped_fails_only_the_database(
    private_mariadb: MariaDBServer,
    make_config: Callable[..., Path],
) -> None:
    """With the database server stopped its line fails as unavailable, exit 1."""
    with private_mariadb.connect() as conn, conn.cursor() as cursor:
        cursor.execute("CREATE DATABASE cxrd")
    config = make_config(database_url=private_mariadb.url + "cxrd")
    private_mariadb.stop()
    done, lines = check(config)
    assert done.returncode == 1
    assert failed(lines) == ["database"]
    assert "database unavailable" in lines["database"][1]


def test_old_schema_fails_the_database_with_the_fix(
    make_config: Callable[..., Path],
) -> None:
    """A database never migrated fails its check saying to run `cxrd db migrate`."""
    config = make_config(migrate=False)
    done, lines = check(config)
    assert done.returncode == 1
    assert failed(lines) == ["database"]
    assert "cxrd db migrate" in lines["database"][1]


def test_wrong_bucket_fails_only_s3(sandbox_config: Path, bucket: str) -> None:
    """A bucket that does not exist fails the S3 line with S3's error code."""
    sandbox_config.write_text(
        sandbox_config.read_text().replace(f'bucket = "{bucket}"', 'bucket = "no-such-bucket"')
    )
    done, lines = check(sandbox_config)
    assert done.returncode == 1
    assert failed(lines) == ["s3"]
    assert "NoSuchBucket" in lines["s3"][1]


def test_model_server_on_a_closed_port_fails_both_models(
    sandbox_config: Path, model_server: str
) -> None:
    """Model URLs on a port nobody listens on fail segmentation and classification."""
    (closed,) = free_loopback_ports(1)
    sandbox_config.write_text(
        sandbox_config.read_text().replace(model_server, f"http://127.0.0.1:{closed}")
    )
    done, lines = check(sandbox_config)
    assert done.returncode == 1
    assert failed(lines) == ["segmentation", "classification"]
    for name in ("segmentation", "classification"):
        assert f"127.0.0.1:{closed}" in lines[name][1]
        assert "ConnectionError" in lines[name][1]
