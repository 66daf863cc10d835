"""The benchmark sandbox: real Orthanc, moto's S3 server, the reference model server, a DB.

Everything binds 127.0.0.1 and is stopped by the ``ExitStack`` that started it,
on Ctrl-C and SIGTERM too (run.py turns SIGTERM into KeyboardInterrupt).
moto runs as its own process (``moto_server``) so that storing hundreds of MB
does not compete with the model server for one interpreter's GIL; the model
server runs in this process, where its latency can be changed between runs.
"""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import boto3
import pymysql
import requests
from botocore.config import Config as BotoConfig
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from cxr_daemon.modelserver import ModelServer
from cxr_daemon.sandbox.dicomsend import send_files
from cxr_daemon.sandbox.orthanc import OrthancProcess, wait_until_stable
from cxr_daemon.sandbox.processes import Supervised, free_loopback_ports

REGION = "us-east-1"
# Only moto sees these; they keep boto3's credential chain off instance metadata.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "cxrd-bench",
    "AWS_SECRET_ACCESS_KEY": "cxrd-bench",
    "AWS_DEFAULT_REGION": REGION,
}
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
STABLE_AGE_S = 1


class MotoProcess(Supervised):
    """``moto_server`` (S3 and friends, in memory) on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self._workdir = workdir
        (self.port,) = free_loopback_ports(1)
        self.stop_timeout_s = 10.0

    @property
    def url(self) -> str:
        """The endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Spawn moto_server and wait until it answers.

        Raises:
            RuntimeError: it did not answer within 30 s.
        """
        self._workdir.mkdir(parents=True, exist_ok=True)
        binary = Path(sys.executable).parent / "moto_server"
        with (self._workdir / "moto.log").open("ab") as log:
            self._spawn([str(binary), "-H", "127.0.0.1", "-p", str(self.port)], log, self._workdir)
        retrying = Retrying(
            stop=stop_after_delay(30),
            wait=wait_fixed(0.1),
            retry=retry_if_exception_type(requests.ConnectionError),
            reraise=True,
        )
        try:
            retrying(requests.get, f"{self.url}/moto-api/", timeout=2)
        except requests.ConnectionError as exc:
            self.kill()
            raise RuntimeError(f"moto_server did not answer on {self.url}") from exc


def s3_client(endpoint: str) -> object:
    """A boto3 S3 client of the local S3 (path-style addressing)."""
    session = boto3.session.Session(
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    )
    return session.client(
        "s3", endpoint_url=endpoint, config=BotoConfig(s3={"addressing_style": "path"})
    )


class Buckets:
    """Fresh, empty buckets per repetition; emptied and removed afterwards (moto keeps RAM)."""

    def __init__(self, endpoint: str) -> None:
        self.client = s3_client(endpoint)
        self.live: set[str] = set()

    def fresh(self) -> str:
        """Create a new bucket; return its name."""
        name = f"cxrd-bench-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=name)
        self.live.add(name)
        return name

    def count(self, name: str, prefix: str = "") -> tuple[int, int]:
        """(objects, bytes) in the bucket under ``prefix``."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
        sizes = [obj["Size"] for page in pages for obj in page.get("Contents", [])]
        return len(sizes), sum(sizes)

    def drop(self, name: str) -> None:
        """Delete every object, then the bucket."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=name)
        for page in pages:
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        self.client.delete_bucket(Bucket=name)
        self.live.discard(name)

    def close(self) -> None:
        """Drop what is left (an interrupted run)."""
        for name in list(self.live):
            self.drop(name)


def mysql_available() -> bool:
    """Whether the local MariaDB (root, no password) accepts a connection."""
    try:
        pymysql.connect(connect_timeout=2, **MYSQL).close()
    except pymysql.MySQLError:
        return False
    return True


class Databases:
    """A fresh, empty cxrd database per run: MariaDB (production's DB) or SQLite files."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.live: set[str] = set()

    def describe(self) -> str:
        """What the runs use, for the results."""
        if self.kind == "mysql":
            return "MariaDB {}:{} (a fresh database per run)".format(MYSQL["host"], MYSQL["port"])
        return "SQLite (a fresh file per run)"

    def fresh(self) -> str:
        """Create an empty database; return cxrd's database.url for it."""
        name = f"cxrd_bench_{uuid.uuid4().hex[:10]}"
        self.live.add(name)
        if self.kind == "sqlite":
            return f"sqlite://{self.workdir / (name + '.db')}"
        with pymysql.connect(autocommit=True, **MYSQL) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        return "mysql://{user}@{host}:{port}/{name}".format(name=name, **MYSQL)

    def drop(self, url: str) -> None:
        """Remove the database behind ``url``."""
        name = url.rsplit("/", 1)[-1].removesuffix(".db")
        self.live.discard(name)
        if self.kind == "sqlite":
            for suffix in (".db", ".db-wal", ".db-shm"):
                (self.workdir / (name + suffix)).unlink(missing_ok=True)
            return
        with pymysql.connect(autocommit=True, **MYSQL) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")

    def close(self) -> None:
        """Drop what is left (an interrupted run)."""
        for name in list(self.live):
            self.drop(f"sqlite://{name}.db" if self.kind == "sqlite" else f"mysql:///{name}")


@dataclass
class Sandbox:
    """The started services of one benchmark session."""

    orthanc: OrthancProcess
    orthanc_memory: OrthancProcess
    s3_url: str
    models: ModelServer
    buckets: Buckets
    databases: Databases
    pids: dict[str, int]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each service.

        "models" is this process: the reference model server's threads, plus the
        benchmark's own bookkeeping. "mariadb" is the machine's server when in use.
        """
        used = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        times = os.times()
        used["models"] = times.user + times.system
        return used


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process from /proc; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mariadb_pid() -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text(encoding="ascii").strip() in {"mariadbd", "mysqld"}:
                    return int(proc.name)
            except OSError:
                continue
    return None


def start(stack: ExitStack, workdir: Path, db_kind: str) -> Sandbox:
    """Start every service, each stopped when ``stack`` closes.

    Two Orthancs: one holds the realistic corpus (a/b/c/e), the other the
    memory-flatness corpus (d), so each ``--once`` run drains exactly its own.

    Raises:
        FileNotFoundError: Orthanc or moto_server is not installed.
        RuntimeError: a server did not start.
    """
    os.environ.update({k: v for k, v in AWS_ENV.items() if k not in os.environ})
    orthancs = []
    for name in ("orthanc", "orthanc-memory"):
        server = OrthancProcess(workdir / name, stable_age_s=STABLE_AGE_S, dicomweb=False)
        stack.callback(server.stop)
        server.start()
        orthancs.append(server)
    moto = MotoProcess(workdir / "moto")
    stack.callback(moto.stop)
    moto.start()
    models = ModelServer()
    stack.callback(models.stop)
    models.start()
    buckets = Buckets(moto.url)
    stack.callback(buckets.close)
    databases = Databases(db_kind, workdir)
    stack.callback(databases.close)
    pids = {"orthanc": orthancs[0].pid, "moto": moto.pid}
    mariadb = _mariadb_pid() if db_kind == "mysql" else None
    if mariadb:
        pids["mariadb"] = mariadb
    return Sandbox(orthancs[0], orthancs[1], moto.url, models, buckets, databases, pids)


def store(orthanc: OrthancProcess, files: list[Path], study_uids: list[str]) -> dict[str, str]:
    """C-STORE ``files`` (storescu, proposal flags per syntax) and wait until stable.

    Returns {StudyInstanceUID: Orthanc study ID}.
    """
    send_files(files, host="127.0.0.1", port=orthanc.dicom_port)
    return wait_until_stable(orthanc.url, orthanc.auth, study_uids, timeout_s=120)


def instance_ids(orthanc: OrthancProcess, study_ids: list[str]) -> list[str]:
    """Orthanc instance IDs of the given studies, in study order."""
    found: list[str] = []
    with requests.Session() as session:
        session.auth = orthanc.auth
        for study in study_ids:
            answer = session.get(f"{orthanc.url}/studies/{study}/instances", timeout=30)
            answer.raise_for_status()
            found.extend(item["ID"] for item in answer.json())
    return found
