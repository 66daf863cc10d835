"""Real servers for integration tests: a throwaway Orthanc and MariaDB on loopback ports.

A server that cannot start here skips the test with the reason; under `CI=true` it fails.
`CXRD_TEST_MYSQL_URL` (e.g. mysql://root@127.0.0.1:3306/) uses an existing server instead
of starting `mariadbd`.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pymysql
import pytest

from cxr_daemon.sandbox.orthanc import OrthancProcess
from tests.support import unavailable
from tests.support.daemon import AWS_TEST_ENV, cxrd, write_config
from tests.support.mariadb import MariaDBServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


def connect(server_url: str, database: str | None = None) -> pymysql.connections.Connection:
    """Autocommit pymysql connection for a mysql://user[:password]@host:port/ URL."""
    parts = urlsplit(server_url)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=database,
        connect_timeout=5,
        autocommit=True,
    )


def start_mariadb(workdir: Path) -> MariaDBServer:
    """Start a MariaDBServer in `workdir`, or skip/fail with the reason it could not."""
    server = MariaDBServer(workdir)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        unavailable(f"cannot start a throwaway MariaDB: {exc}")
    return server


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Server URL (no database) of $CXRD_TEST_MYSQL_URL or of a throwaway mariadbd."""
    external = os.environ.get("CXRD_TEST_MYSQL_URL")
    if external:
        try:
            connect(external).close()
        except pymysql.err.MySQLError as exc:
            unavailable(f"CXRD_TEST_MYSQL_URL={external} is not reachable: {exc}")
        yield external
        return
    server = start_mariadb(tmp_path_factory.mktemp("mariadb"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def mysql_url(mariadb_server: str) -> Iterator[str]:
    """URL of a fresh, empty database cxrd_test_<hex> on the shared server; dropped after."""
    name = f"cxrd_test_{uuid.uuid4().hex[:12]}"
    with connect(mariadb_server) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield mariadb_server.rstrip("/") + f"/{name}"
    finally:
        with connect(mariadb_server) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def private_mariadb(tmp_path: Path) -> Iterator[MariaDBServer]:
    """A MariaDBServer of this test alone, which it may stop, kill and restart."""
    server = start_mariadb(tmp_path / "mariadb")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    """A started private Orthanc (StableAge 1 s, DICOMweb on) in tmp_path; stopped after."""
    server = OrthancProcess(tmp_path / "orthanc", stable_age_s=1)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        unavailable(f"cannot start a throwaway Orthanc: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local S3 (moto in server mode) on a free loopback port; its endpoint URL."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 - test-only, heavy import

    from cxr_daemon.sandbox.processes import free_loopback_ports  # noqa: PLC0415

    for key, value in AWS_TEST_ENV.items():
        os.environ.setdefault(key, value)
    (port,) = free_loopback_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the local S3."""
    import boto3  # noqa: PLC0415

    name = f"cxrd-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def model_server() -> Iterator[str]:
    """The reference model server (not a medical model) on a free loopback port."""
    from cxr_daemon.modelserver import ModelServer  # noqa: PLC0415

    with ModelServer() as server:
        yield server.url


@pytest.fixture
def model() -> Iterator[object]:
    """A reference model server of this test alone, whose faults the test may arm."""
    from cxr_daemon.modelserver import ModelServer  # noqa: PLC0415

    with ModelServer() as server:
        yield server


@pytest.fixture
def make_config(
    orthanc: OrthancProcess, mysql_url: str, s3_server: str, bucket: str, model_server: str,
    tmp_path: Path,
) -> Callable[..., Path]:  # fmt: skip
    """Write a cxrd config on the real sandbox (Orthanc, MariaDB, local S3, model server)
    and migrate its database; keyword arguments override ``write_config``'s, and
    ``migrate=False`` leaves the database as it is."""

    def make(*, database_url: str = "", migrate: bool = True, **overrides: Any) -> Path:
        services = {"s3_endpoint": s3_server, "bucket": bucket, "model_url": model_server}
        path = write_config(tmp_path / "cxrd.toml", orthanc, database_url or mysql_url,
                            **{**services, **overrides})  # fmt: skip
        if migrate:
            migrated = cxrd("db", "migrate", config=path)
            assert migrated.returncode == 0, migrated.stderr
        return path

    return make


@pytest.fixture
def sandbox_config(make_config: Callable[..., Path]) -> Path:
    """A migrated cxrd config on the real sandbox: Orthanc, MariaDB, local S3, model server."""
    return make_config()
