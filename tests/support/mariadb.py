"""A throwaway MariaDB server (`mariadbd`) in a temporary directory, for integration tests.

The data directory outlives `stop()`, so `stop()` then `start()` is a server outage and
recovery with the data kept, as the outage tests need.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pymysql
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from cxr_daemon.sandbox.processes import Supervised, find_program, free_loopback_ports, tail

START_TIMEOUT_S = 30.0


class _NotReadyError(Exception):
    """Internal: the server does not accept connections yet (tenacity retries on it)."""


def _as_root() -> list[str]:
    """mariadbd refuses to run as root unless told to; other users need no flag."""
    return ["--user=root"] if os.geteuid() == 0 else []


class MariaDBServer(Supervised):
    """A private `mariadbd` on a free loopback port; root has no password (tests only)."""

    stop_timeout_s = 60.0

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self._workdir = Path(workdir)
        (self._port,) = free_loopback_ports(1)

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1, stable across restarts."""
        return self._port

    @property
    def url(self) -> str:
        """Server URL without a database, e.g. mysql://root@127.0.0.1:PORT/."""
        return f"mysql://root@127.0.0.1:{self._port}/"

    @property
    def datadir(self) -> Path:
        """The data directory (kept across stop/start)."""
        return self._workdir / "data"

    @property
    def log_path(self) -> Path:
        """The server's error log."""
        return self._workdir / "error.log"

    def _install(self) -> None:
        """Create the system tables once; root@127.0.0.1 gets no password."""
        if (self.datadir / "mysql").is_dir():
            return
        command = [
            find_program("mariadb-install-db", "mysql_install_db"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
            *_as_root(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stdout}{done.stderr}")

    def _command(self) -> list[str]:
        """The mariadbd command line; small buffers suit a 2-core test machine."""
        return [
            find_program("mariadbd", "mysqld"),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self._workdir / 'mysqld.sock'}",
            f"--port={self._port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={self._workdir / 'mysqld.pid'}",
            f"--log-error={self.log_path}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M",
            # Commits reach the OS at once (they survive a mariadbd kill), fsync once a second.
            "--innodb-flush-log-at-trx-commit=2",
            *_as_root(),
        ]

    def start(self) -> None:
        """Install the data directory if needed, start mariadbd and wait until it accepts.

        Raises:
            FileNotFoundError: MariaDB server programs are not installed.
            RuntimeError: installation failed, or the server exited or did not accept
                connections within 30 s; the message holds the end of its error log.
        """
        if self.running:
            return
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._install()
        proc = self._spawn(self._command(), subprocess.DEVNULL, self._workdir)
        try:
            self._wait_ready(proc)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Poll with a real connection until it works, mariadbd exits or time runs out."""

        def probe() -> None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mariadbd exited with code {proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                self.connect().close()
            except pymysql.err.OperationalError as exc:
                raise _NotReadyError(str(exc)) from exc

        retrying = Retrying(
            stop=stop_after_delay(START_TIMEOUT_S),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            retry=retry_if_exception_type(_NotReadyError),
        )
        try:
            retrying(probe)
        except RetryError as exc:
            raise RuntimeError(
                f"mariadbd not ready after {START_TIMEOUT_S:.0f} s "
                f"({exc.last_attempt.exception()}):\n{tail(self.log_path)}"
            ) from exc

    def connect(
        self, database: str | None = None
    ) -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
        """A new autocommit connection as root over TCP.

        Raises:
            pymysql.err.OperationalError: the server is not reachable.
        """
        return pymysql.connect(
            host="127.0.0.1",
            port=self._port,
            user="root",
            database=database,
            connect_timeout=2,
            autocommit=True,
        )
